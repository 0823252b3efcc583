package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

// sysKind is one of the systems under test.
type sysKind int

const (
	sysConnlimit   sysKind = iota // Caddy: connection_limit, then proxy
	sysHAProxy                    // HAProxy TCP mode, server maxconn L (its queue)
	sysPolling                    // Caddy: proxy, upstream max_connections L, try_duration/try_interval
	sysPlain                      // Caddy: proxy, no limit, C clients
	sysPlainL                     // Caddy: proxy, no limit, only L clients
	sysConnlimitCW                // Caddy: connection_limit with release close_write, then proxy
)

var allSystems = []sysKind{sysConnlimit, sysConnlimitCW, sysHAProxy, sysPolling, sysPlain, sysPlainL}

// limiters are the connection_limit variants, each compared with the others.
var limiters = []sysKind{sysConnlimit, sysConnlimitCW}

func (k sysKind) String() string {
	return [...]string{"connlimit", "haproxy", "l4-polling", "l4-plain", "l4-plain-L", "connlimit-cw"}[k]
}

func (k sysKind) label() string {
	return [...]string{
		"Caddy connection_limit + proxy",
		"HAProxy (server maxconn L, queue)",
		"caddy-l4 proxy max_connections + try_* (polling)",
		"caddy-l4 proxy, no limit, C clients",
		"caddy-l4 proxy, no limit, L clients (floor)",
		"Caddy connection_limit (release close_write) + proxy",
	}[k]
}

func (k sysKind) isCaddy() bool { return k != sysHAProxy }

// limited: the system keeps at most L connections at the backend.
func (k sysKind) limited() bool { return k.isConnlimit() || k == sysHAProxy || k == sysPolling }

func (k sysKind) isConnlimit() bool { return k == sysConnlimit || k == sysConnlimitCW }

// proxyProc is a running proxy process.
type proxyProc struct {
	kind      sysKind
	cmd       *exec.Cmd
	pid       int
	port      int
	adminAddr string // Caddy
	statsSock string // HAProxy
	logPath   string
	exited    chan struct{}
}

func (p *proxyProc) addr() string { return fmt.Sprintf("127.0.0.1:%d", p.port) }

func freePort() (int, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// procSpec says how to start a proxy for one run.
type procSpec struct {
	kind        sysKind
	limit       int
	backend     string
	maxConn     int // HAProxy global/frontend maxconn
	nbthread    int // HAProxy; 0: its default
	tryDuration time.Duration
	tryInterval time.Duration
}

var (
	liveMu    sync.Mutex
	liveProcs = map[*proxyProc]struct{}{}
)

// killAll kills every proxy still running (on exit or interrupt).
func killAll() {
	liveMu.Lock()
	defer liveMu.Unlock()
	for p := range liveProcs {
		_ = p.cmd.Process.Kill()
	}
}

func startProxy(cfg *config, spec procSpec, tag string) (*proxyProc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &proxyProc{kind: spec.kind, port: port, exited: make(chan struct{})}
	var args []string
	var bin string
	if spec.kind.isCaddy() {
		ap, err := freePort()
		if err != nil {
			return nil, err
		}
		p.adminAddr = fmt.Sprintf("127.0.0.1:%d", ap)
		file := filepath.Join(cfg.workDir, tag+".json")
		if err := os.WriteFile(file, caddyConfig(spec, p.addr(), p.adminAddr), 0o644); err != nil {
			return nil, err
		}
		bin, args = cfg.caddyBin, []string{"run", "--config", file}
	} else {
		p.statsSock = filepath.Join(cfg.workDir, tag+".sock")
		file := filepath.Join(cfg.workDir, tag+".cfg")
		if err := os.WriteFile(file, []byte(haproxyConfig(spec, p.addr(), p.statsSock)), 0o644); err != nil {
			return nil, err
		}
		bin, args = cfg.haproxyBin, []string{"-f", file, "-db"}
	}
	p.logPath = filepath.Join(cfg.workDir, tag+".log")
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = append(os.Environ(),
		"XDG_CONFIG_HOME="+filepath.Join(cfg.workDir, "xdg-config"),
		"XDG_DATA_HOME="+filepath.Join(cfg.workDir, "xdg-data"))
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p.pid = p.cmd.Process.Pid
	liveMu.Lock()
	liveProcs[p] = struct{}{}
	liveMu.Unlock()
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.exited) }()
	deadline := time.Now().Add(15 * time.Second)
	for !listening(port) {
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited at start: %s", spec.kind, tail(p.logPath, 5))
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s did not listen within 15s: %s", spec.kind, tail(p.logPath, 5))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p.adminAddr != "" { // the admin endpoint comes up with the config
		for time.Now().Before(deadline) {
			if _, err := httpGet("http://" + p.adminAddr + "/config/"); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return p, nil
}

// stop kills the proxy (SIGKILL: nothing it does after the measurement
// matters) and waits for it.
func (p *proxyProc) stop() {
	_ = p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
	}
	liveMu.Lock()
	delete(liveProcs, p)
	liveMu.Unlock()
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// logErrors counts the lines of a proxy's log that report errors.
func logErrors(path string) (n int, sample string) {
	f, err := os.Open(path)
	if err != nil {
		return 0, ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.Contains(l, `"level":"error"`) || strings.Contains(l, "[ALERT]") {
			n++
			if sample == "" {
				sample = l
			}
		}
	}
	return n, sample
}

func caddyConfig(spec procSpec, listen, admin string) []byte {
	upstream := map[string]any{"dial": []string{spec.backend}}
	proxy := map[string]any{"handler": "proxy", "upstreams": []any{upstream}}
	var handle []any
	switch spec.kind {
	case sysConnlimit, sysConnlimitCW:
		limit := map[string]any{"handler": "connection_limit", "max_connections": spec.limit, "zone": "bench"}
		if spec.kind == sysConnlimitCW {
			limit["release"] = "close_write"
		}
		handle = []any{limit, proxy}
	case sysPolling:
		upstream["max_connections"] = spec.limit
		proxy["load_balancing"] = map[string]any{
			"try_duration": spec.tryDuration.String(),
			"try_interval": spec.tryInterval.String(),
		}
		handle = []any{proxy}
	default:
		handle = []any{proxy}
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level": "ERROR", "writer": map[string]any{"output": "stderr"},
		}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"bench": map[string]any{
			"listen": []string{listen},
			"routes": []any{map[string]any{"handle": handle}},
		}}}},
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	return b
}

func haproxyConfig(spec procSpec, listen, sock string) string {
	return benchkit.HAProxyTCP{Listen: listen, Server: spec.backend, MaxConn: spec.maxConn,
		ServerMaxConn: spec.limit, NbThread: spec.nbthread, StatsSocket: sock}.Config()
}

var httpc = &http.Client{Timeout: 60 * time.Second}

func httpGet(url string) ([]byte, error) { return benchkit.Get(httpc, url) }

// goMem is the part of runtime.MemStats that Caddy's /debug/vars shows.
type goMem struct {
	HeapAlloc, HeapInuse, HeapSys, HeapIdle, HeapReleased uint64
	StackInuse, StackSys, Sys, MSpanInuse, NumGC          uint64
}

func caddyMem(adminAddr string) (goMem, error) {
	var v struct {
		Memstats goMem `json:"memstats"`
	}
	b, err := httpGet("http://" + adminAddr + "/debug/vars")
	if err != nil {
		return v.Memstats, err
	}
	err = json.Unmarshal(b, &v)
	return v.Memstats, err
}

func caddyGoroutines(adminAddr string) (int, string) {
	b, err := httpGet("http://" + adminAddr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return -1, ""
	}
	s := string(b)
	first, rest, _ := strings.Cut(s, "\n")
	n, _ := strconv.Atoi(strings.TrimPrefix(first, "goroutine profile: total "))
	// The first group is the largest: with thousands of waiters, theirs.
	group, _, _ := strings.Cut(rest, "\n\n")
	return n, group
}

func connlimitWaiting(adminAddr string) (active, waiting int, err error) {
	var v struct{ Active, Waiting int }
	b, err := httpGet("http://" + adminAddr + "/connection_limit/bench")
	if err != nil {
		return -1, -1, err
	}
	err = json.Unmarshal(b, &v)
	return v.Active, v.Waiting, err
}

// zoneOrder lists the client indices of the first waiters (up to 100) in
// the order connection_limit's zone will admit them.
func zoneOrder(adminAddr string, wc *waiterClient) []int64 {
	var v struct {
		Waiters []struct {
			RemoteAddr string `json:"remote_addr"`
		}
	}
	b, err := httpGet("http://" + adminAddr + "/connection_limit/bench")
	if err != nil || json.Unmarshal(b, &v) != nil {
		return nil
	}
	wc.mu.Lock()
	defer wc.mu.Unlock()
	var out []int64
	for _, w := range v.Waiters {
		idx, ok := wc.byAddr[w.RemoteAddr]
		if !ok {
			idx = -1
		}
		out = append(out, int64(idx))
	}
	return out
}

// haproxyQueue returns the backend's current queue length and sessions
// from the stats socket.
func haproxyQueue(sock string) (qcur, scur int, err error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return -1, -1, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("show stat\n")); err != nil {
		return -1, -1, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return -1, -1, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		if len(f) > 4 && f[0] == "be" && f[1] == "BACKEND" {
			q, _ := strconv.Atoi(f[2])
			s, _ := strconv.Atoi(f[4])
			return q, s, nil
		}
	}
	return -1, -1, fmt.Errorf("no backend row in stats")
}

func fetchTo(url, file string) error {
	b, err := httpGet(url)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
