// CoreDNS with the plugins a cluster's DNS uses (those of the Corefile kubeadm and EKS
// ship: errors, health, ready, kubernetes, forward, cache, loop, reload, loadbalance,
// and log, hosts), as its own main package does it with all of them. Built from the Go
// module proxy (this directory's go.mod/go.sum pin the version); the cloud DNS plugins are
// left out, and with them their SDKs.
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"

	_ "github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
