package connlimit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/mholt/caddy-l4/layer4"
	_ "github.com/mholt/caddy-l4/modules/l4echo"
	_ "github.com/mholt/caddy-l4/modules/l4proxy"
	_ "github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	_ "github.com/mholt/caddy-l4/modules/l4regexp"
	_ "github.com/mholt/caddy-l4/modules/l4remoteiplist"
	_ "github.com/mholt/caddy-l4/modules/l4subroute"
)

// This file is the end-to-end test bench: real Caddy loaded in-process,
// real sockets on 127.0.0.1, a real backend and real clients.

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// backend is a TCP server that records how many connections it serves at
// once and in which order they arrive. Each connection sends a first line
// naming it; the backend records it, then (when gated) waits for a token
// on gate, then answers according to the rest of the line:
//
//	"<id>\n"       answers "ok <id>\n" and echoes until EOF
//	"<id> hash\n"  reads to EOF and answers "<id> <n> <sha256 hex>\n"
//	"<id> hash <n>\n"  reads n bytes and answers the same
//	"<id> close\n" answers "ok <id>\n" and closes at once
type backend struct {
	t    testing.TB
	ln   net.Listener
	gate chan struct{} // nil: no gate

	mu       sync.Mutex
	byID     map[string]chan struct{} // per-connection gates
	active   int
	peak     int
	total    int
	order    []string
	arrivals chan string
	wg       sync.WaitGroup
}

func newBackend(t testing.TB, gated bool) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{t: t, ln: ln, arrivals: make(chan string, 10000), byID: map[string]chan struct{}{}}
	if gated {
		b.gate = make(chan struct{}, 10000)
	}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.close)
	return b
}

func (b *backend) addr() string { return b.ln.Addr().String() }

func (b *backend) close() {
	_ = b.ln.Close()
	if b.gate != nil {
		close(b.gate)
	}
	b.wg.Wait()
}

func (b *backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.handle(c)
		}()
	}
}

func (b *backend) handle(c net.Conn) {
	defer c.Close()
	b.mu.Lock()
	b.active++
	b.total++
	if b.active > b.peak {
		b.peak = b.active
	}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.active--
		b.mu.Unlock()
	}()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	line = strings.TrimSpace(line)
	id, mode, _ := strings.Cut(line, " ")
	b.mu.Lock()
	b.order = append(b.order, id)
	b.mu.Unlock()
	own := b.idGate(id)
	b.arrivals <- id
	if b.gate != nil {
		select {
		case _, ok := <-b.gate:
			if !ok {
				return
			}
		case <-own:
		}
	}
	switch mode {
	case "hash":
		h := sha256.New()
		n, _ := io.Copy(h, br)
		fmt.Fprintf(c, "%s %d %s\n", id, n, hex.EncodeToString(h.Sum(nil)))
	case "":
		fmt.Fprintf(c, "ok %s\n", id)
		_, _ = io.Copy(c, br)
	case "close":
		fmt.Fprintf(c, "ok %s\n", id)
	default:
		var want int64
		_, _ = fmt.Sscanf(mode, "hash %d", &want)
		h := sha256.New()
		n, _ := io.CopyN(h, br, want)
		fmt.Fprintf(c, "%s %d %s\n", id, n, hex.EncodeToString(h.Sum(nil)))
		_, _ = io.Copy(io.Discard, br)
	}
}

func (b *backend) idGate(id string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	ch, ok := b.byID[id]
	if !ok {
		ch = make(chan struct{}, 1)
		b.byID[id] = ch
	}
	return ch
}

// letID lets the connection named id go on.
func (b *backend) letID(id string) { b.idGate(id) <- struct{}{} }

// let lets n gated connections go on, whichever they are.
func (b *backend) let(n int) {
	for range n {
		b.gate <- struct{}{}
	}
}

func (b *backend) stats() (active, peak, total int, order []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.active, b.peak, b.total, append([]string(nil), b.order...)
}

// waitArrivals waits for n connections to reach the backend.
func (b *backend) waitArrivals(n int, within time.Duration) []string {
	b.t.Helper()
	var ids []string
	deadline := time.After(within)
	for len(ids) < n {
		select {
		case id := <-b.arrivals:
			ids = append(ids, id)
		case <-deadline:
			b.t.Fatalf("only %d of %d connections reached the backend within %s: %v", len(ids), n, within, ids)
		}
	}
	return ids
}

// noArrival asserts that no connection reaches the backend for d.
func (b *backend) noArrival(d time.Duration) {
	b.t.Helper()
	select {
	case id := <-b.arrivals:
		b.t.Fatalf("connection %q reached the backend; expected none", id)
	case <-time.After(d):
	}
}

// client is one TCP client of the proxy.
type client struct {
	t    testing.TB
	id   string
	conn *net.TCPConn
	br   *bufio.Reader
}

func dial(t testing.TB, addr, id string) *client {
	t.Helper()
	return dialFrom(t, "", addr, id)
}

// dialFrom connects from a given local IP (127.0.0.x), or any if "".
func dialFrom(t testing.TB, localIP, addr, id string) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if localIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(localIP)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	cl := &client{t: t, id: id, conn: c.(*net.TCPConn), br: bufio.NewReader(c)}
	t.Cleanup(func() { _ = cl.conn.Close() })
	return cl
}

// hello sends the first line the backend expects.
func (c *client) hello(mode string) {
	c.t.Helper()
	line := c.id
	if mode != "" {
		line += " " + mode
	}
	if _, err := c.conn.Write([]byte(line + "\n")); err != nil {
		c.t.Fatalf("client %s: write: %v", c.id, err)
	}
}

// readLine reads one line with a deadline; it returns "" and the error if
// none came.
func (c *client) readLine(within time.Duration) (string, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(within))
	defer c.conn.SetReadDeadline(time.Time{})
	s, err := c.br.ReadString('\n')
	return strings.TrimSpace(s), err
}

func (c *client) expectLine(want string, within time.Duration) {
	c.t.Helper()
	got, err := c.readLine(within)
	if err != nil || got != want {
		c.t.Fatalf("client %s: got %q (err %v), want %q", c.id, got, err, want)
	}
}

// expectClosed asserts that the proxy closes the connection without a
// byte for the client.
func (c *client) expectClosed(within time.Duration) {
	c.t.Helper()
	got, err := c.readLine(within)
	if err == nil || got != "" {
		c.t.Fatalf("client %s: got %q (err %v), want the connection closed", c.id, got, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.t.Fatalf("client %s: still open after %s, want it closed", c.id, within)
	}
}

// takeSlot connects a client named id, sends its line, and waits until it
// is at the backend: it holds a slot until finish.
func takeSlot(t testing.TB, b *backend, addr, id string) *client {
	t.Helper()
	c := dial(t, addr, id)
	c.hello("")
	b.waitArrivals(1, 5*time.Second)
	return c
}

// finish lets the client's connection through the backend's gate, reads
// its answer and closes it, which frees its slot.
func finish(b *backend, c *client) {
	c.t.Helper()
	b.letID(c.id)
	c.expectLine("ok "+c.id, 5*time.Second)
	_ = c.conn.Close()
}

// loadConfig loads cfg (a Go value or JSON bytes) into the in-process Caddy.
func loadConfig(t testing.TB, cfg any) {
	t.Helper()
	raw, ok := cfg.([]byte)
	if !ok {
		var err error
		raw, err = json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := caddy.Load(raw, true); err != nil {
		t.Fatalf("loading config: %v\n%s", err, raw)
	}
}

// stopCaddy unloads the config, and waits for every zone to drain.
func stopCaddy(t testing.TB) {
	t.Helper()
	if err := caddy.Stop(); err != nil {
		t.Errorf("stopping caddy: %v", err)
	}
}

// obj is a JSON object literal.
type obj = map[string]any

// l4Config is a config with one layer4 server listening on listen, whose
// one route has the given handlers; admin is the admin address ("" for
// none).
func l4Config(admin, listen string, handlers ...obj) obj {
	return l4ConfigRoutes(admin, listen, obj{"handle": handlers})
}

func l4ConfigRoutes(admin, listen string, routes ...obj) obj {
	cfg := obj{
		"logging": testLogging(),
		"apps": obj{"layer4": obj{"servers": obj{"test": obj{
			"listen": []string{listen},
			"routes": routes,
		}}}},
	}
	if admin == "" {
		cfg["admin"] = obj{"disabled": true}
	} else {
		cfg["admin"] = obj{"listen": admin}
	}
	return cfg
}

// testLogging discards Caddy's logs unless CONNLIMIT_TEST_LOG names a
// level (for example DEBUG), which then goes to stderr.
func testLogging() obj {
	if lvl := os.Getenv("CONNLIMIT_TEST_LOG"); lvl != "" {
		return obj{"logs": obj{"default": obj{"level": lvl}}}
	}
	return obj{"logs": obj{"default": obj{"writer": obj{"output": "discard"}}}}
}

func proxyTo(addrs ...string) obj {
	return obj{"handler": "proxy", "upstreams": []obj{{"dial": addrs}}}
}

// limit is a connection_limit handler with the given fields.
func limit(fields obj) obj {
	h := obj{"handler": "connection_limit"}
	for k, v := range fields {
		h[k] = v
	}
	return h
}

// waitFor polls cond every millisecond until it holds or within passes.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// zoneCounts sums active and waiting over every zone with the given name
// ("" sums the private zones).
func zoneCounts(name string) (active, waiting int) {
	for _, z := range zoneRegistry.Zones() {
		if z.name == name {
			a, w := z.Counts()
			active += a
			waiting += w
		}
	}
	return active, waiting
}

func waitCounts(t testing.TB, zone string, active, waiting int) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("zone %q to have %d active and %d waiting", zone, active, waiting), func() bool {
		a, w := zoneCounts(zone)
		return a == active && w == waiting
	})
}

// adminDo sends a request to the admin API and returns status and body.
// Every load, even one that fails, replaces Caddy's admin server and shuts
// the old one down in the background, so a request can meet the closing
// listener: it is sent again on a transport error (no answer came).
func adminDo(t testing.TB, method, url, contentType string, body []byte) (int, []byte) {
	t.Helper()
	var lastErr error
	for range 5 {
		req, err := http.NewRequest(method, url, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		req.Close = true // never reuse a connection to a replaced server
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			lastErr = err
			time.Sleep(20 * time.Millisecond)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, b
	}
	t.Fatalf("%s %s: %v", method, url, lastErr)
	return 0, nil
}

// adaptCaddyfile adapts a Caddyfile to JSON.
func adaptCaddyfile(t testing.TB, src string) ([]byte, error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
	return out, err
}
