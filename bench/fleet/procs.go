package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
	"github.com/redis/go-redis/v9"
)

// The processes of a run: one redis-server, the Caddy nodes. Each runs in
// a process group of its own, dies with this program (Pdeathsig), and is
// killed by cleanup at the end, on error and on a signal.

var (
	liveMu sync.Mutex
	live   = map[*proc]struct{}{}
)

// proc is one child process.
type proc struct {
	name string
	cmd  *exec.Cmd
	pid  int
	log  string
	done chan struct{}
}

func startProc(name, logPath, bin string, args []string, env []string) (*proc, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p := &proc{name: name, cmd: cmd, pid: cmd.Process.Pid, log: logPath, done: make(chan struct{})}
	liveMu.Lock()
	live[p] = struct{}{}
	liveMu.Unlock()
	go func() { _ = cmd.Wait(); logf.Close(); close(p.done) }()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill kills the process group (SIGKILL) and waits (bounded) until the
// process is gone.
func (p *proc) kill() {
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		fmt.Fprintf(os.Stderr, "%s (pid %d) did not die\n", p.name, p.pid)
	}
	liveMu.Lock()
	delete(live, p)
	liveMu.Unlock()
}

// killAll kills every child still running.
func killAll() {
	liveMu.Lock()
	ps := make([]*proc, 0, len(live))
	for p := range live {
		ps = append(ps, p)
	}
	liveMu.Unlock()
	for _, p := range ps {
		p.kill()
	}
}

func logTail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// ---- redis-server ----

type redisProc struct {
	*proc
	addr string
	c    *redis.Client
}

// startRedis starts redis-server on a free loopback port, without
// persistence, and waits until it answers.
func startRedis(bin, dir string) (*redisProc, error) {
	var lastErr error
	for range 5 { // another process may take the free port first
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		args := []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir,
			"--logfile", filepath.Join(dir, "redis.log")}
		p, err := startProc("redis-server", filepath.Join(dir, "redis.stdout"), bin, args, nil)
		if err != nil {
			return nil, err
		}
		r := &redisProc{proc: p, addr: addr, c: redis.NewClient(&redis.Options{
			Addr: addr, Protocol: 2, DisableIdentity: true, MaxRetries: 1,
			DialTimeout: time.Second, ReadTimeout: 5 * time.Second, PoolSize: 4,
		})}
		deadline := time.Now().Add(5 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err = r.c.Ping(ctx).Err()
			cancel()
			if err == nil {
				return r, nil
			}
			if p.exited() || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		lastErr = fmt.Errorf("redis-server on %s: %v; log: %s", addr, err, logTail(filepath.Join(dir, "redis.log"), 3))
		_ = r.c.Close()
		p.kill()
	}
	return nil, lastErr
}

func (r *redisProc) version() string {
	s, err := r.c.Info(context.Background(), "server").Result()
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(s, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "redis_version:"); ok {
			return v
		}
	}
	return "?"
}

// cmdStats is INFO commandstats: calls of each command (lower case). It
// counts the commands scripts run (redis.call) too, not only those that
// clients send.
type cmdStats map[string]int64

func (r *redisProc) commandStats() (cmdStats, error) {
	s, err := r.c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		return nil, err
	}
	st := cmdStats{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		name, rest, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		name = strings.TrimPrefix(name, "cmdstat_")
		for _, f := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				st[name], _ = strconv.ParseInt(v, 10, 64)
			}
		}
	}
	return st, nil
}

// sub is s minus before, command by command.
func (s cmdStats) sub(before cmdStats) cmdStats {
	d := cmdStats{}
	for k, v := range s {
		if v -= before[k]; v != 0 {
			d[k] = v
		}
	}
	return d
}

// ---- CPU from /proc ----

// procCPU is utime+stime of pid (all its threads); 0 if it cannot be read.
func procCPU(pid int) time.Duration {
	d, _ := benchkit.ProcCPU(pid)
	return d
}

// loadAvg1 is the 1-minute load average.
func loadAvg1() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// cpuBusy is the machine's busy and total jiffies from /proc/stat.
func cpuBusy() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0
	}
	var idle uint64
	for i, s := range f[1:] {
		v, _ := strconv.ParseUint(s, 10, 64)
		total += v
		if i == 3 || i == 4 { // idle, iowait
			idle += v
		}
	}
	return total - idle, total
}

// ---- Caddy nodes ----

type obj = map[string]any

// node is one Caddy process: an admin API and layer4 servers, each a
// route connection_limit -> proxy to the benchmark's backend.
type node struct {
	*proc
	name   string
	admin  string
	listen map[string]string // server name -> host:port
	ids    map[string]string // fleet zone -> this node's id in the store
}

// server is one layer4 server of a node: its zone, limit and whether the
// zone is shared through the store.
type server struct {
	name  string // also the zone's name
	max   int
	fleet bool
}

func startNode(cfg *config, name string, servers []server, backend, redisAddr string) (*node, error) {
	ap, err := freePort()
	if err != nil {
		return nil, err
	}
	n := &node{name: name, admin: fmt.Sprintf("127.0.0.1:%d", ap), listen: map[string]string{}, ids: map[string]string{}}
	srvs := obj{}
	for _, s := range servers {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		n.listen[s.name] = addr
		limit := obj{"handler": "connection_limit", "max_connections": s.max, "zone": s.name}
		if cfg.release != "" {
			limit["release"] = cfg.release
		}
		if s.fleet {
			limit["store"] = obj{"backend": "redis", "address": redisAddr, "lease": cfg.lease.String()}
		}
		proxy := obj{"handler": "proxy", "upstreams": []obj{{"dial": []string{backend}}}}
		srvs[s.name] = obj{"listen": []string{addr}, "routes": []obj{{"handle": []obj{limit, proxy}}}}
	}
	conf := obj{
		"admin": obj{"listen": n.admin, "config": obj{"persist": false}},
		"logging": obj{"logs": obj{"default": obj{
			"level": "WARN", "writer": obj{"output": "stderr"},
		}}},
		"apps": obj{"layer4": obj{"servers": srvs}},
	}
	raw, _ := json.MarshalIndent(conf, "", "  ")
	file := filepath.Join(cfg.workDir, name+".json")
	if err := os.WriteFile(file, raw, 0o600); err != nil {
		return nil, err
	}
	home := filepath.Join(cfg.workDir, name+"-home")
	p, err := startProc("caddy "+name, filepath.Join(cfg.workDir, name+".log"), cfg.caddyBin,
		[]string{"run", "--config", file},
		[]string{"HOME=" + home, "XDG_DATA_HOME=" + home, "XDG_CONFIG_HOME=" + home})
	if err != nil {
		return nil, err
	}
	n.proc = p
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := n.get("/connection_limit/"); err == nil {
			break
		}
		if p.exited() || time.Now().After(deadline) {
			return nil, fmt.Errorf("node %s did not come up: %s", name, logTail(p.log, 5))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// every fleet zone registered in the store
	for _, s := range servers {
		if !s.fleet {
			continue
		}
		for {
			var v struct {
				Fleet *struct {
					Node  string `json:"node"`
					Store string `json:"store"`
				} `json:"fleet"`
			}
			b, err := n.get("/connection_limit/" + s.name)
			if err == nil && json.Unmarshal(b, &v) == nil && v.Fleet != nil && v.Fleet.Store == "registered" {
				n.ids[s.name] = v.Fleet.Node
				break
			}
			if p.exited() || time.Now().After(deadline) {
				return nil, fmt.Errorf("node %s: zone %s not registered in the store: %s %s", name, s.name, b, logTail(p.log, 5))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return n, nil
}

var httpc = &http.Client{Timeout: 30 * time.Second}

func (n *node) get(path string) ([]byte, error) {
	return benchkit.Get(httpc, "http://"+n.admin+path)
}

// hist is a Prometheus histogram: cumulative counts by upper bound.
type hist struct {
	les    []float64
	counts []float64
}

// storeHist is the node's store_seconds histogram of zone (every store
// operation of the zone: take, give, leave, renew...).
func (n *node) storeHist(zone string) hist {
	var h hist
	b, err := n.get("/metrics")
	if err != nil {
		return h
	}
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(l, "caddy_layer4_connection_limit_store_seconds_bucket{") ||
			!strings.Contains(l, `zone="`+zone+`"`) {
			continue
		}
		_, rest, ok := strings.Cut(l, `le="`)
		if !ok {
			continue
		}
		le, _, _ := strings.Cut(rest, `"`)
		f := strings.Fields(l)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		x, err := strconv.ParseFloat(le, 64)
		if le == "+Inf" {
			x, err = math.Inf(1), nil
		}
		if err == nil {
			h.les = append(h.les, x)
			h.counts = append(h.counts, v)
		}
	}
	return h
}

// add adds o's counts to h's (same buckets).
func (h hist) add(o hist) hist {
	if len(h.les) == 0 {
		return hist{les: slices.Clone(o.les), counts: slices.Clone(o.counts)}
	}
	out := hist{les: h.les, counts: slices.Clone(h.counts)}
	for i := range out.counts {
		if i < len(o.counts) {
			out.counts[i] += o.counts[i]
		}
	}
	return out
}

// sub is h minus an earlier o.
func (h hist) sub(o hist) hist {
	out := hist{les: h.les, counts: slices.Clone(h.counts)}
	for i := range out.counts {
		if i < len(o.counts) {
			out.counts[i] -= o.counts[i]
		}
	}
	return out
}

// quantile is the upper bound of the bucket holding quantile q, and the
// number of observations.
func (h hist) quantile(q float64) (float64, float64) {
	if len(h.counts) == 0 {
		return math.NaN(), 0
	}
	total := h.counts[len(h.counts)-1]
	for i, c := range h.counts {
		if total > 0 && c >= q*total {
			return h.les[i], total
		}
	}
	return math.NaN(), total
}

// storeErrors sums the node's store_errors_total.
func (n *node) storeErrors() int {
	b, err := n.get("/metrics")
	if err != nil {
		return -1
	}
	total := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "caddy_layer4_connection_limit_store_errors_total{") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			total += int(v)
		}
	}
	return total
}

// fetch saves an admin API answer to file (profiles).
func (n *node) fetch(path, file string) error {
	b, err := n.get(path)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
