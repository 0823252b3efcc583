package connlimit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/spf13/cobra"
)

// The `caddy connection-limit` command, run against the real in-process
// Caddy (admin API on a free port) with real clients waiting.

// runCLI runs `caddy connection-limit args...` in-process as Caddy's CLI
// builds it (caddycmd turns a Command into a cobra command the same way),
// and returns what it printed and its error.
func runCLI(t *testing.T, ctx context.Context, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	spec, ok := caddycmd.Commands()["connection-limit"]
	if !ok {
		t.Fatal("connection-limit is not registered with caddycmd")
	}
	root := &cobra.Command{Use: "caddy", SilenceUsage: true, SilenceErrors: true}
	cmd := &cobra.Command{Use: spec.Name + " " + spec.Usage, Short: spec.Short, Long: spec.Long}
	spec.CobraFunc(cmd)
	root.AddCommand(cmd)
	root.SetArgs(append([]string{spec.Name}, args...))
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	if ctx == nil {
		ctx = context.Background()
	}
	err = root.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

// cliRow finds the line of zone name in a table the command printed and
// returns its cells (columns are two or more spaces apart).
func cliRow(t *testing.T, out, name string) []string {
	t.Helper()
	cells, ok := tableRow(out, name)
	if !ok {
		t.Fatalf("no line for zone %q in:\n%s", name, out)
	}
	return cells
}

var columnGap = regexp.MustCompile(`\s{2,}`)

func tableRow(out, name string) ([]string, bool) {
	for _, line := range strings.Split(out, "\n") {
		cells := columnGap.Split(strings.TrimSpace(line), -1)
		if cells[0] == name {
			return cells, true
		}
	}
	return nil, false
}

// rowByColumn is zone name's line in out, cell by column name.
func rowByColumn(out, name string) (map[string]string, bool) {
	header, ok1 := tableRow(out, "ZONE")
	cells, ok2 := tableRow(out, name)
	if !ok1 || !ok2 || len(header) != len(cells) {
		return nil, false
	}
	m := make(map[string]string, len(cells))
	for i, col := range header {
		m[col] = cells[i]
	}
	return m, true
}

// expectRow checks a zone's line: want maps column names to cells ("*"
// for any value but "-").
func expectRow(t *testing.T, out, name string, want map[string]string) {
	t.Helper()
	cells := cliRow(t, out, name)
	header := cliRow(t, out, "ZONE")
	if len(cells) != len(header) {
		t.Fatalf("zone %s: %d cells %q under %d columns %q", name, len(cells), cells, len(header), header)
	}
	for i, col := range header {
		w, ok := want[col]
		if !ok {
			continue
		}
		if (w == "*" && cells[i] == "-") || (w != "*" && cells[i] != w) {
			t.Errorf("zone %s, %s = %q, want %q\n%s", name, col, cells[i], w, out)
		}
	}
}

// cliSetup runs Caddy with two zones, A (2 slots, up to 3 waiting) and B
// (1 slot, nobody waits), on listenA and listenB in front of one gated
// backend, and returns the admin address and the zone names.
type cliSetup struct {
	admin, listenA, listenB string
	a, b                    string
	be                      *backend
}

func newCLISetup(t *testing.T, adminFields func(admin string) obj) *cliSetup {
	t.Helper()
	s := &cliSetup{
		admin:   fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		listenA: fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		listenB: fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		// Counters live as long as the process: zones of their own.
		a:  fmt.Sprintf("cliA%d", time.Now().UnixNano()),
		b:  fmt.Sprintf("cliB%d", time.Now().UnixNano()),
		be: newBackend(t, true),
	}
	cfg := l4Config(s.admin, s.listenA, limit(obj{"zone": s.a, "max_connections": 2, "max_waiting": 3}), proxyTo(s.be.addr()))
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	servers["second"] = obj{"listen": []string{s.listenB}, "routes": []obj{{"handle": []obj{
		limit(obj{"zone": s.b, "max_connections": 1, "max_waiting": -1}), proxyTo(s.be.addr()),
	}}}}
	if adminFields != nil {
		for k, v := range adminFields(s.admin) {
			cfg["admin"].(obj)[k] = v
		}
	}
	loadConfig(t, cfg)
	t.Cleanup(func() { stopCaddy(t) })
	return s
}

func rejectedClient(t *testing.T, addr, id string) {
	t.Helper()
	c := dial(t, addr, id)
	c.hello("")
	c.expectClosed(5 * time.Second)
}

// fill gives zone A two holders and waiters w1, w2, w3 (in that order,
// after one rejected because the list was full and one that left), and
// zone B a holder and one rejected because nobody may wait. It returns
// the clients by name.
func (s *cliSetup) fill(t *testing.T) map[string]*client {
	t.Helper()
	cs := map[string]*client{}
	cs["h1"] = takeSlot(t, s.be, s.listenA, "h1")
	cs["h2"] = takeSlot(t, s.be, s.listenA, "h2")
	for i, id := range []string{"w1", "w2", "gone"} {
		cs[id] = dial(t, s.listenA, id)
		cs[id].hello("")
		waitCounts(t, s.a, 2, i+1)
	}
	rejectedClient(t, s.listenA, "full")
	_ = cs["gone"].conn.Close() // abandoned
	delete(cs, "gone")
	waitCounts(t, s.a, 2, 2)
	cs["w3"] = dial(t, s.listenA, "w3")
	cs["w3"].hello("")
	waitCounts(t, s.a, 2, 3)

	cs["b1"] = takeSlot(t, s.be, s.listenB, "b1")
	rejectedClient(t, s.listenB, "nowait")
	return cs
}

func TestCommandStatus(t *testing.T) {
	s := newCLISetup(t, nil)
	s.fill(t)

	for _, args := range [][]string{{}, {"status"}} {
		start := time.Now()
		out, _, err := runCLI(t, nil, append(args, "--address", s.admin)...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		if took := time.Since(start); took < sampleWindow {
			t.Errorf("%v took %s: the rates need two samples %s apart", args, took, sampleWindow)
		}
		header := strings.Join(cliRow(t, out, "ZONE"), " | ")
		if header != "ZONE | ACTIVE | WAITING | OLDEST WAIT | ADMITTED/S | REJECTED/S | REJECTED | ABANDONED | PAUSED" {
			t.Errorf("header %q", header)
		}
		// Nothing came or went during the sample: the rates are 0.
		expectRow(t, out, s.a, map[string]string{
			"ACTIVE": "2/2", "WAITING": "3/3", "OLDEST WAIT": "*", "ADMITTED/S": "0.0", "REJECTED/S": "0.0",
			"REJECTED": "1 (queue_full 1)", "ABANDONED": "1", "PAUSED": "no",
		})
		expectRow(t, out, s.b, map[string]string{
			"ACTIVE": "1/1", "WAITING": "0/0", "OLDEST WAIT": "-", "ADMITTED/S": "0.0", "REJECTED/S": "0.0",
			"REJECTED": "1 (no_waiting 1)", "ABANDONED": "0", "PAUSED": "no",
		})
	}

	// --json: the admin API's document, as it came.
	out, _, err := runCLI(t, nil, "--json", "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Zones []map[string]any `json:"zones"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("--json printed %q: %v", out, err)
	}
	found := false
	for _, z := range list.Zones {
		if z["zone"] == s.a {
			found = z["active"] == 2.0 && z["waiting"] == 3.0 && z["abandoned"] == 1.0
		}
	}
	if !found {
		t.Errorf("--json: zone %s with 2 active, 3 waiting, 1 abandoned not in %s", s.a, out)
	}

	// --config finds the admin address as `caddy stop` does.
	cfgFile := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(cfgFile, []byte(fmt.Sprintf(`{"admin": {"listen": %q}}`, s.admin)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err = runCLI(t, nil, "--config", cfgFile)
	if err != nil {
		t.Fatalf("--config: %v", err)
	}
	expectRow(t, out, s.a, map[string]string{"ACTIVE": "2/2", "WAITING": "3/3"})
}

// The rates are the counters' change between two samples of the real
// admin API, over the time between them.
func TestCommandRates(t *testing.T) {
	s := newCLISetup(t, nil)
	cs := s.fill(t)
	c, err := newAdminClient(s.admin)
	if err != nil {
		t.Fatal(err)
	}
	v := &view{client: c}
	ctx := context.Background()
	first, err := v.fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	finish(s.be, cs["h1"]) // w1 is admitted
	if id := s.be.waitArrivals(1, 5*time.Second)[0]; id != "w1" {
		t.Fatalf("%s admitted, want w1", id)
	}
	rejectedClient(t, s.listenB, "nowait2")
	rejectedClient(t, s.listenB, "nowait3")
	time.Sleep(100 * time.Millisecond)
	second, err := v.fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dt := second.at.Sub(first.at).Seconds()
	out := strings.Join(v.render(first, second), "\n")
	expectRow(t, out, s.a, map[string]string{
		"ACTIVE": "2/2", "WAITING": "2/3", "ADMITTED/S": fmt.Sprintf("%.1f", 1/dt), "REJECTED/S": "0.0",
	})
	expectRow(t, out, s.b, map[string]string{
		"ADMITTED/S": "0.0", "REJECTED/S": fmt.Sprintf("%.1f", 2/dt), "REJECTED": "3 (no_waiting 3)",
	})
	// Without a first sample there are no rates.
	expectRow(t, strings.Join(v.render(nil, second), "\n"), s.a, map[string]string{"ADMITTED/S": "-", "REJECTED/S": "-"})
}

func TestCommandZoneWaiters(t *testing.T) {
	s := newCLISetup(t, nil)
	cs := s.fill(t)
	addrOf := func(id string) string { return cs[id].conn.LocalAddr().String() }

	out, _, err := runCLI(t, nil, "status", s.a, "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("zone %s: max_connections 2, max_waiting 3, wait_timeout none, order fifo", s.a); !strings.HasPrefix(out, want+"\n") {
		t.Errorf("first line is not %q:\n%s", want, out)
	}
	expectRow(t, out, s.a, map[string]string{"ACTIVE": "2/2", "WAITING": "3/3", "ABANDONED": "1"})
	if !strings.Contains(out, "longest waiters (3 of 3 waiting):") {
		t.Errorf("no waiters heading:\n%s", out)
	}
	// Longest first: w1, w2, w3.
	_, after, _ := strings.Cut(out, "WAITED")
	var got []string
	for _, line := range strings.Split(after, "\n")[1:] {
		if f := strings.Fields(line); len(f) == 4 {
			got = append(got, f[1])
		}
	}
	if want := []string{addrOf("w1"), addrOf("w2"), addrOf("w3")}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("waiters %v, want w1 w2 w3 = %v:\n%s", got, want, out)
	}

	out, _, err = runCLI(t, nil, "status", s.a, "--waiters", "1", "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "longest waiters (1 of 3 waiting):") || !strings.Contains(out, addrOf("w1")) || strings.Contains(out, addrOf("w2")) {
		t.Errorf("--waiters 1 does not show w1 alone:\n%s", out)
	}
}

func TestCommandPauseResume(t *testing.T) {
	s := newCLISetup(t, nil)
	cs := s.fill(t)

	out, _, err := runCLI(t, nil, "pause", s.a, "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("zone %s paused: 2/2 active, 3/3 waiting; nobody new is admitted until 'caddy connection-limit resume %s'\n", s.a, s.a); out != want {
		t.Errorf("pause printed %q, want %q", out, want)
	}
	finish(s.be, cs["h1"])
	waitCounts(t, s.a, 1, 3)
	s.be.noArrival(200 * time.Millisecond)
	out, _, err = runCLI(t, nil, "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	expectRow(t, out, s.a, map[string]string{"ACTIVE": "1/2", "WAITING": "3/3", "PAUSED": "yes"})
	expectRow(t, out, s.b, map[string]string{"PAUSED": "no"})

	out, _, err = runCLI(t, nil, "resume", s.a, "--json", "--address", s.admin)
	if err != nil {
		t.Fatal(err)
	}
	var z map[string]any
	if err := json.Unmarshal([]byte(out), &z); err != nil || z["paused"] != false || z["zone"] != s.a {
		t.Errorf("resume --json printed %q (%v)", out, err)
	}
	if id := s.be.waitArrivals(1, 5*time.Second)[0]; id != "w1" {
		t.Fatalf("%s admitted after resume, want w1", id)
	}
}

// Errors say what is wrong in words, with the address or the zones.
func TestCommandErrors(t *testing.T) {
	t.Run("not running", func(t *testing.T) {
		addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
		_, _, err := runCLI(t, nil, "--address", addr)
		if err == nil || !strings.Contains(err.Error(), "cannot reach Caddy's admin API at "+addr+" (tcp "+addr+")") ||
			!strings.Contains(err.Error(), "Is Caddy running") {
			t.Errorf("error %v", err)
		}
	})

	s := newCLISetup(t, nil)
	t.Run("no such zone", func(t *testing.T) {
		for _, args := range [][]string{{"status", "nonesuch"}, {"pause", "nonesuch"}, {"resume", "nonesuch"}} {
			_, _, err := runCLI(t, nil, append(args, "--address", s.admin)...)
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf(`no zone "nonesuch" in the Caddy at %s; its zones: `, s.admin)) ||
				!strings.Contains(err.Error(), s.a) || !strings.Contains(err.Error(), s.b) {
				t.Errorf("%v: error %v", args, err)
			}
		}
	})
	t.Run("arguments", func(t *testing.T) {
		for args, want := range map[string]string{
			"pause":                   "accepts 1 arg(s), received 0",
			"status a b":              `one zone at a time: "a" and "b"`,
			"status --watch=10ms":     "interval 10ms: at least 100ms",
			"status --watch=soon":     `interval "soon"`,
			"--address 127.0.0.1:1-9": "invalid admin address 127.0.0.1:1-9",
		} {
			_, _, err := runCLI(t, nil, strings.Fields(args)...)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %v, want it to say %q", args, err, want)
			}
		}
	})

	// The admin API only takes requests from the origins it allows.
	t.Run("origin rejected", func(t *testing.T) {
		s := newCLISetup(t, func(admin string) obj { return obj{"origins": []string{"https://" + admin}} })
		_, _, err := runCLI(t, nil, "--address", s.admin)
		origin := "http://" + s.admin
		if err == nil || !strings.Contains(err.Error(), "the admin API at "+s.admin+" rejected the request: client is not allowed to access from origin '"+origin+"'") ||
			!strings.Contains(err.Error(), "add "+origin+" to its admin \"origins\"") {
			t.Errorf("error %v", err)
		}
	})
}

// --watch on something that is not a terminal prints one view after the
// other; with --json, one document a line.
func TestCommandWatchNotATerminal(t *testing.T) {
	s := newCLISetup(t, nil)
	s.fill(t)
	for _, jsonOut := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(context.Background(), 1100*time.Millisecond)
		args := []string{"--watch", "300ms", "--address", s.admin}
		if jsonOut {
			args = append(args, "--json")
		}
		out, _, err := runCLI(t, ctx, args...)
		cancel()
		if err != nil {
			t.Fatalf("--json %v: %v", jsonOut, err)
		}
		if strings.Contains(out, "\x1b") {
			t.Errorf("escape sequences in %q", out)
		}
		if jsonOut {
			lines := strings.Split(strings.TrimSpace(out), "\n")
			for _, l := range lines {
				if !json.Valid([]byte(l)) {
					t.Errorf("not a JSON document: %q", l)
				}
			}
			if len(lines) < 2 || len(lines) > 5 {
				t.Errorf("%d documents in 1.1s every 300ms:\n%s", len(lines), out)
			}
			continue
		}
		views := strings.Split(out, "\n\ncaddy connection-limit: ")
		if n := strings.Count(out, "\nZONE  "); n != len(views) || n < 2 || n > 5 {
			t.Errorf("%d headers, %d views in 1.1s every 300ms:\n%s", n, len(views), out)
		}
		expectRow(t, views[0], s.a, map[string]string{"ADMITTED/S": "-", "WAITING": "3/3"})
		expectRow(t, views[len(views)-1], s.a, map[string]string{"ADMITTED/S": "0.0", "WAITING": "3/3"})
	}
	// A bare --watch and the interval as a word of its own.
	w := &watchFlag{}
	_ = w.Set(defaultWatch.String())
	if zone, err := zoneAndInterval([]string{"db", "2s"}, w); err != nil || zone != "db" || w.interval != 2*time.Second {
		t.Errorf(`"db 2s" after a bare --watch: zone %q, interval %s, %v`, zone, w.interval, err)
	}
	if zone, err := zoneAndInterval([]string{"2s"}, &watchFlag{}); err != nil || zone != "2s" {
		t.Errorf(`"2s" without --watch: zone %q, %v`, zone, err)
	}
}

// A fleet zone's totals (the "fleet" object of the zone's JSON) are
// printed under its line.
func TestCommandFleetTotals(t *testing.T) {
	s := newCLISetup(t, nil)
	c, err := newAdminClient(s.admin)
	if err != nil {
		t.Fatal(err)
	}
	v := &view{client: c}
	smp, err := v.fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The admin API's own document, with fleet totals added to zone A.
	var doc map[string][]map[string]any
	if err := json.Unmarshal(smp.raw, &doc); err != nil {
		t.Fatal(err)
	}
	for _, z := range doc["zones"] {
		if z["zone"] == s.a {
			z["fleet"] = map[string]any{"node": "n1", "store": "registered", "active": 5, "waiting": 7, "node_count": 3}
		}
	}
	raw, _ := json.Marshal(doc)
	var list struct{ Zones []zoneInfo }
	if err := json.Unmarshal(raw, &list); err != nil {
		t.Fatal(err)
	}
	out := strings.Join(zoneTable(nil, &sample{zones: list.Zones}, list.Zones), "\n")
	_, after, _ := strings.Cut(out, "\n"+s.a+" ")
	lines := strings.Split(after, "\n")
	if len(lines) < 2 || lines[1] != "  fleet: 5 active, 7 waiting on 3 nodes; store registered" {
		t.Errorf("no fleet line under zone %s:\n%s", s.a, out)
	}
	if strings.Count(out, "fleet:") != 1 {
		t.Errorf("fleet lines for zones without fleet totals:\n%s", out)
	}
}

// In a zone with a key the limits are per key value: the zone's counts
// above them are marked, and the mark explained.
func TestCommandPerKeyZone(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	zone := fmt.Sprintf("cliK%d", time.Now().UnixNano())
	loadConfig(t, l4Config(admin, listen, limit(obj{"zone": zone, "max_connections": 1, "max_waiting": 1, "key": "{l4.conn.remote_ip}"}), proxyTo(be.addr())))
	defer stopCaddy(t)
	for i, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		c := dialFrom(t, ip, listen, "h"+ip)
		c.hello("")
		be.waitArrivals(1, 5*time.Second)
		w := dialFrom(t, ip, listen, "w"+ip)
		w.hello("")
		waitCounts(t, zone, i+1, i+1)
		r := dialFrom(t, ip, listen, "r"+ip) // the list of each IP holds one
		r.hello("")
		r.expectClosed(5 * time.Second)
	}
	out, _, err := runCLI(t, nil, "--address", admin)
	if err != nil {
		t.Fatal(err)
	}
	expectRow(t, out, zone, map[string]string{"ACTIVE": "2/1*", "WAITING": "2/1*", "REJECTED": "2 (queue_full 2)"})
	if !strings.Contains(out, "\n* more than the limit: the zone has a key, and its limits apply to each key value\n") {
		t.Errorf("no footnote for the marks:\n%s", out)
	}
}
