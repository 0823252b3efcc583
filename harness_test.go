package connlimit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/testkit"
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

// zoneCounts sums active and waiting over every zone with the given name
// ("" sums the private zones).
func zoneCounts(name string) (active, waiting int) {
	for _, z := range zones.Zones() {
		if z.Name() == name {
			a, w := z.Counts()
			active += a
			waiting += w
		}
	}
	return active, waiting
}

func waitCounts(t testing.TB, zone string, active, waiting int) {
	t.Helper()
	testkit.WaitFor(t, 5*time.Second, fmt.Sprintf("zone %q to have %d active and %d waiting", zone, active, waiting), func() bool {
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

// limitedRoute loads a config with one route on a free port: a
// connection_limit with the given fields in front of a proxy to be. It
// returns the address to dial; Caddy is stopped when the test ends.
func limitedRoute(t testing.TB, be *backend, fields obj) string {
	t.Helper()
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen, limit(fields), proxyTo(be.addr())))
	t.Cleanup(func() { stopCaddy(t) })
	return listen
}

// Zones, as the tests see them.

// namedZone returns the named zone, failing the test if it is not known.
func namedZone(t testing.TB, name string) *engine.Zone {
	t.Helper()
	z, ok := zones.Zone(name)
	if !ok {
		t.Fatalf("zone %q is not known", name)
	}
	return z
}

// zoneSnapshot is the named zone's snapshot with up to 100 waiters.
func zoneSnapshot(t testing.TB, name string) engine.Snapshot {
	t.Helper()
	return namedZone(t, name).Snapshot(time.Now(), 100)
}

// waitingDrop waits until the named zone has the given counts, and
// returns how long after since that was.
func waitingDrop(t testing.TB, zone string, active, waiting int, since time.Time, within time.Duration) time.Duration {
	t.Helper()
	deadline := since.Add(within)
	for {
		a, w := zoneCounts(zone)
		if a == active && w == waiting {
			return time.Since(since)
		}
		if time.Now().After(deadline) {
			t.Fatalf("zone %q still has %d active and %d waiting %s after the client left; want %d and %d",
				zone, a, w, time.Since(since), active, waiting)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// staysCounts asserts that the named zone keeps the given counts for d.
func staysCounts(t testing.TB, zone string, active, waiting int, d time.Duration) {
	t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if a, w := zoneCounts(zone); a != active || w != waiting {
			t.Fatalf("zone %q has %d active and %d waiting, want it to stay at %d and %d", zone, a, w, active, waiting)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Caddy's HTTP server behind caddy-l4 as a listener wrapper.

// httpConfig is an HTTP server on listen that answers "hello" behind a
// layer4 listener wrapper whose one route has the given handlers.
func httpConfig(listen string, handlers ...obj) obj {
	return obj{
		"admin":   obj{"disabled": true},
		"logging": testLogging(),
		"apps": obj{"http": obj{"servers": obj{"front": obj{
			"listen":            []string{listen},
			"automatic_https":   obj{"disable": true},
			"listener_wrappers": []obj{{"wrapper": "layer4", "routes": []obj{{"handle": handlers}}}},
			"routes": []obj{{"handle": []obj{{
				"handler": "static_response",
				"body":    "hello",
			}}}},
		}}}},
	}
}

// httpClient is one HTTP client with a single keep-alive connection.
type httpClient struct {
	t     *testing.T
	name  string
	tr    *http.Transport
	cl    *http.Client
	conns chan net.Conn // the connections it dialled
}

func newHTTPClient(t *testing.T, name string) *httpClient {
	c := &httpClient{t: t, name: name, conns: make(chan net.Conn, 10)}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c.tr = &http.Transport{
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     time.Minute,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, network, addr)
			if err == nil {
				c.conns <- conn
			}
			return conn, err
		},
	}
	c.cl = &http.Client{Transport: c.tr, Timeout: 20 * time.Second}
	t.Cleanup(c.tr.CloseIdleConnections)
	return c
}

// get fetches url and returns the body, or the error.
func (c *httpClient) get(url string) (string, error) {
	resp, err := c.cl.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), nil
}

func (c *httpClient) mustGet(url string) {
	c.t.Helper()
	if body, err := c.get(url); err != nil || body != "hello" {
		c.t.Fatalf("client %s: got %q (err %v), want hello", c.name, body, err)
	}
}

// Clients behind a PROXY protocol header.

// ipKey is the key expression of a per-client-IP limit.
const ipKey = "{l4.conn.remote_ip}"

// Each client IP gets its own slots: clients of two IPs are served at
// once, while a second client of one IP waits for that IP's slot only.
func TestPerKeyLimitSeparatesClients(t *testing.T) {
	const zone = "keys-per-ip"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		limit(obj{"max_connections": 1, "zone": zone, "key": ipKey}), proxyTo(be.addr())))
	defer stopCaddy(t)

	a := dialFrom(t, "127.0.0.2", listen, "a")
	a.hello("")
	a.expectLine("ok a", 5*time.Second)
	b := dialFrom(t, "127.0.0.3", listen, "b")
	b.hello("")
	b.expectLine("ok b", 5*time.Second)
	be.waitArrivals(2, 5*time.Second)
	if active, _, _, _ := be.stats(); active != 2 {
		t.Fatalf("backend serves %d at once, want 2 (one per IP)", active)
	}

	a2 := dialFrom(t, "127.0.0.2", listen, "a2")
	a2.hello("")
	waitCounts(t, zone, 2, 1)
	s := zoneSnapshot(t, zone)
	if len(s.Waiters) != 1 || s.Waiters[0].Key != "127.0.0.2" || !strings.HasPrefix(s.Waiters[0].Remote, "127.0.0.2:") {
		t.Fatalf("waiters %+v, want one of key 127.0.0.2", s.Waiters)
	}
	if n := zoneSnapshot(t, zone).Keys; n != 2 {
		t.Fatalf("zone holds %d keys, want 2", n)
	}

	// Another IP leaving does not help a2.
	_ = b.conn.Close()
	waitCounts(t, zone, 1, 1)
	be.noArrival(300 * time.Millisecond)

	// Its own IP leaving does.
	_ = a.conn.Close()
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "a2" {
		t.Fatalf("backend got %q, want a2", id)
	}
	a2.expectLine("ok a2", 5*time.Second)
	_ = a2.conn.Close()
	waitCounts(t, zone, 0, 0)
	if _, peak, total, _ := be.stats(); peak != 2 || total != 3 {
		t.Fatalf("backend peak %d, total %d; want 2 and 3", peak, total)
	}
}

// proxyClient dials listen and sends a PROXY v1 header naming srcIP and
// srcPort as the client, then its first line.
func proxyClient(t *testing.T, listen, id, srcIP string, srcPort int) *client {
	t.Helper()
	c := dial(t, listen, id)
	hdr := fmt.Sprintf("PROXY TCP4 %s 127.0.0.1 %d 80\r\n", srcIP, srcPort)
	if _, err := c.conn.Write([]byte(hdr + id + "\n")); err != nil {
		t.Fatal(err)
	}
	return c
}

// proxyProtocol is a proxy_protocol handler that trusts the loopback
// clients of the tests (its default policy IGNOREs the header's address).
func proxyProtocol() obj {
	return obj{"handler": "proxy_protocol", "allow": []string{"127.0.0.0/8"}}
}

// UDP: an echo backend and flows.

// udpEcho is a UDP echo server that records which peers (the proxy's
// upstream sockets, one per admitted flow) and which payloads it saw.
type udpEcho struct {
	pc *net.UDPConn

	mu       sync.Mutex
	peers    map[string]bool
	payloads map[string]bool
	done     chan struct{}
}

func newUDPEcho(t *testing.T) *udpEcho {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	e := &udpEcho{pc: pc, peers: map[string]bool{}, payloads: map[string]bool{}, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		buf := make([]byte, 9000)
		for {
			n, addr, err := pc.ReadFromUDP(buf)
			if err != nil {
				return
			}
			e.mu.Lock()
			e.peers[addr.String()] = true
			e.payloads[string(buf[:n])] = true
			e.mu.Unlock()
			_, _ = pc.WriteToUDP(buf[:n], addr)
		}
	}()
	t.Cleanup(func() {
		_ = pc.Close()
		<-e.done
	})
	return e
}

func (e *udpEcho) addr() string { return e.pc.LocalAddr().String() }

func (e *udpEcho) seen() (peers int, payloads map[string]bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	payloads = make(map[string]bool, len(e.payloads))
	for p := range e.payloads {
		payloads[p] = true
	}
	return len(e.peers), payloads
}

// freeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// udpConfig is a UDP layer4 server with a short idle_timeout (flows end
// after that long without a packet from the client), limiting and
// proxying to the echo server.
func udpConfig(port int, echo *udpEcho, fields obj, idle string) obj {
	cfg := l4Config("", fmt.Sprintf("udp/127.0.0.1:%d", port), limit(fields), proxyTo("udp/"+echo.addr()))
	srv := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)["test"].(obj)
	srv["idle_timeout"] = idle
	return cfg
}

// udpFlow is one UDP client: one socket, so one flow.
type udpFlow struct {
	t    *testing.T
	name string
	conn *net.UDPConn
}

func dialUDP(t *testing.T, port int, name string) *udpFlow {
	t.Helper()
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &udpFlow{t: t, name: name, conn: c}
}

func (f *udpFlow) send(s string) {
	if _, err := f.conn.Write([]byte(s)); err != nil {
		f.t.Errorf("flow %s: write: %v", f.name, err)
	}
}

// recv returns the next datagram, or "" and the error if none came within.
func (f *udpFlow) recv(within time.Duration) (string, error) {
	_ = f.conn.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 9000)
	n, err := f.conn.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func (f *udpFlow) expect(want string, within time.Duration) {
	f.t.Helper()
	if got, err := f.recv(within); got != want {
		f.t.Fatalf("flow %s: got %q (err %v), want %q", f.name, got, err, want)
	}
}

// keepSending sends next() every interval until the returned stop is
// called; stop returns once the sender has ended, may be called more than
// once, and is called at the end of the test in any case.
func (f *udpFlow) keepSending(interval time.Duration, next func() string) (stop func()) {
	quit, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
				f.send(next())
			}
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() { close(quit) })
		<-stopped
	}
	f.t.Cleanup(stop)
	return stop
}

// Config loads through the admin API.

// adminLoad posts a config to the admin API's /load.
func adminLoad(t *testing.T, admin string, cfg obj) (int, string) {
	t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	code, body := adminDo(t, http.MethodPost, "http://"+admin+"/load", "application/json", raw)
	return code, string(body)
}

// zoneLimits returns the settings in force of a named zone.
func zoneLimits(t *testing.T, name string) engine.Limits {
	t.Helper()
	z, ok := zones.Zone(name)
	if !ok {
		t.Fatalf("zone %q unknown", name)
	}
	return z.Snapshot(time.Now(), 0).Limits
}

// The admin API and the metrics.

// scrape reads the admin /metrics and returns the connection_limit series,
// keyed by name and labels as printed (e.g. `..._active{zone="ops"}`).
func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, "http://"+admin+"/metrics", "", nil)
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_layer4_connection_limit_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		m[line[:i]] = v
	}
	return m
}

// expectMetrics checks the series of zone ops against want (names without
// the common prefix, labels after the zone); a series not exported fails.
func expectMetrics(t *testing.T, admin, zone string, want map[string]float64) {
	t.Helper()
	got := scrape(t, admin)
	for k, v := range want {
		name, extra, _ := strings.Cut(k, "|")
		series := fmt.Sprintf(`caddy_layer4_connection_limit_%s{zone="%s"}`, name, zone)
		switch {
		case strings.HasPrefix(extra, "le="): // histogram buckets put le last
			series = fmt.Sprintf(`caddy_layer4_connection_limit_%s{zone="%s",%s}`, name, zone, extra)
		case extra != "":
			series = fmt.Sprintf(`caddy_layer4_connection_limit_%s{%s,zone="%s"}`, name, extra, zone)
		}
		if g, ok := got[series]; !ok || g != v {
			t.Errorf("%s = %v (exported: %v), want %v", series, g, ok, v)
		}
	}
}

func getZone(t *testing.T, admin, zone string) zoneDetailJSON {
	t.Helper()
	code, body := adminDo(t, http.MethodGet, "http://"+admin+"/connection_limit/"+zone, "", nil)
	if code != http.StatusOK {
		t.Fatalf("GET zone %s: %d %s", zone, code, body)
	}
	if !strings.Contains(string(body), `"waiters":[`) {
		t.Fatalf("GET zone %s: no waiters list in %s", zone, body)
	}
	var z zoneDetailJSON
	if err := json.Unmarshal(body, &z); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	return z
}

func expectZone(t *testing.T, z zoneDetailJSON, active, waiting int, admitted, rejected, abandoned uint64, paused bool) {
	t.Helper()
	if z.Active != active || z.Waiting != waiting || z.Admitted != admitted || z.Rejected != rejected || z.Abandoned != abandoned || z.Paused != paused {
		t.Fatalf("zone %s: active %d waiting %d admitted %d rejected %d abandoned %d paused %v; want %d %d %d %d %d %v",
			z.Zone, z.Active, z.Waiting, z.Admitted, z.Rejected, z.Abandoned, z.Paused,
			active, waiting, admitted, rejected, abandoned, paused)
	}
}
