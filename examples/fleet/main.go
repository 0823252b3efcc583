// Command fleet runs a two-node fleet on this machine: a redis-server of
// its own, and two Caddy processes (this repository's Caddy, built once)
// with examples/fleet/node-a.Caddyfile and node-b.Caddyfile, whose zone db
// allows 2 sessions at once across both. It then connects 3 clients to
// each node at once and shows that 2 are served at a time, fleet-wide:
//
//	go run ./examples/fleet         # the demo, then keeps the fleet running until Ctrl-C
//	go run ./examples/fleet -exit   # the demo only (used by CI)
//
// It needs redis-server on PATH (Debian: apt-get install redis-server).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/examples/internal/session"
)

type node struct {
	name, config, addr, admin string
	cmd                       *exec.Cmd
}

func main() {
	exit := flag.Bool("exit", false, "stop after the demo (exit status 1 if it did not go as expected)")
	hold := flag.Duration("hold", 2*time.Second, "how long each demo client keeps its session after its answer")
	flag.Parse()
	if err := run(*exit, *hold); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
}

func run(exit bool, hold time.Duration) error {
	dir, err := os.MkdirTemp("", "connlimit-fleet-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = p.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = p.Process.Kill()
				<-done
			}
		}
	}()

	redisAddr, redis, err := startRedis(dir)
	if err != nil {
		return err
	}
	procs = append(procs, redis)
	fmt.Printf("redis-server on %s (no persistence)\n", redisAddr)

	caddyBin := filepath.Join(dir, "caddy")
	fmt.Println("building ./cmd/caddy ...")
	if out, err := exec.Command("go", "build", "-o", caddyBin, "./cmd/caddy").CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
	}
	nodes := []*node{
		{name: "A", config: "examples/fleet/node-a.Caddyfile", addr: "127.0.0.1:5441", admin: "127.0.0.1:2021"},
		{name: "B", config: "examples/fleet/node-b.Caddyfile", addr: "127.0.0.1:5442", admin: "127.0.0.1:2022"},
	}
	for _, n := range nodes {
		logf, err := os.Create(filepath.Join(dir, "node-"+n.name+".log"))
		if err != nil {
			return err
		}
		defer logf.Close()
		n.cmd = exec.Command(caddyBin, "run", "--config", n.config, "--adapter", "caddyfile")
		n.cmd.Env = append(os.Environ(), "CONNLIMIT_REDIS_ADDRESS="+redisAddr, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		n.cmd.Stdout, n.cmd.Stderr = logf, logf
		if err := n.cmd.Start(); err != nil {
			return err
		}
		procs = append(procs, n.cmd)
	}
	for _, n := range nodes {
		if err := waitRegistered(n); err != nil {
			log, _ := os.ReadFile(filepath.Join(dir, "node-"+n.name+".log"))
			return fmt.Errorf("node %s: %v\n%s", n.name, err, log)
		}
		fmt.Printf("node %s: %s (admin %s), joined the fleet\n", n.name, n.addr, n.admin)
	}
	fmt.Printf("\n3 clients connect to each node at once; each keeps its session for %s. The fleet allows 2 at a time.\n\n", hold)

	ok := demo(nodes, hold)
	if exit {
		if !ok {
			return errors.New("the demo did not go as expected")
		}
		return nil
	}
	fmt.Println("\nThe fleet keeps running (try: curl -s http://127.0.0.1:2021/connection_limit/db). Press Ctrl-C to stop.")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	return nil
}

// startRedis starts redis-server on a free loopback port.
func startRedis(dir string) (string, *exec.Cmd, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cmd := exec.Command("redis-server", "--port", fmt.Sprint(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir)
	if err := cmd.Start(); err != nil {
		return "", nil, fmt.Errorf("starting redis-server (apt-get install redis-server): %v", err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr, cmd, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	return "", nil, errors.New("redis-server did not start")
}

// zoneView is what the demo reads of GET /connection_limit/db.
type zoneView struct {
	Active  int `json:"active"`
	Waiting int `json:"waiting"`
	Fleet   *struct {
		Store   string `json:"store"`
		Active  int    `json:"active"`
		Waiting int    `json:"waiting"`
	} `json:"fleet"`
}

func zone(n *node) (zoneView, error) {
	var v zoneView
	resp, err := http.Get("http://" + n.admin + "/connection_limit/db")
	if err != nil {
		return v, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return v, fmt.Errorf("%s: %s", resp.Status, b)
	}
	return v, json.NewDecoder(resp.Body).Decode(&v)
}

// waitRegistered waits until the node says the store decides for it.
func waitRegistered(n *node) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		v, err := zone(n)
		if err == nil && v.Fleet != nil && v.Fleet.Store == "registered" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not registered within 30s (%v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// demo connects 3 clients to each node at once; it reports whether the
// fleet never served more than 2 at once and served everyone.
func demo(nodes []*node, hold time.Duration) bool {
	start := time.Now()
	var mu sync.Mutex
	serving, peak, failed, waited := 0, 0, 0, 0
	var wg sync.WaitGroup
	for _, n := range nodes {
		for i := 1; i <= 3; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("%s%d", n.name, i)
				err := session.Run(n.addr, hold, func(answered time.Duration) {
					mu.Lock()
					serving++
					peak = max(peak, serving)
					if answered > hold/2 {
						waited++
					}
					mu.Unlock()
					fmt.Printf("%6.2fs  client %s (node %s): answered after %.2fs\n", time.Since(start).Seconds(), name, n.name, answered.Seconds())
				}, func() {
					mu.Lock()
					serving--
					mu.Unlock()
				})
				if err != nil {
					mu.Lock()
					failed++
					mu.Unlock()
					fmt.Printf("%6.2fs  client %s: %v\n", time.Since(start).Seconds(), name, err)
				}
			}()
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(hold / 2)
	defer tick.Stop()
	for {
		select {
		case <-done:
			fmt.Printf("\n6 clients: %d served (%d after waiting), %d failed; at most %d served at once across the fleet.\n",
				6-failed, waited, failed, peak)
			return failed == 0 && waited > 0 && peak <= 2
		case <-tick.C:
			var parts []string
			for _, n := range nodes {
				if v, err := zone(n); err == nil && v.Fleet != nil {
					parts = append(parts, fmt.Sprintf("node %s: %d active, %d waiting", n.name, v.Active, v.Waiting))
				}
			}
			if v, err := zone(nodes[0]); err == nil && v.Fleet != nil {
				parts = append(parts, fmt.Sprintf("fleet: %d active, %d waiting", v.Fleet.Active, v.Fleet.Waiting))
			}
			fmt.Printf("%6.2fs  %s\n", time.Since(start).Seconds(), strings.Join(parts, "; "))
		}
	}
}
