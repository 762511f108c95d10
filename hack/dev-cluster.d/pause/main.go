// The dev cluster's sandbox ("pause") image: the first process of every pod
// on its real node. It holds the pod's namespaces open, reaps orphans, and
// exits on SIGINT or SIGTERM, as Kubernetes' own pause does. Built here
// (hack/dev-cluster) because no image registry is reachable.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			if pid, _ := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 {
				break
			}
		}
	}
}
