// etcd for the tests' Kubernetes API server: etcd's own server entry point, at the
// version kube-apiserver's module graph selects.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
