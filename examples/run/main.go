// Command run builds Caddy with caddy-l4 and connection_limit (pinned by
// this repository's go.mod), runs an example config, and shows clients
// waiting for a slot and then being served:
//
//	go run ./examples/run                 # examples/Caddyfile, then keeps serving
//	go run ./examples/run -exit           # the demo only (used by CI)
//	go run ./examples/run -clients-only   # demo clients for a Caddy you run yourself
//	go run ./examples/run -config examples/per-ip.Caddyfile -addr 127.0.0.1:5435
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/l4-connlimit/connlimit"
	"github.com/l4-connlimit/connlimit/examples/internal/session"
)

func main() {
	config := flag.String("config", "examples/Caddyfile", "config to run: a Caddyfile, or JSON (.json)")
	addr := flag.String("addr", "127.0.0.1:5433", "the limited layer4 address the demo clients connect to")
	adminAddr := flag.String("admin", "localhost:2019", "Caddy's admin address, where the demo reads /connection_limit/")
	clients := flag.Int("clients", 6, "demo clients, all connecting at once")
	hold := flag.Duration("hold", 2*time.Second, "how long each demo client keeps its session after its answer")
	exit := flag.Bool("exit", false, "stop after the demo (exit status 1 if it did not go as expected)")
	clientsOnly := flag.Bool("clients-only", false, "run only the demo clients, against a Caddy already running the config (implies -exit)")
	flag.Parse()

	if *clientsOnly {
		if !demo(*addr, *adminAddr, *clients, *hold) {
			os.Exit(1)
		}
		return
	}
	if err := load(*config); err != nil {
		fmt.Fprintln(os.Stderr, "run:", err)
		os.Exit(1)
	}
	fmt.Printf("Caddy is running %s; %d clients connect to %s at once and each keeps its session for %s.\n\n",
		*config, *clients, *addr, *hold)

	ok := demo(*addr, *adminAddr, *clients, *hold)
	if *exit {
		_ = caddy.Stop()
		if !ok {
			os.Exit(1)
		}
		return
	}
	fmt.Printf("\nCaddy keeps serving %s (try: curl --http0.9 -s telnet://%s <<< 'GET / HTTP/1.0'; and curl -s http://%s/connection_limit/).\nPress Ctrl-C to stop.\n",
		*config, *addr, *adminAddr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	_ = caddy.Stop()
}

// load adapts the config if it is a Caddyfile and runs it.
func load(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !strings.HasSuffix(path, ".json") {
		var warnings []caddyconfig.Warning
		raw, warnings, err = caddyconfig.GetAdapter("caddyfile").Adapt(raw, map[string]any{"filename": path})
		if err != nil {
			return err
		}
		for _, w := range warnings {
			fmt.Fprintln(os.Stderr, "warning:", w.String())
		}
	}
	return caddy.Load(raw, true)
}

// demo connects n clients at once; each sends a request, reads the answer
// and keeps its session open for hold. It prints when each was served and
// the zone's state as it goes, and reports whether some clients waited
// and all were served.
func demo(addr, admin string, n int, hold time.Duration) bool {
	start := time.Now()
	var mu sync.Mutex
	waited, failed := 0, 0
	var wg sync.WaitGroup
	for i := 1; i <= n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := session.Run(addr, hold, func(served time.Duration) {
				mu.Lock()
				defer mu.Unlock()
				if served > hold/2 {
					waited++
				}
				fmt.Printf("%6.2fs  client %d: answered after %.2fs; keeps its session for %s\n", time.Since(start).Seconds(), i, served.Seconds(), hold)
			}, nil)
			if err != nil {
				mu.Lock()
				defer mu.Unlock()
				failed++
				fmt.Printf("%6.2fs  client %d: %v\n", time.Since(start).Seconds(), i, err)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(hold / 2)
	defer tick.Stop()
	for {
		select {
		case <-done:
			fmt.Printf("\n%d clients served, %d of them after waiting for a slot; %d failed.\n", n-failed, waited, failed)
			return failed == 0 && waited > 0
		case <-tick.C:
			if s := zones(admin); s != "" {
				fmt.Printf("%6.2fs  %s\n", time.Since(start).Seconds(), s)
			}
		}
	}
}

// zones reads the admin API's view of the zones, in one line.
func zones(admin string) string {
	resp, err := http.Get("http://" + admin + "/connection_limit/")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var v struct {
		Zones []struct {
			Zone           string `json:"zone"`
			MaxConnections int    `json:"max_connections"`
			Active         int    `json:"active"`
			Waiting        int    `json:"waiting"`
		} `json:"zones"`
	}
	if json.NewDecoder(resp.Body).Decode(&v) != nil {
		return ""
	}
	var parts []string
	for _, z := range v.Zones {
		parts = append(parts, fmt.Sprintf("zone %q: %d active (max %d), %d waiting", z.Zone, z.Active, z.MaxConnections, z.Waiting))
	}
	return strings.Join(parts, "; ")
}
