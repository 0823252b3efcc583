package connlimit

// Fuzz tests (issue 10, part 4): the Caddyfile parser, JSON provisioning,
// the admin API and the replay of a waiting UDP flow's datagrams. Each
// runs its seed corpus as an ordinary test in `go test`; .ci/run fuzzes
// each for a few seconds, e.g.
//
//	go test -run '^$' -fuzz '^FuzzCaddyfile$' -fuzztime 15s .
//
// They reach into the package as little as they can (the package's
// non-test files are being reorganised): the Caddyfile and JSON targets
// go through Caddy's own entry points, the admin target through the
// routes AdminAPI hands Caddy.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// fuzzTimeout bounds one input's run: past it, the input hangs.
const fuzzTimeout = 10 * time.Second

// within runs f and fails t if it panics or does not return in time. (A
// goroutine that hangs is left behind: the run has failed anyway.)
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan string, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Sprintf("panic: %v\n%s", r, debug.Stack())
				return
			}
			done <- ""
		}()
		f()
	}()
	select {
	case p := <-done:
		if p != "" {
			t.Fatalf("%s: %s", what, p)
		}
	case <-time.After(fuzzTimeout):
		t.Fatalf("%s did not return within %s", what, fuzzTimeout)
	}
}

// quietCaddyLogs points Caddy's default logger where the tests' configs
// point it (discarded unless CONNLIMIT_TEST_LOG is set), so that a fuzz
// worker, which loads no config of its own, does not log every input.
func quietCaddyLogs(tb testing.TB) {
	tb.Helper()
	raw, err := json.Marshal(obj{"admin": obj{"disabled": true}, "logging": testLogging()})
	if err != nil {
		tb.Fatal(err)
	}
	var cfg caddy.Config
	if err := caddy.StrictUnmarshalJSON(raw, &cfg); err != nil {
		tb.Fatal(err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		tb.Fatal(err)
	}
}

// handlerFields are the JSON names of the handler's options.
func handlerFields() []string {
	var names []string
	ht := reflect.TypeOf(Handler{})
	for i := range ht.NumField() {
		name, _, _ := strings.Cut(ht.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}

// fieldNamed returns the option an error of provisioning connection_limit
// is about: the first of the handler's JSON field names in what it says
// after the last "layer4.handlers.connection_limit: " (before that is
// Caddy's account of where the handler is), "unknown field" for an option
// that does not exist, or "" if it names none.
func fieldNamed(err error) string {
	const module = "layer4.handlers.connection_limit: "
	msg := err.Error()
	if i := strings.LastIndex(msg, module); i >= 0 {
		msg = msg[i+len(module):]
	}
	if strings.Contains(msg, "unknown field") {
		return "unknown field"
	}
	best, at := "", len(msg)
	for _, f := range handlerFields() {
		if i := strings.Index(msg, f); i >= 0 && i < at {
			best, at = f, i
		}
	}
	return best
}

// zoneFieldValues returns the values of every "zone" key in raw, at any depth
// (overflow handlers may be limits with zones of their own).
func zoneFieldValues(raw []byte) []string {
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return nil
	}
	var names []string
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if s, ok := v["zone"].(string); ok {
				names = append(names, s)
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(v)
	return names
}

// forgetZoneMetrics drops the metric series of zones that no longer
// exist. The package keeps a zone's series for the life of the process
// (so that they carry over reloads); a fuzz run names thousands of zones,
// and would otherwise grow without bound.
func forgetZoneMetrics(names []string) {
	for _, name := range names {
		if name == "" {
			continue // the private zones' series: not the fuzz run's
		}
		if _, ok := zones.Zone(name); ok {
			continue
		}
		for _, c := range allCollectors {
			if v, ok := c.(interface {
				DeletePartialMatch(prometheus.Labels) int
			}); ok {
				v.DeletePartialMatch(prometheus.Labels{"zone": name})
			}
		}
	}
}

var fuzzLogging = func() []byte {
	b, err := json.Marshal(testLogging())
	if err != nil {
		panic(err)
	}
	return b
}()

// provisionHandlers validates a config whose one layer4 route has the
// given handlers, as `caddy validate` (and the first half of every config
// load) does: every module is provisioned, nothing listens, and then
// everything is cleaned up. It checks that no zone is left behind.
func provisionHandlers(t *testing.T, handlers ...[]byte) error {
	t.Helper()
	raw := fmt.Appendf(nil, `{"admin":{"disabled":true},"logging":%s,"apps":{"layer4":{"servers":{"fuzz":{"listen":["127.0.0.1:0"],"routes":[{"handle":[%s]}]}}}}}`,
		fuzzLogging, bytes.Join(handlers, []byte(",")))
	var cfg caddy.Config
	if err := caddy.StrictUnmarshalJSON(raw, &cfg); err != nil {
		t.Fatalf("the config around the handlers does not decode: %v\n%s", err, raw)
	}
	before := make(map[*engine.Zone]bool)
	for _, z := range zones.Zones() {
		before[z] = true
	}
	var err error
	within(t, "validating "+string(raw), func() { err = caddy.Validate(&cfg) })
	for _, z := range zones.Zones() {
		if !before[z] {
			t.Fatalf("zone %q outlives the config that made it (validated: %v)", z.Name(), err)
		}
	}
	var names []string
	for _, h := range handlers {
		names = append(names, zoneFieldValues(h)...)
	}
	forgetZoneMetrics(names)
	return err
}

// ---------------------------------------------------------------------
// The Caddyfile parser

// caddyfileBlocks returns each connection_limit directive of a Caddyfile,
// with its block if it has one.
func caddyfileBlocks(src string) []string {
	var blocks []string
	lines := strings.Split(src, "\n")
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(strings.TrimSpace(lines[i]), "connection_limit") {
			continue
		}
		depth, j := 0, i
		for ; j < len(lines); j++ {
			depth += strings.Count(lines[j], "{") - strings.Count(lines[j], "}")
			if depth <= 0 {
				break
			}
		}
		blocks = append(blocks, strings.Join(lines[i:min(j+1, len(lines))], "\n"))
	}
	return blocks
}

// caddyfileSeeds are the connection_limit directives of examples/ and the
// string literals of this package's tests that start with one.
func caddyfileSeeds(tb testing.TB) []string {
	tb.Helper()
	var seeds []string
	files, _ := filepath.Glob(filepath.Join("examples", "*Caddyfile"))
	for _, name := range files {
		src, err := os.ReadFile(name)
		if err != nil {
			tb.Fatal(err)
		}
		seeds = append(seeds, caddyfileBlocks(string(src))...)
	}
	if len(seeds) == 0 {
		tb.Fatal("no connection_limit directive found in examples/*Caddyfile")
	}
	tests, _ := filepath.Glob("*_test.go")
	fset := token.NewFileSet()
	for _, name := range tests {
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			tb.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if lit, ok := n.(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil && strings.HasPrefix(s, "connection_limit") {
					seeds = append(seeds, s)
				}
			}
			return true
		})
	}
	return seeds
}

// A directive the parser accepts adapts to JSON that decodes back to the
// same handler, and that either provisions or fails with the option
// named; anything it turns down fails with the file and line.
func FuzzCaddyfile(f *testing.F) {
	quietCaddyLogs(f)
	for _, s := range caddyfileSeeds(f) {
		f.Add(s)
	}
	for _, s := range []string{ // beyond the tests: odd but valid
		"connection_limit 1 {\n\tzone \"a b\"\n}",
		"connection_limit 1 {\n\tzone a/b\n}",
		"connection_limit {\n\tmax_connections 9223372036854775807\n\tpriority -9223372036854775808\n\twait_timeout 1d\n}",
		"connection_limit 1 {\n\toverflow {\n\t\tconnection_limit 1 {\n\t\t\tzone same\n\t\t}\n\t\techo\n\t}\n\tzone same\n}",
		"connection_limit 2 {\n\toverflow {\n\t\tconnection_limit 1 {\n\t\t\tzone same\n\t\t}\n\t}\n\tzone same\n}",
		"connection_limit 1 {\n\tkey {l4.conn.remote_ip}:{l4.conn.remote_port}\n\tmax_waiting 0\n\twait_timeout 0\n}",
		"connection_limit 4 {\n\tfair_share {l4.conn.remote_ip}-{l4.tls.server_name}\n\tweight \"\" 9007199254740992\n\tweight \"a b\" 1\n\tfair_max 4\n}",
	} {
		f.Add(s)
	}
	fields := handlerFields()
	f.Fuzz(func(t *testing.T, src string) {
		if strings.Contains(src, "health") {
			return // a proxy's active health checks would dial out
		}
		tokens, err := caddyfile.Tokenize([]byte(src), "Caddyfile")
		if err != nil || len(tokens) == 0 {
			return // the lexer's business, not ours
		}
		var unm caddyfile.Unmarshaler
		within(t, "UnmarshalCaddyfile", func() {
			// As caddy-l4 parses a handler of a route: the dispenser
			// is at the directive's name.
			d := caddyfile.NewDispenser(tokens)
			d.Next()
			unm, err = caddyfile.UnmarshalModule(d, "layer4.handlers.connection_limit")
		})
		if err != nil {
			if msg := err.Error(); strings.HasPrefix(msg, "connection_limit:") && !strings.Contains(msg, ", at Caddyfile:") {
				t.Fatalf("error without file and line: %v", err)
			}
			return
		}
		h, ok := unm.(*Handler)
		if !ok {
			t.Fatalf("UnmarshalModule returned %T", unm)
		}
		switch {
		case h.MaxConnections < 1:
			t.Fatalf("accepted max_connections %d", h.MaxConnections)
		case h.MaxWaiting < -1:
			t.Fatalf("accepted max_waiting %d", h.MaxWaiting)
		case h.WaitTimeout < 0:
			t.Fatalf("accepted wait_timeout %d", h.WaitTimeout)
		case h.Order != "" && !strings.EqualFold(h.Order, "fifo") && !strings.EqualFold(h.Order, "lifo"):
			t.Fatalf("accepted order %q", h.Order) // any case, as in JSON
		case h.Release != "" && !strings.EqualFold(h.Release, "return") && !strings.EqualFold(h.Release, "close_write"):
			t.Fatalf("accepted release %q", h.Release)
		case h.OverflowRaw != nil && len(h.OverflowRaw) == 0:
			t.Fatal("accepted an empty overflow")
		}

		// To JSON as caddy-l4 adapts it, and back.
		raw := caddyconfig.JSON(h, nil)
		var back Handler
		if err := caddy.StrictUnmarshalJSON(raw, &back); err != nil {
			t.Fatalf("adapted JSON does not decode: %v\n%s", err, raw)
		}
		if again := caddyconfig.JSON(&back, nil); !bytes.Equal(raw, again) {
			t.Fatalf("JSON round trip changed the handler:\n%s\n%s", raw, again)
		}
		inline, err := layer4.SetModuleNameInline("handler", "connection_limit", raw)
		if err != nil {
			t.Fatal(err)
		}
		err = provisionHandlers(t, inline)
		if err == nil {
			return
		}
		// The parser checked every option but these two: a zone's name
		// (and its settings against other handlers of the zone), and the
		// overflow handlers, which it only parses.
		switch field := fieldNamed(err); {
		case field == "zone", field == "overflow":
		case strings.Contains(err.Error(), "cannot unmarshal number"):
			// Caddy passes a module's JSON through float64 to take out
			// its "handler" key: an integer beyond 2^53 the parser took
			// comes back rounded, past the int range at the very ends.
		case field == "":
			t.Fatalf("accepted by the parser, failed in provisioning without naming an option of %v: %v\n%s", fields, err, inline)
		default:
			t.Fatalf("accepted by the parser, failed in provisioning for %s, which the parser checks: %v\n%s", field, err, inline)
		}
	})
}

// ---------------------------------------------------------------------
// JSON provisioning

// jsonHandlerSeeds are the connection_limit handlers of examples/*.json,
// the Caddyfile seeds adapted, and the tests' configurations.
func jsonHandlerSeeds(tb testing.TB) [][]byte {
	tb.Helper()
	var seeds [][]byte
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "connection_limit" {
				b, err := json.Marshal(v)
				if err != nil {
					tb.Fatal(err)
				}
				seeds = append(seeds, b)
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	files, _ := filepath.Glob(filepath.Join("examples", "*.json"))
	for _, name := range files {
		raw, err := os.ReadFile(name)
		if err != nil {
			tb.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			tb.Fatalf("%s: %v", name, err)
		}
		walk(v)
	}
	if len(seeds) == 0 {
		tb.Fatal("no connection_limit handler found in examples/*.json")
	}
	for _, s := range caddyfileSeeds(tb) {
		out, err := adaptCaddyfile(tb, caddyfileFor("", "127.0.0.1:5000", s))
		if err != nil {
			continue // the error cases
		}
		var v any
		if err := json.Unmarshal(out, &v); err != nil {
			tb.Fatal(err)
		}
		walk(v)
	}
	for _, s := range []string{ // as the tests configure it, and wrong
		`{"handler":"connection_limit","max_connections":1}`,
		`{"handler":"connection_limit","max_connections":2,"max_waiting":1,"zone":"same","overflow":[{"handler":"proxy","upstreams":[{"dial":["127.0.0.1:6000"]}]}]}`,
		`{"handler":"connection_limit","max_connections":1,"max_waiting":-1,"wait_timeout":"1s","order":"LIFO","release":"close_write","keep_half_closed":true}`,
		`{"handler":"connection_limit","max_connections":1,"key":"{l4.conn.remote_ip}","priority":-3,"wait_timeout":1500000000}`,
		`{"handler":"connection_limit","max_connections":1,"overflow":[{"handler":"echo"}]}`,
		`{"handler":"connection_limit","max_connections":1,"overflow":[{"handler":"connection_limit","max_connections":2,"zone":"z"}],"zone":"z"}`,
		`{"handler":"connection_limit","max_connections":1,"overflow":[{"handler":"subroute","routes":[{"handle":[{"handler":"echo"}]}]}]}`,
		`{"handler":"connection_limit","max_connections":1,"overflow":[]}`,
		`{"handler":"connection_limit","max_connections":1,"overflow":[{"handler":"nonesuch"}]}`,
		`{"handler":"connection_limit"}`,
		`{"handler":"connection_limit","max_connections":0}`,
		`{"handler":"connection_limit","max_connections":-1}`,
		`{"handler":"connection_limit","max_connections":1.5}`,
		`{"handler":"connection_limit","max_connections":"1"}`,
		`{"handler":"connection_limit","max_connections":99999999999999999999}`,
		`{"handler":"connection_limit","max_connections":1,"max_waiting":-2}`,
		`{"handler":"connection_limit","max_connections":1,"wait_timeout":"-1s"}`,
		`{"handler":"connection_limit","max_connections":1,"order":"random"}`,
		`{"handler":"connection_limit","max_connections":1,"release":"early"}`,
		`{"handler":"connection_limit","max_connections":1,"zone":"a/b"}`,
		`{"handler":"connection_limit","max_connections":1,"zone":" a"}`,
		`{"handler":"connection_limit","max_connections":1,"zone":"\u00ff\ufffd"}`,
		`{"handler":"connection_limit","max_connections":1,"frobnicate":1}`,
		`{"handler":"connection_limit","max_connections":1,"keep_half_closed":"yes"}`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z"},{"handler":"connection_limit","max_connections":2,"zone":"z"}]`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z"},{"handler":"connection_limit","max_connections":1,"zone":"z","priority":5}]`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z","order":"fifo"},{"handler":"connection_limit","max_connections":1,"zone":"z","order":"lifo"}]`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","weights":{"127.0.0.2":3,"":1},"fair_max":2}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","weights":{"a":0}}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","weights":{"a":"3"}}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","weights":[3]}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","fair_max":0}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","fair_max":-1}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","fair_max":null}`,
		`{"handler":"connection_limit","max_connections":3,"weights":{"a":2},"fair_max":1}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","key":"{l4.conn.remote_ip}"}`,
		`{"handler":"connection_limit","max_connections":3,"fair_share":"{l4.conn.remote_ip}","zone":"f","store":{"backend":"redis","address":"127.0.0.1:1"}}`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{a}"},{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{b}"}]`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{a}","weights":{"x":2}},{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{a}"}]`,
		`[{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{a}","fair_max":1},{"handler":"connection_limit","max_connections":1,"zone":"z","fair_share":"{a}","priority":3,"fair_max":1}]`,
	} {
		seeds = append(seeds, []byte(s))
	}
	return seeds
}

// Any JSON for the handler (one handler object, or an array of them in
// one route) provisions, or fails with an error that names an
// option; either way nothing is left registered.
func FuzzProvisionJSON(f *testing.F) {
	quietCaddyLogs(f)
	for _, s := range jsonHandlerSeeds(f) {
		f.Add(s)
	}
	fields := handlerFields()
	f.Fuzz(func(t *testing.T, raw []byte) {
		if bytes.Contains(raw, []byte("health")) {
			return // a proxy's active health checks would dial out
		}
		var handlers []json.RawMessage
		if err := json.Unmarshal(raw, &handlers); err != nil {
			var one map[string]json.RawMessage
			if json.Unmarshal(raw, &one) != nil {
				return // not a handler, nor a list of them
			}
			handlers = []json.RawMessage{raw}
		}
		if len(handlers) == 0 || len(handlers) > 4 {
			return
		}
		var objs [][]byte
		for _, h := range handlers {
			var m map[string]json.RawMessage
			if json.Unmarshal(h, &m) != nil {
				return
			}
			var name string
			if json.Unmarshal(m["handler"], &name) != nil || name != "connection_limit" {
				return // another module: not ours to fuzz
			}
			objs = append(objs, h)
		}
		err := provisionHandlers(t, objs...)
		if err != nil && fieldNamed(err) == "" {
			t.Fatalf("failed without naming an option of %v: %v\n%s", fields, err, raw)
		}
	})
}

// ---------------------------------------------------------------------
// The admin API

// adminStatuses are the statuses the admin API answers with: 200, and
// for errors (a JSON body through Caddy) 400 bad request, 404 unknown
// zone or endpoint, 405 wrong method; and, so that routes added later
// can use them, 204, 409, 413, 415 and 422. Never 500.
var adminStatuses = map[int]bool{200: true, 204: true, 400: true, 404: true, 405: true, 409: true, 413: true, 415: true, 422: true}

// fuzzAdminZone registers a zone for the admin API to find, with one
// connection served and one waiting, and unregisters it at the end.
func fuzzAdminZone(tb testing.TB, name string) {
	tb.Helper()
	owner := new(int)
	z, leave, err := zones.Use(name, owner, engine.Limits{MaxConnections: 1, MaxWaiting: 10, WaitTimeout: time.Hour}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	served := &engine.Waiter{Key: "k", Remote: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}}
	waiting := &engine.Waiter{Key: "k", Priority: 3, Remote: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2}}
	if out, _ := z.Acquire(served, engine.NewSignal(), time.Now()); out != engine.Admitted {
		tb.Fatalf("first waiter: outcome %d", out)
	}
	if out, _ := z.Acquire(waiting, engine.NewSignal(), time.Now()); out != engine.Queued {
		tb.Fatalf("second waiter: outcome %d", out)
	}
	tb.Cleanup(func() {
		// The fuzzer may have paused the zone, or raised its limit
		// (the waiter was then granted a slot): Abandon covers both.
		z.Abandon(waiting)
		z.Free(served)
		leave()
		if a, w := z.Counts(); a != 0 || w != 0 {
			tb.Errorf("zone %q: %d active, %d waiting after the fuzz run", name, a, w)
		}
	})
}

// Any request to the admin routes (through a ServeMux, as Caddy's admin
// server routes them) is answered with one of adminStatuses; an error is
// a caddy.APIError (Caddy answers anything else with 500) and comes
// before any byte of the answer; 405 says what is allowed; a 200 is JSON.
func FuzzAdminAPI(f *testing.F) {
	quietCaddyLogs(f)
	const zone = "fuzz-admin"
	fuzzAdminZone(f, zone)
	for _, s := range []struct{ method, path, body string }{
		{"GET", "/connection_limit/", ""},
		{"GET", "/connection_limit", ""},
		{"POST", "/connection_limit/", ""},
		{"GET", "/connection_limit/" + zone, ""},
		{"GET", "/connection_limit/" + zone + "/", ""},
		{"GET", "/connection_limit/nonesuch", ""},
		{"DELETE", "/connection_limit/" + zone, ""},
		{"POST", "/connection_limit/" + zone + "/pause", ""},
		{"GET", "/connection_limit/" + zone + "/pause", ""},
		{"POST", "/connection_limit/" + zone + "/resume", ""},
		{"POST", "/connection_limit/nonesuch/resume", ""},
		{"POST", "/connection_limit/" + zone + "/frobnicate", ""},
		{"POST", "/connection_limit/" + zone + "/pause/extra", ""},
		{"POST", "/connection_limit//pause", ""},
		{"GET", "/connection_limit/%66uzz-admin", ""},
		{"GET", "/connection_limit/a%2Fb/pause", ""},
		{"GET", "/connection_limit/../connection_limit/" + zone, ""},
		{"GET", "/connection_limit/" + zone + "?x=1", ""},
		{"GET", "/connection_limit/" + zone + "/limits", ""},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_connections": 20}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_waiting": -1}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"wait_timeout":"2s"}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_connections": 3, "max_waiting": 5, "wait_timeout": "1m"}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_connections": 0}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_waiting": -2}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"wait_timeout":"-1s"}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"wait_timeout":2000000000}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"order":"lifo"}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"frobnicate": 1}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_connections": "20"}`},
		{"POST", "/connection_limit/" + zone + "/limits", `{"max_connections": 20`},
		{"POST", "/connection_limit/" + zone + "/limits", `null`},
		{"POST", "/connection_limit/" + zone + "/limits", ``},
		{"POST", "/connection_limit/nonesuch/limits", `{"max_connections": 20}`},
		{"PUT", "/connection_limit/" + zone + "/limits", `{"max_connections": 20}`},
		{"DELETE", "/connection_limit/" + zone + "/limits", ``},
		{"DELETE", "/connection_limit/" + zone + "/limits", `{"max_connections": 20}`},
		{"DELETE", "/connection_limit/nonesuch/limits", ``},
	} {
		f.Add(s.method, s.path, []byte(s.body))
	}

	var called bool
	var routeErr error
	mux := http.NewServeMux()
	for _, r := range (AdminAPI{}).Routes() {
		h := r.Handler
		mux.Handle(r.Pattern, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			called = true
			routeErr = h.ServeHTTP(w, req)
		}))
	}
	f.Fuzz(func(t *testing.T, method, target string, body []byte) {
		// The request as it comes off the wire: what the server's own
		// parser turns down never reaches a route.
		wire := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: localhost:2019\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			method, target, len(body), body)
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(wire)))
		if err != nil {
			return
		}
		rec := httptest.NewRecorder()
		called, routeErr = false, nil
		within(t, method+" "+target, func() { mux.ServeHTTP(rec, req) })
		if !called {
			return // the mux's redirect or 404: not ours
		}
		status := rec.Code
		if routeErr != nil {
			apiErr, ok := routeErr.(caddy.APIError)
			if !ok {
				t.Fatalf("%s %s: error %T %v is not a caddy.APIError: Caddy answers it with 500", req.Method, req.URL, routeErr, routeErr)
			}
			if rec.Body.Len() > 0 {
				t.Fatalf("%s %s: error %v after writing %q", req.Method, req.URL, routeErr, rec.Body)
			}
			status = apiErr.HTTPStatus
		}
		if !adminStatuses[status] {
			t.Fatalf("%s %s: status %d (error %v)", req.Method, req.URL, status, routeErr)
		}
		if status == http.StatusMethodNotAllowed && rec.Header().Get("Allow") == "" {
			t.Fatalf("%s %s: 405 without Allow", req.Method, req.URL)
		}
		if status == http.StatusOK && routeErr == nil && rec.Body.Len() > 0 && !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %s: 200 with a body that is not JSON: %q", req.Method, req.URL, rec.Body)
		}
	})
}

// ---------------------------------------------------------------------
// The replay of a waiting UDP flow's datagrams

// The bounds of the datagrams held for a waiting flow, as the README
// states them.
const (
	documentedHeldPackets = 32
	documentedHeldBytes   = 256 << 10
)

// The fuzzer describes datagrams rather than spelling them out: its
// minimisation of an input takes time quadratic in the input's length, and
// stalls a run for minutes on the kilobytes that datagrams larger than a
// read buffer take. Each datagram is three bytes: a length (big-endian)
// and a seed. Byte j of datagram i (counted over the whole flow) is
// seed + 7i + 13j, so that a byte out of place, a part of the wrong
// datagram or two datagrams swapped read differently.
const datagramSpec = 3

// datagramsFrom makes the datagrams spec describes, numbering them from
// first; a trailing partial description is ignored.
func datagramsFrom(spec []byte, first int) [][]byte {
	var dgs [][]byte
	for i := 0; len(spec) >= datagramSpec; i, spec = i+1, spec[datagramSpec:] {
		dgs = append(dgs, datagram(first+i, int(binary.BigEndian.Uint16(spec)), spec[2]))
	}
	return dgs
}

func datagram(i, n int, seed byte) []byte {
	d := make([]byte, n)
	for j := range d {
		d[j] = seed + byte(7*i) + byte(13*j)
	}
	return d
}

// describe is the inverse of datagramsFrom, for seeds: lengths and seeds.
func describe(dgs ...[2]int) []byte {
	var b []byte
	for _, d := range dgs {
		b = binary.BigEndian.AppendUint16(b, uint16(d[0]))
		b = append(b, byte(d[1]))
	}
	return b
}

// fuzzDatagramConn is a UDP flow as caddy-l4 reads it: a datagram per
// Read, a datagram larger than the buffer in parts (the rest on the
// next Reads), then io.EOF.
type fuzzDatagramConn struct {
	dgs [][]byte
}

func (c *fuzzDatagramConn) Read(p []byte) (int, error) {
	for len(c.dgs) > 0 && len(c.dgs[0]) == 0 {
		c.dgs = c.dgs[1:]
	}
	if len(c.dgs) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.dgs[0])
	c.dgs[0] = c.dgs[0][n:]
	return n, nil
}

func (c *fuzzDatagramConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *fuzzDatagramConn) Close() error                { return nil }
func (c *fuzzDatagramConn) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5000}
}
func (c *fuzzDatagramConn) RemoteAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5001}
}
func (c *fuzzDatagramConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzDatagramConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzDatagramConn) SetWriteDeadline(time.Time) error { return nil }

// The datagrams a waiting flow held (within the documented bounds) are
// read back after the wait exactly, in order, one per Read: a datagram
// larger than the reader's buffer in parts, each part from that datagram
// only; first the one the matchers had read, then the held ones, then
// the flow's next ones.
func FuzzUDPReplay(f *testing.F) {
	f.Add(uint16(0), describe([2]int{5, 'h'}), uint16(1499), describe([2]int{5, 'a'}))
	f.Add(uint16(0), describe([2]int{9000, 0}, [2]int{4, 1}), uint16(8191), []byte(nil))
	f.Add(uint16(7), describe([2]int{1, 0}, [2]int{2, 0}, [2]int{3, 0}), uint16(0), describe([2]int{2, 9}))
	f.Add(uint16(1), []byte(nil), uint16(0), describe([2]int{4, 0}))
	f.Add(uint16(1500), describe([2]int{0, 0}, [2]int{1, 0}, [2]int{0, 0}, [2]int{300, 0}), uint16(298), []byte(nil))
	var many [][2]int
	for i := range 40 {
		many = append(many, [2]int{1 + i%3, i})
	}
	f.Add(uint16(0), describe(many...), uint16(3), []byte(nil))
	f.Add(uint16(0), describe(append(many, many...)...), uint16(3), []byte(nil)) // past the bounds below
	f.Add(uint16(0), describe([2]int{65535, 1}, [2]int{65535, 2}, [2]int{65535, 3}, [2]int{65535, 4}, [2]int{65535, 5}, [2]int{10, 6}),
		uint16(65535), describe([2]int{5, 7}))

	f.Fuzz(func(t *testing.T, matched uint16, held []byte, bufSize uint16, after []byte) {
		var m []byte
		if matched > 0 {
			// caddy-l4's matchers read whole datagrams; the fake
			// flow here is no caddy-l4 flow, so its matched bytes
			// stand for one datagram, of at most a common MTU.
			m = datagram(0, min(int(matched), 1500), 0)
		}
		// Past these, inputs are slow (and slower to minimise), and
		// no different: 48 held datagrams are past the 32 kept, 640 KiB
		// past the 256 KiB.
		if len(held) > 48*datagramSpec || len(after) > 8*datagramSpec {
			return
		}
		size, total, reads := int(bufSize)+1, len(m), (len(m)+int(bufSize))/(int(bufSize)+1)
		for _, spec := range [][]byte{held, after} {
			for ; len(spec) >= datagramSpec; spec = spec[datagramSpec:] {
				n := int(binary.BigEndian.Uint16(spec))
				total += n
				reads += (n + size - 1) / size
			}
		}
		if total > 640<<10 || reads > 1<<16 {
			return
		}
		hs := datagramsFrom(held, 1)
		checkReplay(t, m, hs, size, datagramsFrom(after, 1+len(hs)))
	})
}

// Past 256 KiB held, datagrams are dropped, a smaller one after a dropped
// one may still be held; the reads stay whole.
func TestUDPReplayByteBound(t *testing.T) {
	var held [][]byte
	for i := range 5 {
		held = append(held, datagram(i+1, 60000, 0))
	}
	held = append(held, []byte("small"))
	checkReplay(t, nil, held, 65536, [][]byte{[]byte("after")})
	checkReplay(t, []byte("m"), held, 999, nil)
}

// checkReplay is FuzzUDPReplay's property: matched stands for the bytes
// caddy-l4's matchers read (one datagram), held for the datagrams that
// arrive while the flow waits, flow for those after; size is the read
// buffer's.
func checkReplay(t *testing.T, matched []byte, held [][]byte, size int, flow [][]byte) {
	t.Helper()
	// Held as the waiting goroutine holds them: read into one buffer,
	// reused for the next (empty reads are not held).
	cw := &flowWait{}
	var offered [][]byte
	longest := 0
	for _, d := range held {
		if len(d) > 0 {
			offered = append(offered, d)
			longest = max(longest, len(d))
		}
	}
	scratch := make([]byte, longest)
	for _, d := range offered {
		n := copy(scratch, d)
		cw.hold(scratch[:n])
		for i := range n {
			scratch[i] = ^scratch[i]
		}
	}
	kept := append([][]byte(nil), cw.held...)
	total, keptBytes := 0, 0
	for _, d := range offered {
		total += len(d)
	}
	for _, d := range kept {
		keptBytes += len(d)
	}
	if len(kept) > documentedHeldPackets || keptBytes > documentedHeldBytes {
		t.Fatalf("held %d datagrams, %d bytes: more than the documented %d, %d", len(kept), keptBytes, documentedHeldPackets, documentedHeldBytes)
	}
	if len(offered) <= documentedHeldPackets && total <= documentedHeldBytes && len(kept) != len(offered) {
		t.Fatalf("held %d of %d datagrams (%d bytes), within the documented bounds", len(kept), len(offered), total)
	}
	for i, j := 0, 0; i < len(kept); i, j = i+1, j+1 { // in order, intact
		for j < len(offered) && !bytes.Equal(kept[i], offered[j]) {
			j++
		}
		if j == len(offered) {
			t.Fatalf("held datagram %d (%d bytes) is none of those offered after the previous one", i, len(kept[i]))
		}
	}

	var want [][]byte // every datagram the reader should see, in order
	if len(matched) > 0 {
		want = append(want, matched)
	}
	want = append(want, kept...)
	want = append(want, flow...)

	cx := layer4.WrapConnection(&fuzzDatagramConn{dgs: append([][]byte(nil), flow...)},
		append([]byte(nil), matched...), zap.NewNop())
	rd := cw.handOn(cx)
	buf := make([]byte, size)
	for i, d := range want {
		for off := 0; off < len(d); {
			n, err := rd.Read(buf)
			wantN := min(size, len(d)-off)
			if err != nil || n != wantN || !bytes.Equal(buf[:n], d[off:off+wantN]) {
				t.Fatalf("datagram %d of %d (%d bytes) at %d, buffer %d: read %d bytes %q, err %v; want %d bytes %q",
					i, len(want), len(d), off, size, n, buf[:min(n, 64)], err, wantN, d[off:off+min(wantN, 64)])
			}
			off += n
		}
	}
	if n, err := rd.Read(buf); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("after the last datagram: read %d bytes %q, err %v; want io.EOF", n, buf[:min(n, 64)], err)
	}
}

// ---------------------------------------------------------------------
// The Caddyfile seeds and JSON seeds are found (a glob gone wrong would
// leave the targets fuzzing from nothing).
func TestFuzzSeedsFound(t *testing.T) {
	cf, js := caddyfileSeeds(t), jsonHandlerSeeds(t)
	for _, want := range []string{"zone per_ip", "zone http_front", "order lifo", "overflow {"} {
		found := false
		for _, s := range cf {
			found = found || strings.Contains(s, want)
		}
		if !found {
			t.Errorf("no Caddyfile seed contains %q", want)
		}
	}
	if !bytes.Contains(bytes.Join(js, nil), []byte(`"zone":"app"`)) {
		t.Error("examples/overflow.json's handler is not a JSON seed")
	}
}
