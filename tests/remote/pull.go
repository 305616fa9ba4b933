// pull: pulls an image from a plain-HTTP registry through containerd's Go
// client with unpacking, the path CRI and nerdctl take, on which containerd
// passes `containerd.io/snapshot.ref` and the layer's
// `containerd.io/snapshot/*` annotations to the snapshotter's Prepare.
//
//	pull CONTAINERD_SOCKET NAMESPACE REF SNAPSHOTTER
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: pull CONTAINERD_SOCKET NAMESPACE REF SNAPSHOTTER")
		os.Exit(2)
	}
	client, err := containerd.New(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), os.Args[2])
	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	img, err := client.Pull(ctx, os.Args[3],
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(os.Args[4]),
		containerd.WithResolver(resolver))
	if err != nil {
		fmt.Fprintln(os.Stderr, "pull:", err)
		os.Exit(1)
	}
	fmt.Println(img.Name(), img.Target().Digest)
}
