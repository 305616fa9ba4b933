// Command stargz serves stargz-snapshotter's snapshotter (Debian's
// golang-github-containerd-stargz-snapshotter-dev, which ships no daemon) to
// containerd as a proxy snapshotter, so the benchmarks can run stargz as a
// lazy-pull peer. Built in GOPATH mode against /usr/share/gocode.
//
// It uses the library's `fs` and `snapshot` packages directly rather than
// its `service` package: that one imports service/resolver, whose CRI code
// needs k8s.io/cri-api, which bookworm does not package. What is left out
// with it is only what a benchmark does not need: CRI image labels and
// keychains (access is anonymous). Layer metadata stays in memory (the
// library's default).
package main

import (
	"context"
	"flag"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshots API on (required)")
	root := flag.String("root", "", "directory for snapshots and the layer cache (required)")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn or error")
	configPath := flag.String("config", "", "optional TOML with the top-level filesystem keys of containerd-stargz-grpc's config (e.g. no_background_fetch = true)")
	plainHTTP := flag.String("plain-http", "", "comma-separated registry hosts (host:port) to reach over plain http; loopback hosts always are")
	flag.Parse()
	if *address == "" || *root == "" {
		flag.Usage()
		os.Exit(2)
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		logrus.WithError(err).Fatal("bad -log-level")
	}
	logrus.SetLevel(lvl)
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg config.Config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			log.G(ctx).WithError(err).Fatalf("cannot read %s", *configPath)
		}
	}
	insecure := map[string]bool{}
	for _, h := range strings.Split(*plainHTTP, ",") {
		if h = strings.TrimSpace(h); h != "" {
			insecure[h] = true
		}
	}

	// The layers to mount are named by the labels ctr-remote (or containerd's
	// unpacker with stargz's handler) puts on each snapshot.
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(registryHosts(insecure))))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot set up the filesystem")
	}
	sn, err := snapshot.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs, snapshot.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot set up the snapshotter")
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("cannot create the socket's directory")
	}
	// A socket left by a killed predecessor would make Listen fail.
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot listen on %s", *address)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	go func() {
		if err := rpc.Serve(l); err != nil {
			log.G(ctx).WithError(err).Fatal("serving failed")
		}
	}()

	// Close unmounts every FUSE layer it mounted; without it a stopped
	// daemon leaves dead mounts ("transport endpoint is not connected").
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	rpc.Stop()
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close")
	}
	_ = os.Remove(*address)
}

// registryHosts reaches each image's own registry, anonymously, over https
// unless it is a loopback host (as containerd does) or listed as insecure.
func registryHosts(insecure map[string]bool) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		// No overall timeout: a slow shaped link must not fail a big range.
		client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		h := docker.RegistryHost{
			Client:       client,
			Host:         host,
			Scheme:       "https",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}
		if local, _ := docker.MatchLocalhost(host); local || insecure[host] {
			h.Scheme = "http"
		}
		if host == "docker.io" {
			h.Host = "registry-1.docker.io"
		}
		return []docker.RegistryHost{h}, nil
	}
}
