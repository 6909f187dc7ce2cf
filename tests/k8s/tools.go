//go:build tools

// Package tools pins kube-apiserver in this module's graph; `build` compiles it from the
// Go module proxy with the staging modules at the matching v0 version (go.mod's replaces).
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
