package connlimit

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// The fleet tests run each Caddy node as a process of its own (this
// module's Caddy, built once per test run), so that a node can be killed
// or stopped; they share a real redis-server (redis_harness_test.go) and
// a real backend (harness_test.go) on 127.0.0.1.

// caddyBuild is this module's Caddy, built at most once per test run.
var caddyBuild struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// caddyBinary returns the path of ./cmd/caddy built for this test run
// (removed by TestMain at the end).
func caddyBinary(t testing.TB) string {
	t.Helper()
	caddyBuild.once.Do(func() {
		caddyBuild.dir, caddyBuild.err = os.MkdirTemp("", "connlimit-caddy-")
		if caddyBuild.err != nil {
			return
		}
		bin := filepath.Join(caddyBuild.dir, "caddy")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		start := time.Now()
		out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/caddy").CombinedOutput()
		if err != nil {
			caddyBuild.err = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
			return
		}
		caddyBuild.bin = bin
		fmt.Fprintf(os.Stderr, "built ./cmd/caddy for the process tests in %s\n", time.Since(start).Round(time.Millisecond))
	})
	if caddyBuild.err != nil {
		t.Fatal(caddyBuild.err)
	}
	return caddyBuild.bin
}

// removeCaddyBuild removes the built binary (TestMain).
func removeCaddyBuild() {
	if caddyBuild.dir != "" {
		_ = os.RemoveAll(caddyBuild.dir)
	}
}

// caddyProc is one Caddy node: a process of its own with an admin API and
// one layer4 route.
type caddyProc struct {
	t      testing.TB
	name   string
	admin  string // host:port
	listen string // host:port of its layer4 server
	dir    string
	cmd    *exec.Cmd
	done   chan struct{}
	env    []string
}

// startNode starts a Caddy process named name with cfg (see nodeConfig),
// and waits until its admin API answers. It is killed at the end of t.
func startNode(t testing.TB, name string, cfg obj, env ...string) *caddyProc {
	t.Helper()
	p := &caddyProc{t: t, name: name, dir: t.TempDir(), env: env}
	p.admin = cfg["admin"].(obj)["listen"].(string)
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	p.listen = servers["test"].(obj)["listen"].([]string)[0]
	p.start(cfg)
	t.Cleanup(p.kill)
	return p
}

func (p *caddyProc) start(cfg obj) {
	p.t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	conf := filepath.Join(p.dir, "caddy.json")
	if err := os.WriteFile(conf, raw, 0o600); err != nil {
		p.t.Fatal(err)
	}
	logf, err := os.Create(p.logPath())
	if err != nil {
		p.t.Fatal(err)
	}
	p.cmd = exec.Command(caddyBinary(p.t), "run", "--config", conf)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = append(append(os.Environ(), "HOME="+p.dir, "XDG_DATA_HOME="+p.dir, "XDG_CONFIG_HOME="+p.dir), p.env...)
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func() { _ = p.cmd.Wait(); logf.Close(); close(p.done) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if code, _, err := p.try(http.MethodGet, "/connection_limit/", ""); err == nil && code == http.StatusOK {
			return
		}
		select {
		case <-p.done:
			p.t.Fatalf("node %s exited at start:\n%s", p.name, p.log())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("node %s: admin API not up within 20s:\n%s", p.name, p.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *caddyProc) logPath() string { return filepath.Join(p.dir, "caddy.log") }

// log is everything the node wrote (its log goes to stderr).
func (p *caddyProc) log() string {
	b, _ := os.ReadFile(p.logPath())
	return string(b)
}

// try sends one admin request.
func (p *caddyProc) try(method, path, body string) (int, []byte, error) {
	req, err := http.NewRequest(method, "http://"+p.admin+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Close = true
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// do sends an admin request and fails the test unless it answers 200.
func (p *caddyProc) do(method, path, body string) []byte {
	p.t.Helper()
	var lastErr error
	for range 5 { // a load replaces the admin server: again on no answer
		code, b, err := p.try(method, path, body)
		if err != nil {
			lastErr = err
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if code != http.StatusOK {
			p.t.Fatalf("node %s: %s %s: %d %s", p.name, method, path, code, b)
		}
		return b
	}
	p.t.Fatalf("node %s: %s %s: %v", p.name, method, path, lastErr)
	return nil
}

// zone is the node's one-zone view.
func (p *caddyProc) zone(name string) zoneDetailJSON {
	p.t.Helper()
	var z zoneDetailJSON
	if err := json.Unmarshal(p.do(http.MethodGet, "/connection_limit/"+name, ""), &z); err != nil {
		p.t.Fatal(err)
	}
	return z
}

// load loads cfg on the running node.
func (p *caddyProc) load(cfg obj) {
	p.t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.do(http.MethodPost, "/load", string(raw))
}

// signal sends sig to the node.
func (p *caddyProc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("node %s: %v: %v", p.name, sig, err)
	}
}

// kill kills the node (SIGKILL) and waits until it is gone.
func (p *caddyProc) kill() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGCONT) // a stopped process dies only once continued
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.t.Errorf("node %s did not die", p.name)
	}
}

// exited reports whether the node's process has ended.
func (p *caddyProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// nodeConfig is a node's config: an admin API and one layer4 server on
// free ports, whose route is a connection_limit with fields (and the
// store given) in front of a proxy to backend. Its log goes to stderr,
// at INFO unless CONNLIMIT_TEST_LOG names a level.
func nodeConfig(backend string, fields obj, store obj) obj {
	admin := fmt.Sprintf("127.0.0.1:%d", freePortNode())
	listen := fmt.Sprintf("127.0.0.1:%d", freePortNode())
	return nodeConfigAt(admin, listen, backend, fields, store)
}

// nodeConfigAt is nodeConfig on given addresses (for a reload).
func nodeConfigAt(admin, listen, backend string, fields obj, store obj) obj {
	f := obj{}
	for k, v := range fields {
		f[k] = v
	}
	if store != nil {
		f["store"] = store
	}
	level := "INFO"
	if l := os.Getenv("CONNLIMIT_TEST_LOG"); l != "" {
		level = l
	}
	return obj{
		"admin":   obj{"listen": admin},
		"logging": obj{"logs": obj{"default": obj{"level": level, "writer": obj{"output": "stderr"}}}},
		"apps": obj{"layer4": obj{"servers": obj{"test": obj{
			"listen": []string{listen},
			"routes": []obj{{"handle": []obj{limit(f), proxyTo(backend)}}},
		}}}},
	}
}

// freePortNode is a TCP port on 127.0.0.1 that was free a moment ago.
func freePortNode() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// redisStore is a store setting for the test's redis-server, with a short
// lease so that crashes are noticed fast.
func redisStore(r *testkit.Redis, fields obj) obj {
	s := obj{"backend": "redis", "address": r.Addr(), "lease": "1s"}
	for k, v := range fields {
		s[k] = v
	}
	return s
}

// waitNodes waits until cond holds for the views of zone on every node.
func waitNodes(t testing.TB, within time.Duration, what, zone string, nodes []*caddyProc, cond func([]zoneDetailJSON) bool) []zoneDetailJSON {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		views := make([]zoneDetailJSON, len(nodes))
		for i, n := range nodes {
			views[i] = n.zone(zone)
		}
		if cond(views) {
			return views
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; views:\n%s", within, what, describeViews(nodes, views))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func describeViews(nodes []*caddyProc, views []zoneDetailJSON) string {
	var b strings.Builder
	for i, v := range views {
		fmt.Fprintf(&b, "  %s: active %d waiting %d max %d paused %v", nodes[i].name, v.Active, v.Waiting, v.MaxConnections, v.Paused)
		if v.Fleet != nil {
			fmt.Fprintf(&b, " fleet{store %s err %q active %d waiting %d nodes %d}", v.Fleet.Store, v.Fleet.StoreError, v.Fleet.Active, v.Fleet.Waiting, v.Fleet.NodeCount)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// registered waits until every node says its store decides.
func registered(t testing.TB, zone string, nodes ...*caddyProc) {
	t.Helper()
	waitNodes(t, 10*time.Second, "every node registered", zone, nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Fleet == nil || v.Fleet.Store != "registered" {
				return false
			}
		}
		return true
	})
}
