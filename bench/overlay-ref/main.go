// overlay-ref serves containerd's own overlayfs snapshotter (from Debian's
// containerd 1.6 sources) over the Snapshots gRPC API on a Unix socket: the
// baseline that bench/snapshots.rs measures our daemon against, reached the
// same way (a proxy snapshotter daemon, same client, same socket transport).
//
//	overlay-ref ROOT SOCKET
package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: overlay-ref ROOT SOCKET")
		os.Exit(2)
	}
	sn, err := overlay.NewSnapshotter(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Remove(os.Args[2])
	l, err := net.Listen("unix", os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		srv.GracefulStop()
	}()
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sn.Close()
}
