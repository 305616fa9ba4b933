// Package conformance runs containerd's snapshotter test suite
// (github.com/containerd/containerd/snapshots/testsuite) against the
// nix-snapshotter daemon, reached the way containerd reaches it: through
// containerd's gRPC proxy snapshotter client.
//
// Every case gets a fresh daemon, started as
//
//	$NIX_SNAPSHOTTER_BIN --root <case>/state --address <case>/sock
//
// and stopped with SIGTERM when the case ends. A daemon that does not stop
// within 10 s is killed and the case fails: shutdown is part of the contract.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func startDaemon(ctx context.Context, dir string) (snapshots.Snapshotter, func() error, error) {
	bin := os.Getenv("NIX_SNAPSHOTTER_BIN")
	sock := filepath.Join(dir, "sock")
	logPath := filepath.Join(dir, "daemon.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--log-level", "debug", "--root", filepath.Join(dir, "state"), "--address", sock)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-done:
			out, _ := os.ReadFile(logPath)
			return nil, nil, fmt.Errorf("daemon exited early (%v):\n%s", err, out)
		default:
		}
		if time.Since(start) > 20*time.Second {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("daemon not listening on %s after 20s", sock)
		}
	}

	// A plain path as target: grpc-go then sends the path as :authority,
	// which the daemon must accept.
	conn, err := grpc.Dial(sock, grpc.WithInsecure(), grpc.WithContextDialer(
		func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "nix")
	stop := func() error {
		sn.Close()
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				return fmt.Errorf("daemon exited with %v after SIGTERM", err)
			}
			if _, err := os.Stat(sock); err == nil {
				return fmt.Errorf("daemon left its socket %s behind", sock)
			}
			return nil
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			return fmt.Errorf("daemon still running 10s after SIGTERM")
		}
	}
	return sn, stop, nil
}

func TestContainerdSnapshotterSuite(t *testing.T) {
	if os.Getenv("NIX_SNAPSHOTTER_BIN") == "" {
		t.Fatal("NIX_SNAPSHOTTER_BIN must name the daemon binary")
	}
	testsuite.SnapshotterSuite(t, "nix", startDaemon)
}
