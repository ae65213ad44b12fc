// Command etcd is a thin wrapper around etcd's server main: go.etcd.io/etcd/server/v3 has
// relative replace directives, so `go install go.etcd.io/etcd/server/v3@v` does not work.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
