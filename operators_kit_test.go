package connlimit

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// The operators' kit (examples/prometheus, examples/grafana) checked
// against a real Prometheus: the alert rules pass promtool, and every
// query of the dashboard, run by Prometheus on what it scraped from the
// examples while real clients waited, were rejected and gave up, returns
// the numbers those clients saw.

// kitTools finds prometheus and promtool; without them the test is
// skipped, except in CI (where .ci/run installs them) where it fails.
func kitTools(t *testing.T) (prometheus, promtool string) {
	t.Helper()
	var missing []string
	for _, name := range []string{"prometheus", "promtool"} {
		p, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, name)
		}
		if name == "prometheus" {
			prometheus = p
		} else {
			promtool = p
		}
	}
	if len(missing) > 0 {
		msg := strings.Join(missing, " and ") + " not on PATH (Debian: apt-get install -y prometheus; .ci/run installs it)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return prometheus, promtool
}

func TestOperatorsKit(t *testing.T) {
	prometheusBin, promtool := kitTools(t)

	// 1. The rules are valid, and their unit tests pass.
	for _, args := range [][]string{
		{"check", "rules", "examples/prometheus/alerts.yml"},
		{"test", "rules", "examples/prometheus/alerts_test.yml"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := exec.CommandContext(ctx, promtool, args...).CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	var dash kitDashboard
	raw, err := os.ReadFile("examples/grafana/connlimit.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("examples/grafana/connlimit.json: %v", err)
	}

	// 2. The examples, on free ports: examples/Caddyfile (one Caddy), and
	// the fleet of examples/fleet with a redis-server of its own.
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	port := func() string { return fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)) }
	one := kitCaddy(t, "one", "examples/Caddyfile", map[string]string{
		"localhost:2019": port(), "127.0.0.1:5433": port(), "127.0.0.1:8081": port(),
	}, "localhost:2019", "127.0.0.1:5433")
	fleetBackend := port()
	a := kitCaddy(t, "A", "examples/fleet/node-a.Caddyfile", map[string]string{
		"127.0.0.1:2021": port(), "127.0.0.1:5441": port(), "127.0.0.1:8091": fleetBackend,
	}, "127.0.0.1:2021", "127.0.0.1:5441", "CONNLIMIT_REDIS_ADDRESS="+r.Addr())
	b := kitCaddy(t, "B", "examples/fleet/node-b.Caddyfile", map[string]string{
		"127.0.0.1:2022": port(), "127.0.0.1:5442": port(), "127.0.0.1:8091": fleetBackend,
	}, "127.0.0.1:2022", "127.0.0.1:5442", "CONNLIMIT_REDIS_ADDRESS="+r.Addr())
	registered(t, "db", a, b)

	// 3. Prometheus scrapes the three admin endpoints every second, and
	// evaluates the rules every second.
	prom := startKitPrometheus(t, prometheusBin, one.admin, []string{a.admin, b.admin})
	prom.wait("every target scraped, nothing admitted yet",
		`caddy_layer4_connection_limit_admitted_total{zone="db"} == 0`, 30*time.Second,
		func(res []kitSample) bool { return len(res) == 3 })
	firstScraped := time.Now() // every target's first sample is older

	// 4. The fleet (max_connections 2 across both nodes): a waiter on B
	// is admitted when a slot frees; the fleet's line (max_waiting 2)
	// rejects one arrival on B; a waiter on A gives up; then Redis goes
	// away, both nodes run on their share (local_share 1), and Redis
	// comes back empty.
	a1 := kitOpen(t, a.listen, "a1")
	a1.answered(10 * time.Second)
	b1 := kitOpen(t, b.listen, "b1")
	b1.answered(10 * time.Second)
	a.do(http.MethodPost, "/connection_limit/db/limits", `{"max_waiting": 2}`)
	waitNodes(t, 10*time.Second, "max_waiting 2 on both nodes", "db", []*caddyProc{a, b}, func(vs []zoneDetailJSON) bool {
		return vs[0].MaxWaiting == 2 && vs[1].MaxWaiting == 2
	})
	b2 := kitOpen(t, b.listen, "b2")
	waitNodes(t, 10*time.Second, "b2 waiting in the fleet", "db", []*caddyProc{b}, func(vs []zoneDetailJSON) bool {
		return vs[0].Waiting == 1 && vs[0].Fleet != nil && vs[0].Fleet.Waiting == 1
	})
	a2 := kitOpen(t, a.listen, "a2")
	waitNodes(t, 10*time.Second, "a2 waiting in the fleet", "db", []*caddyProc{a}, func(vs []zoneDetailJSON) bool {
		return vs[0].Waiting == 1 && vs[0].Fleet != nil && vs[0].Fleet.Waiting == 2
	})
	kitOpen(t, b.listen, "b3").closedUnanswered(10 * time.Second) // the fleet's line is full
	a2.close()
	waitNodes(t, 10*time.Second, "a2 abandoned", "db", []*caddyProc{a}, func(vs []zoneDetailJSON) bool {
		return vs[0].Waiting == 0 && vs[0].Abandoned == 1
	})
	time.Sleep(time.Until(b2.opened.Add(1500 * time.Millisecond)))
	b1.close()
	if waited := b2.answered(10 * time.Second); waited < 1500*time.Millisecond {
		t.Fatalf("b2 answered after %s, before b1 left", waited)
	}
	waitNodes(t, 10*time.Second, "a1 and b2 served, nobody waiting", "db", []*caddyProc{a, b}, func(vs []zoneDetailJSON) bool {
		return vs[0].Active == 1 && vs[1].Active == 1 && vs[0].Fleet.Active == 2 && vs[1].Fleet.Active == 2 &&
			vs[0].Fleet.Waiting == 0 && vs[1].Fleet.Waiting == 0
	})
	r.Kill()
	waitNodes(t, 10*time.Second, "both nodes without their store", "db", []*caddyProc{a, b}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet.Store == "unreachable" && vs[1].Fleet.Store == "unreachable"
	})
	fleetRE := kitRegex(a.admin, b.admin)
	prom.wait("both nodes on their local share, and the store alerts pending",
		fmt.Sprintf(`caddy_layer4_connection_limit_store_mode{zone="db",mode="local_share",instance=~"%[1]s"} == 1
			and on (instance) count by (instance) (ALERTS{alertname="ConnLimitStoreUnreachable",zone="db",mode="local_share"})
			and on (instance) count by (instance) (ALERTS{alertname="ConnLimitOnLocalShare",zone="db"})`, fleetRE),
		20*time.Second, func(res []kitSample) bool { return len(res) == 2 })
	r.Restart()
	registered(t, "db", a, b)
	waitNodes(t, 10*time.Second, "the fleet's count back at 2", "db", []*caddyProc{a, b}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet.Active == 2 && vs[1].Fleet.Active == 2
	})

	// 5. One Caddy (max_connections 2): two wait 1.5 s and are admitted;
	// a waiting list made full through the limits route (max_waiting 4)
	// rejects 3 (queue_full); one waiter gives up; a wait_timeout of
	// 500ms rejects the 3 others (wait_timeout); max_waiting -1 rejects 2
	// (no_waiting); back to the example's limits, two wait while the zone
	// is paused.
	var held []*kitConn
	for _, id := range []string{"h1", "h2"} {
		c := kitOpen(t, one.listen, id)
		c.answered(10 * time.Second)
		held = append(held, c)
	}
	w1, w2 := kitOpen(t, one.listen, "w1"), kitOpen(t, one.listen, "w2")
	kitZone(t, one, "w1 and w2 waiting", func(z zoneDetailJSON) bool { return z.Active == 2 && z.Waiting == 2 })
	time.Sleep(time.Until(w2.opened.Add(1500 * time.Millisecond)))
	for _, c := range held {
		c.close()
	}
	for _, c := range []*kitConn{w1, w2} {
		if waited := c.answered(10 * time.Second); waited < 1500*time.Millisecond {
			t.Fatalf("%s answered after %s, before a slot was freed", c.name, waited)
		}
	}
	one.do(http.MethodPost, "/connection_limit/db/limits", `{"max_waiting": 4}`)
	var waiters []*kitConn
	for i := 3; i <= 6; i++ {
		waiters = append(waiters, kitOpen(t, one.listen, fmt.Sprintf("w%d", i)))
		kitZone(t, one, fmt.Sprintf("%d waiting", i-2), func(z zoneDetailJSON) bool { return z.Waiting == i-2 })
	}
	seen := map[string]int{}
	for i := 1; i <= 3; i++ {
		kitOpen(t, one.listen, fmt.Sprintf("q%d", i)).closedUnanswered(10 * time.Second)
		seen["queue_full"]++
	}
	prom.wait("the waiting list 4/4 full, its alert pending",
		fmt.Sprintf(`ALERTS{alertname="ConnLimitWaitingListFull",zone="db",instance="%s"}`, one.admin),
		20*time.Second, func(res []kitSample) bool { return len(res) == 1 })
	waiters[3].close()
	kitZone(t, one, "w6 abandoned", func(z zoneDetailJSON) bool { return z.Waiting == 3 && z.Abandoned == 1 })
	time.Sleep(time.Until(waiters[2].opened.Add(time.Second)))
	one.do(http.MethodPost, "/connection_limit/db/limits", `{"wait_timeout": "500ms"}`)
	for _, c := range waiters[:3] {
		c.closedUnanswered(10 * time.Second)
		seen["wait_timeout"]++
	}
	one.do(http.MethodPost, "/connection_limit/db/limits", `{"max_waiting": -1}`)
	for i := 1; i <= 2; i++ {
		kitOpen(t, one.listen, fmt.Sprintf("n%d", i)).closedUnanswered(10 * time.Second)
		seen["no_waiting"]++
	}
	one.do(http.MethodDelete, "/connection_limit/db/limits", "")
	kitOpen(t, one.listen, "w7")
	kitOpen(t, one.listen, "w8")
	kitZone(t, one, "w7 and w8 waiting", func(z zoneDetailJSON) bool { return z.Active == 2 && z.Waiting == 2 })
	one.do(http.MethodPost, "/connection_limit/db/pause", "")

	// What Caddy itself counted is what the clients saw.
	z := one.zone("db")
	if z.Admitted != 4 || z.Abandoned != 1 || !z.Paused || z.MaxWaiting != 100 || z.RejectedByReason["queue_full"] != uint64(seen["queue_full"]) ||
		z.RejectedByReason["wait_timeout"] != uint64(seen["wait_timeout"]) || z.RejectedByReason["no_waiting"] != uint64(seen["no_waiting"]) {
		t.Fatalf("one Caddy's zone: %+v; the clients saw rejections %v", z, seen)
	}
	za, zb := a.zone("db"), b.zone("db")
	if za.Admitted != 1 || za.Abandoned != 1 || za.Rejected != 0 || zb.Admitted != 2 || zb.Abandoned != 0 || zb.RejectedByReason["queue_full"] != 1 || zb.Rejected != 1 {
		t.Fatalf("the fleet's nodes: A %+v; B %+v", za, zb)
	}

	// 6. Prometheus has scraped the end state.
	prom.wait("the end state scraped: the zone paused, its alert pending; the fleet registered again",
		fmt.Sprintf(`(caddy_layer4_connection_limit_paused{zone="db",instance="%[1]s"} == 1
			and caddy_layer4_connection_limit_waiting{zone="db",instance="%[1]s"} == 2
			and on (instance) count by (instance) (ALERTS{alertname="ConnLimitZonePaused",zone="db",instance="%[1]s"}))
		or (caddy_layer4_connection_limit_store_mode{zone="db",mode="registered",instance=~"%[2]s"} == 1
			and on (instance) caddy_layer4_connection_limit_fleet_active{zone="db"} == 2)`, one.admin, fleetRE),
		20*time.Second, func(res []kitSample) bool { return len(res) == 3 })

	// 7. Every rule evaluates without error on the real series, and the
	// alerts that the run should have set off did, on the right series;
	// the p99 one did not (nobody waited 5 s).
	window := fmt.Sprintf("%ds", int(time.Since(prom.started).Seconds())+5)
	prom.rulesHealthy()
	for _, tc := range []struct {
		alert, by string
		want      []string
	}{
		{"ConnLimitWaitingListFull", "instance", []string{one.admin}},
		{"ConnLimitRejecting", "instance, reason", []string{one.admin + " no_waiting", one.admin + " queue_full", one.admin + " wait_timeout", b.admin + " queue_full"}},
		{"ConnLimitZonePaused", "instance", []string{one.admin}},
		{"ConnLimitStoreUnreachable", "instance, mode", []string{a.admin + " local_share", b.admin + " local_share"}},
		{"ConnLimitOnLocalShare", "instance", []string{a.admin, b.admin}},
		{"ConnLimitAbandonment", "instance", nil}, // A, 1 of 2; and one Caddy, for a while 1 of 8
		{"ConnLimitWaitP99High", "instance", []string{}},
	} {
		res := prom.query(fmt.Sprintf(`max by (%s) (max_over_time(ALERTS{alertname=%q,zone="db"}[%s]))`, tc.by, tc.alert, window))
		var got []string
		for _, s := range res {
			var parts []string
			for _, l := range strings.Split(tc.by, ", ") {
				parts = append(parts, s.Labels[l])
			}
			got = append(got, strings.Join(parts, " "))
		}
		slices.Sort(got)
		slices.Sort(tc.want)
		switch {
		case tc.want == nil: // A must be among them
			if !slices.Contains(got, a.admin) {
				t.Errorf("alert %s: set off for %v, want %s among them", tc.alert, got, a.admin)
			}
		case !slices.Equal(got, tc.want):
			t.Errorf("alert %s: set off for %v, want %v", tc.alert, got, tc.want)
		}
	}

	// 8. The dashboard's variables list the zone and the three nodes, and
	// each panel's queries, over the whole run, give what the run did.
	vars := map[string]string{}
	for _, v := range dash.Templating.List {
		if v.Type == "query" {
			vars[v.Name] = v.Definition
		}
	}
	if got := prom.labelValues(vars["zone"], nil); !slices.Contains(got, "db") {
		t.Errorf("variable zone (%s): %v, want db among them", vars["zone"], got)
	}
	wantNodes := []string{one.admin, a.admin, b.admin}
	slices.Sort(wantNodes)
	if got := prom.labelValues(vars["node"], map[string]string{"$zone": "db"}); !slices.Equal(got, wantNodes) {
		t.Errorf("variable node (%s): %v, want %v", vars["node"], got, wantNodes)
	}

	// Counts are read through rate() and increase(), which Prometheus
	// extrapolates by up to a scrape interval (kitCount): over 12 s of
	// samples or more, that tells 8 from 9.
	time.Sleep(time.Until(firstScraped.Add(14 * time.Second)))
	secs := math.Ceil(time.Since(prom.started).Seconds()) + 5
	window = fmt.Sprintf("%ds", int(secs))
	one1 := kitSelection{name: "one Caddy", node: kitRegex(one.admin), inst: []string{one.admin}}
	fleet := kitSelection{name: "the fleet", node: fleetRE, inst: []string{a.admin, b.admin}, fleet: true}
	// The counters' samples span at least this long: each target's first
	// one came before firstScraped, its last one is at most a scrape
	// interval (and a scrape's duration) old.
	span := time.Since(firstScraped).Seconds() - 2
	want := kitWant(secs, span, one1, fleet, seen)
	checked := map[string]bool{}
	inFleetRow := false
	for _, p := range dash.Panels {
		if p.Type == "row" {
			inFleetRow = strings.HasPrefix(p.Title, "Fleet")
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, sel := range []kitSelection{one1, fleet} {
			if inFleetRow && !sel.fleet {
				continue // the store's panels: fleet zones only
			}
			for _, tg := range p.Targets {
				key := p.Title + "|" + tg.RefID + "|" + sel.name
				check, ok := want[key]
				if !ok {
					t.Errorf("panel %q query %s: the test expects nothing of it for %s; add it to kitWant", p.Title, tg.RefID, sel.name)
					continue
				}
				checked[key] = true
				expr := strings.NewReplacer("$zone", "db", "$node", sel.node, "$__rate_interval", window, "$__range", window).Replace(tg.Expr)
				if strings.Contains(expr, "$") {
					t.Errorf("panel %q query %s: a variable the test does not know: %s", p.Title, tg.RefID, expr)
					continue
				}
				res := prom.query(expr)
				got := map[string]float64{}
				for _, s := range res {
					got[s.legend(tg.LegendFormat)] = s.Value
				}
				if len(got) == 0 {
					t.Errorf("panel %q query %s for %s: no series\n  %s", p.Title, tg.RefID, sel.name, expr)
					continue
				}
				for _, problem := range check(got) {
					t.Errorf("panel %q query %s for %s: %s\n  %s\n  got %v", p.Title, tg.RefID, sel.name, problem, expr, got)
				}
			}
		}
	}
	for key := range want {
		if !checked[key] {
			t.Errorf("no panel query %s (panel|query|selection) in the dashboard", key)
		}
	}
}

// kitCaddy runs one of the examples' Caddyfiles as a Caddy process, with
// the addresses in repl replaced (each must be in the file); admin and
// listen are the original addresses of its admin API and layer4 route.
func kitCaddy(t *testing.T, name, file string, repl map[string]string, admin, listen string, env ...string) *caddyProc {
	t.Helper()
	src, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	for from, to := range repl {
		if !strings.Contains(s, from) {
			t.Fatalf("%s no longer has %s: update the test", file, from)
		}
		s = strings.ReplaceAll(s, from, to)
	}
	raw, err := adaptCaddyfile(t, s)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	var cfg obj
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	level := "INFO"
	if l := os.Getenv("CONNLIMIT_TEST_LOG"); l != "" {
		level = l
	}
	cfg["logging"] = obj{"logs": obj{"default": obj{"level": level, "writer": obj{"output": "stderr"}}}}
	p := &caddyProc{t: t, name: name, admin: repl[admin], listen: repl[listen], dir: t.TempDir(), env: env}
	p.start(cfg)
	t.Cleanup(p.kill)
	return p
}

// kitZone waits until the node's zone db satisfies cond.
func kitZone(t *testing.T, p *caddyProc, what string, cond func(zoneDetailJSON) bool) {
	t.Helper()
	waitNodes(t, 10*time.Second, what, "db", []*caddyProc{p}, func(vs []zoneDetailJSON) bool { return cond(vs[0]) })
}

// kitConn is a client of the examples: one HTTP request over a raw TCP
// connection, kept open after its answer (its slot is held until close).
type kitConn struct {
	t      *testing.T
	name   string
	c      net.Conn
	br     *bufio.Reader
	opened time.Time
}

func kitOpen(t *testing.T, addr, name string) *kitConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	k := &kitConn{t: t, name: name, c: c, br: bufio.NewReader(c), opened: time.Now()}
	t.Cleanup(func() { _ = c.Close() })
	// The examples' backends are sites for 127.0.0.1: the Host must name it.
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return k
}

// answered reads the backend's answer and returns how long after opening
// it came.
func (k *kitConn) answered(within time.Duration) time.Duration {
	k.t.Helper()
	_ = k.c.SetReadDeadline(time.Now().Add(within))
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		k.t.Fatalf("%s: no answer: %v", k.name, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(k.opened)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "hello from the backend") {
		k.t.Fatalf("%s: answer %s %q", k.name, resp.Status, body)
	}
	return took
}

// closedUnanswered asserts that the connection is closed without a byte
// (rejected, no overflow).
func (k *kitConn) closedUnanswered(within time.Duration) {
	k.t.Helper()
	_ = k.c.SetReadDeadline(time.Now().Add(within))
	b, err := k.br.ReadByte()
	if err == nil {
		k.t.Fatalf("%s: got a byte (%q), want the connection closed unanswered", k.name, b)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		k.t.Fatalf("%s: still open after %s, want it closed unanswered", k.name, within)
	}
	_ = k.c.Close()
}

func (k *kitConn) close() { _ = k.c.Close() }

// kitProm is the test's own Prometheus.
type kitProm struct {
	t       *testing.T
	addr    string
	dir     string
	started time.Time
	cmd     *exec.Cmd
	done    chan struct{}
}

// startKitPrometheus starts prometheus on a free loopback port with a
// data directory of its own, scraping one (job caddy) and the fleet (job
// caddy-fleet) every second and evaluating examples/prometheus/alerts.yml
// every second. It is killed at the end of t.
func startKitPrometheus(t *testing.T, bin, one string, fleet []string) *kitProm {
	t.Helper()
	rules, err := filepath.Abs("examples/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	quote := func(addrs ...string) string { return `["` + strings.Join(addrs, `", "`) + `"]` }
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: caddy
    static_configs: [{targets: %s}]
  - job_name: caddy-fleet
    static_configs: [{targets: %s}]
`, rules, quote(one), quote(fleet...))
	var lastLog string
	for range 3 { // another process may take the free port first
		p := &kitProm{t: t, dir: t.TempDir(), addr: fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))}
		if err := os.WriteFile(filepath.Join(p.dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		logf, err := os.Create(filepath.Join(p.dir, "prometheus.log"))
		if err != nil {
			t.Fatal(err)
		}
		p.cmd = exec.Command(bin,
			"--config.file="+filepath.Join(p.dir, "prometheus.yml"),
			"--storage.tsdb.path="+filepath.Join(p.dir, "data"),
			"--web.listen-address="+p.addr)
		p.cmd.Dir = p.dir
		p.cmd.Stdout, p.cmd.Stderr = logf, logf
		p.started = time.Now()
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p.done = make(chan struct{})
		go func() { _ = p.cmd.Wait(); logf.Close(); close(p.done) }()
		t.Cleanup(p.kill)
		if p.ready(30 * time.Second) {
			return p
		}
		p.kill()
		lastLog = p.log()
	}
	t.Fatalf("prometheus did not start:\n%s", testkit.Tail(lastLog, 3000))
	return nil
}

// ready waits until Prometheus answers /-/ready, or exits.
func (p *kitProm) ready(within time.Duration) bool {
	deadline := time.Now().Add(within)
	c := http.Client{Timeout: 2 * time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return false
		default:
		}
		if resp, err := c.Get("http://" + p.addr + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return true
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

func (p *kitProm) log() string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "prometheus.log"))
	return string(b)
}

func (p *kitProm) kill() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.t.Errorf("prometheus (pid %d) did not die", p.cmd.Process.Pid)
	}
}

// get asks Prometheus' HTTP API and decodes its data.
func (p *kitProm) get(path string, q url.Values, data any) {
	p.t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + p.addr + path + "?" + q.Encode())
	if err != nil {
		p.t.Fatalf("prometheus %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var env struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil || env.Status != "success" {
		p.t.Fatalf("prometheus %s %v: %d %s", path, q, resp.StatusCode, body)
	}
	if err := json.Unmarshal(env.Data, data); err != nil {
		p.t.Fatalf("prometheus %s: %v: %s", path, err, env.Data)
	}
}

// kitSample is one series of an instant query's result.
type kitSample struct {
	Labels map[string]string
	Value  float64
}

// legend renders a Grafana legend format ({{label}}) for s.
func (s kitSample) legend(format string) string {
	out := regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`).ReplaceAllStringFunc(format, func(m string) string {
		return s.Labels[strings.Trim(m, "{} ")]
	})
	return strings.Join(strings.Fields(out), " ")
}

// query runs an instant query now; its result must be a vector.
func (p *kitProm) query(expr string) []kitSample {
	p.t.Helper()
	var data struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	}
	p.get("/api/v1/query", url.Values{"query": {expr}}, &data)
	if data.ResultType != "vector" {
		p.t.Fatalf("query %s: a %s, want a vector", expr, data.ResultType)
	}
	var out []kitSample
	for _, r := range data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64) // also NaN, +Inf
		if err != nil {
			p.t.Fatalf("query %s: value %q", expr, s)
		}
		out = append(out, kitSample{Labels: r.Metric, Value: v})
	}
	return out
}

// wait runs expr until cond holds for its result.
func (p *kitProm) wait(what, expr string, within time.Duration, cond func([]kitSample) bool) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for {
		res := p.query(expr)
		if cond(res) {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("prometheus: timed out after %s waiting for %s; %s gives %v", within, what, expr, res)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// labelValues evaluates a Grafana label_values(<selector>, <label>)
// variable query, with the variables in vars replaced.
func (p *kitProm) labelValues(def string, vars map[string]string) []string {
	p.t.Helper()
	m := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`).FindStringSubmatch(strings.TrimSpace(def))
	if m == nil {
		p.t.Fatalf("variable query %q is not label_values(<selector>, <label>)", def)
	}
	sel := m[1]
	for k, v := range vars {
		sel = strings.ReplaceAll(sel, k, v)
	}
	var values []string
	p.get("/api/v1/label/"+m[2]+"/values", url.Values{"match[]": {sel}}, &values)
	slices.Sort(values)
	return values
}

// rulesHealthy asserts that Prometheus loaded every rule of alerts.yml
// and evaluates each without error.
func (p *kitProm) rulesHealthy() {
	p.t.Helper()
	var data struct {
		Groups []struct {
			Rules []struct {
				Name      string `json:"name"`
				Health    string `json:"health"`
				LastError string `json:"lastError"`
				Type      string `json:"type"`
			} `json:"rules"`
		} `json:"groups"`
	}
	p.get("/api/v1/rules", url.Values{}, &data)
	n := 0
	for _, g := range data.Groups {
		for _, r := range g.Rules {
			n++
			if r.Health != "ok" || r.LastError != "" {
				p.t.Errorf("rule %s: health %q, last error %q", r.Name, r.Health, r.LastError)
			}
		}
	}
	if n != 7 {
		p.t.Errorf("prometheus loaded %d rules from alerts.yml, want 7", n)
	}
}

// kitDashboard is what the test reads of the Grafana dashboard.
type kitDashboard struct {
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Type    string `json:"type"`
		Title   string `json:"title"`
		Targets []struct {
			RefID        string `json:"refId"`
			Expr         string `json:"expr"`
			LegendFormat string `json:"legendFormat"`
		} `json:"targets"`
	} `json:"panels"`
}

// kitRegex is what Grafana puts in a Prometheus query for a variable with
// these values selected: their regular expression, escaped for a PromQL
// string.
func kitRegex(values ...string) string {
	var quoted []string
	for _, v := range values {
		quoted = append(quoted, strings.ReplaceAll(regexp.QuoteMeta(v), `\`, `\\`))
	}
	if len(quoted) == 1 {
		return quoted[0]
	}
	return "(" + strings.Join(quoted, "|") + ")"
}

// kitSelection is a value of the dashboard's node variable.
type kitSelection struct {
	name  string
	node  string // kitRegex of inst
	inst  []string
	fleet bool
}

// kitCheck returns what is wrong with one query's result, keyed by the
// rendered legend.
type kitCheck func(got map[string]float64) []string

// kitExpect is one series' value check.
type kitExpect struct {
	desc string
	ok   func(float64) bool
}

func kitEq(want float64) kitExpect {
	return kitExpect{fmt.Sprintf("= %v", want), func(v float64) bool { return v == want }}
}

// kitCount: a count read through rate() or increase() over a range that
// holds every sample of a counter that starts at 0. Prometheus does not
// extrapolate such a counter before its first sample, and extrapolates
// the increase from its last sample to the end of the range, at most 1.1
// scrape intervals (1s here) over the span of its samples (at least span
// seconds): it reads v with want ≤ v ≤ want × (1 + 1.1/span), which tells
// one count from the next for the counts here.
func kitCount(want, span float64) kitExpect {
	hi := want * (1 + 1.1/max(span, 1))
	return kitExpect{fmt.Sprintf("≈ %v (in [%v, %.3f])", want, want, hi), func(v float64) bool { return v >= want-1e-9 && v <= hi+1e-9 }}
}

func kitIn(lo, hi float64) kitExpect {
	return kitExpect{fmt.Sprintf("in (%v, %v]", lo, hi), func(v float64) bool { return v > lo && v <= hi }}
}

// kitExact: exactly these series, each passing its check.
func kitExact(want map[string]kitExpect) kitCheck {
	return func(got map[string]float64) []string {
		var problems []string
		for k, e := range want {
			v, ok := got[k]
			switch {
			case !ok:
				problems = append(problems, fmt.Sprintf("no series %q", k))
			case !e.ok(v):
				problems = append(problems, fmt.Sprintf("%q = %v, want %s", k, v, e.desc))
			}
		}
		for k := range got {
			if _, ok := want[k]; !ok {
				problems = append(problems, fmt.Sprintf("unexpected series %q", k))
			}
		}
		return problems
	}
}

// kitRate: a rate over the run (a range secs long) that should count
// want (see kitCount).
func kitRate(secs, span float64, want map[string]float64) kitCheck {
	m := map[string]kitExpect{}
	for k, n := range want {
		e := kitCount(n, span)
		m[k] = kitExpect{e.desc + " over the run", func(v float64) bool { return e.ok(v * secs) }}
	}
	return kitExact(m)
}

// kitWant is what each panel's query should give over the run, by
// "panel title|refId|selection".
func kitWant(secs, span float64, one, fleet kitSelection, seen map[string]int) map[string]kitCheck {
	o := one.inst[0]
	a, b := fleet.inst[0], fleet.inst[1]
	k := func(parts ...string) string { return strings.Join(parts, " ") }
	w := map[string]kitCheck{}
	set := func(title, ref string, sel kitSelection, c kitCheck) { w[title+"|"+ref+"|"+sel.name] = c }
	eq := func(pairs ...any) kitCheck {
		m := map[string]kitExpect{}
		for i := 0; i < len(pairs); i += 2 {
			m[pairs[i].(string)] = kitEq(float64(pairs[i+1].(int)))
		}
		return kitExact(m)
	}
	// heatmap: wait_seconds buckets over the run, cumulative: immediate
	// admissions in the first (100 µs), those that waited 1.5 s above 1 s.
	heat := func(atOnce, waited float64) kitCheck {
		return func(got map[string]float64) []string {
			var problems []string
			for le, n := range map[string]float64{"0.0001": atOnce, "1": atOnce, "30": atOnce + waited, "+Inf": atOnce + waited} {
				if e := kitCount(n, span); !e.ok(got[le]) {
					problems = append(problems, fmt.Sprintf("bucket le=%s = %v, want %s", le, got[le], e.desc))
				}
			}
			if len(got) != 19 {
				problems = append(problems, fmt.Sprintf("%d buckets, want 19", len(got)))
			}
			return problems
		}
	}

	// One Caddy: h1 h2 admitted at once, w1 w2 after 1.5 s; w7 w8 waiting
	// at the end, the zone paused, the example's limits back.
	set("Active against max", "A", one, eq(k("db", o, "active"), 2))
	set("Active against max", "B", one, eq(k("db", o, "max_connections"), 2))
	set("Waiting against max_waiting", "A", one, eq(k("db", o, "waiting"), 2))
	set("Waiting against max_waiting", "B", one, eq(k("db", o, "max_waiting"), 100))
	set("Admitted, rejected, abandoned per second", "A", one, kitRate(secs, span, map[string]float64{k("db", o, "admitted"): 4}))
	set("Admitted, rejected, abandoned per second", "B", one, kitRate(secs, span, map[string]float64{k("db", o, "rejected"): float64(seen["queue_full"] + seen["wait_timeout"] + seen["no_waiting"])}))
	set("Admitted, rejected, abandoned per second", "C", one, kitRate(secs, span, map[string]float64{k("db", o, "abandoned"): 1}))
	byReason := map[string]float64{}
	for _, r := range []string{"queue_full", "wait_timeout", "no_waiting"} {
		byReason[k("db", o, r)] = float64(seen[r])
	}
	set("Rejections per second, by reason", "A", one, kitRate(secs, span, byReason))
	set("Rejected in the time range, by reason", "A", one, kitRate(1, span, byReason))
	set("Wait time (heatmap)", "A", one, heat(2, 2))
	set("Wait time p50 / p99", "A", one, kitExact(map[string]kitExpect{"db p50": kitIn(0, 0.0001)}))
	set("Wait time p50 / p99", "B", one, kitExact(map[string]kitExpect{"db p99": kitIn(1, 30)}))
	set("Paused, limits overridden", "A", one, eq(k("db", o, "paused"), 1))
	set("Paused, limits overridden", "B", one, eq(k("db", o, "limits overridden"), 0))

	// The fleet: A admitted a1 at once, its waiter a2 gave up; B admitted
	// b1 at once and b2 after 1.5 s, and the fleet's line rejected b3. A
	// set max_waiting 2 for the fleet (an override on A). Both lost Redis
	// for a while, and are registered again.
	set("Active against max", "A", fleet, eq(k("db", a, "active"), 1, k("db", b, "active"), 1))
	set("Active against max", "B", fleet, eq(k("db", a, "max_connections"), 2, k("db", b, "max_connections"), 2))
	set("Waiting against max_waiting", "A", fleet, eq(k("db", a, "waiting"), 0, k("db", b, "waiting"), 0))
	set("Waiting against max_waiting", "B", fleet, eq(k("db", a, "max_waiting"), 2, k("db", b, "max_waiting"), 2))
	set("Admitted, rejected, abandoned per second", "A", fleet, kitRate(secs, span, map[string]float64{k("db", a, "admitted"): 1, k("db", b, "admitted"): 2}))
	set("Admitted, rejected, abandoned per second", "B", fleet, kitRate(secs, span, map[string]float64{k("db", a, "rejected"): 0, k("db", b, "rejected"): 1}))
	set("Admitted, rejected, abandoned per second", "C", fleet, kitRate(secs, span, map[string]float64{k("db", a, "abandoned"): 1, k("db", b, "abandoned"): 0}))
	fleetReasons := map[string]float64{}
	for _, n := range []string{a, b} {
		for _, r := range []string{"queue_full", "wait_timeout", "no_waiting"} {
			fleetReasons[k("db", n, r)] = 0
		}
	}
	fleetReasons[k("db", b, "queue_full")] = 1
	set("Rejections per second, by reason", "A", fleet, kitRate(secs, span, fleetReasons))
	set("Rejected in the time range, by reason", "A", fleet, kitRate(1, span, fleetReasons))
	set("Wait time (heatmap)", "A", fleet, heat(2, 1))
	set("Wait time p50 / p99", "A", fleet, kitExact(map[string]kitExpect{"db p50": kitIn(0, 0.0001)}))
	set("Wait time p50 / p99", "B", fleet, kitExact(map[string]kitExpect{"db p99": kitIn(1, 30)}))
	set("Paused, limits overridden", "A", fleet, eq(k("db", a, "paused"), 0, k("db", b, "paused"), 0))
	set("Paused, limits overridden", "B", fleet, eq(k("db", a, "limits overridden"), 1, k("db", b, "limits overridden"), 0))
	set("Store reachability", "A", fleet, eq(k("db", a, "reachable"), 1, k("db", b, "reachable"), 1))
	set("Store reachability", "B", fleet, eq(k("db", a, "registered"), 1, k("db", b, "registered"), 1))
	set("Store errors per second, by operation", "A", fleet, func(got map[string]float64) []string {
		// Redis was gone for a while: each node counted failed operations.
		var problems []string
		for _, n := range []string{a, b} {
			failed := 0.0
			for key, v := range got {
				if strings.HasPrefix(key, k("db", n)+" ") {
					failed += v * secs
				}
			}
			if failed < 1 {
				problems = append(problems, fmt.Sprintf("node %s: %v failed store operations over the run, want at least 1", n, failed))
			}
		}
		return problems
	})
	rt := func(q string) kitCheck {
		// round trips on loopback, bounded at 2 s each
		return kitExact(map[string]kitExpect{k("db", a, q): kitIn(0, 2.5), k("db", b, q): kitIn(0, 2.5)})
	}
	set("Store round trip p50 / p99", "A", fleet, rt("p50"))
	set("Store round trip p50 / p99", "B", fleet, rt("p99"))
	set("Fleet totals against each node's share", "A", fleet, eq("db fleet active", 2))
	set("Fleet totals against each node's share", "B", fleet, eq("db fleet waiting", 0))
	set("Fleet totals against each node's share", "C", fleet, eq("db fleet max_connections", 2))
	set("Fleet totals against each node's share", "D", fleet, eq(k("db", a, "active"), 1, k("db", b, "active"), 1))
	// local_share 1 in the example's store
	set("Fleet totals against each node's share", "E", fleet, eq(k("db", a, "local_share"), 1, k("db", b, "local_share"), 1))
	return w
}
