//go:build ignore

// xcaddy-args prints the `xcaddy build` arguments that xcaddy.json, the
// build manifest, gives: the Caddy version, then one --with per plugin.
// Used by .ci/run and the README: xcaddy build $(go run .ci/xcaddy-args.go)
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	raw, err := os.ReadFile("xcaddy.json")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var m struct {
		Caddy        string `json:"caddy"`
		Dependencies []struct {
			Module, Version, Replace string
		} `json:"dependencies"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		fmt.Fprintln(os.Stderr, "xcaddy.json:", err)
		os.Exit(1)
	}
	args := m.Caddy
	for _, d := range m.Dependencies {
		if d.Replace != "" {
			// a version with the replacement, or `go get` asks the
			// module proxy for a module it has never seen
			args += fmt.Sprintf(" --with %s@%s=%s", d.Module, d.Version, d.Replace)
		} else {
			args += fmt.Sprintf(" --with %s@%s", d.Module, d.Version)
		}
	}
	fmt.Println(args)
}
