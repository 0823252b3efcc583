// Command caddy is Caddy with caddy-l4's modules and connection_limit,
// pinned by this repository's go.mod: the binary the tests, the examples
// and the benchmarks run. `xcaddy build` with xcaddy.json builds the same.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/l4-connlimit/connlimit"
)

func main() {
	caddycmd.Main()
}
