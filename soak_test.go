package connlimit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/l4-connlimit/connlimit/internal/platform"
	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/mholt/caddy-l4/layer4"
)

// The chaos soak: many clients connect, wait, abandon, reset, half-close
// and read slowly at random, while the limit changes by config load and by
// the limits route and the zone is paused now and then. It checks that the
// backend never has more connections than the limit in force allows, that
// every client gets its own reply or a close, that the counts add up
// exactly, and that the zone ends empty.
//
// CONNLIMIT_SOAK_CONNS=100000 runs it longer and prints its figures (the
// default is a short run for the suite).
func TestChaosSoak(t *testing.T) {
	conns := 8000
	if s := os.Getenv("CONNLIMIT_SOAK_CONNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("CONNLIMIT_SOAK_CONNS=%q: want a positive integer", s)
		}
		conns = n
	}
	const workers = 44
	migrate, migrateKnown := platform.TCPMigrateReq()

	be := newSoakBackend(t)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	zone := fmt.Sprintf("soak%d", time.Now().UnixNano())
	arrivals := new(atomic.Int64)
	soakArrivals.Store(zone, arrivals)
	defer soakArrivals.Delete(zone)
	cfg := func(max int) obj {
		return l4Config(admin, listen,
			obj{"handler": "soak_count", "zone": zone},
			limit(obj{"max_connections": max, "zone": zone, "max_waiting": 40, "wait_timeout": "1s", "keep_half_closed": true}),
			proxyTo(be.addr()))
	}
	be.limits.set(4)
	loadConfig(t, cfg(4))
	defer stopCaddy(t)

	// The operator: config loads, overrides and pauses, until the clients
	// are done.
	stop := make(chan struct{})
	var ops soakOps
	opsDone := make(chan struct{})
	go func() {
		defer close(opsDone)
		ops.run(t, be, admin, zone, cfg, stop)
	}()

	start := time.Now()
	var next atomic.Int64
	var res soakResults
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(next.Load())))
			for {
				i := next.Add(1)
				if i > int64(conns) {
					return
				}
				o, detail := soakClient(listen, fmt.Sprintf("c%d", i), rng)
				res.add(o, detail)
				if o == soakClosed { // rejected: back off a little, as clients do
					time.Sleep(time.Duration(rng.IntN(5)) * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-opsDone
	took := time.Since(start)
	if ops.err != nil {
		t.Fatal(ops.err)
	}

	// Nothing active or waiting, and every connection that reached the
	// handler was admitted, rejected or abandoned, exactly once.
	waitCounts(t, zone, 0, 0)
	s := zoneSnapshot(t, zone)
	reached := arrivals.Load()
	settled := int64(s.Counters.Admitted + s.Counters.RejectedTotal() + s.Counters.Abandoned)
	if settled != reached {
		t.Errorf("admitted %d + rejected %d + abandoned %d = %d, but %d connections reached the handler",
			s.Counters.Admitted, s.Counters.RejectedTotal(), s.Counters.Abandoned, settled, reached)
	}
	be.wait(t)
	if got := be.total.Load(); got != int64(s.Counters.Admitted) {
		t.Errorf("the backend accepted %d connections, the zone admitted %d", got, s.Counters.Admitted)
	}
	if v := be.violations.Load(); v != 0 {
		t.Errorf("the backend had more connections than the limit in force allows %d times; first: %s", v, be.firstViolation.Load())
	}
	if res.wrong.Load() != 0 {
		t.Errorf("%d clients got a reply that was not theirs: %s", res.wrong.Load(), res.firstWrong.Load())
	}
	// A client that reached no handler was reset by a config load (the
	// kernel resets what is queued on a closing listener unless
	// net.ipv4.tcp_migrate_req is 1; README, "Config reloads").
	lost := int64(conns) - reached
	switch {
	case lost < 0:
		t.Errorf("%d connections reached the handler, more than the %d clients made", reached, conns)
	case lost > 0 && migrate:
		t.Errorf("%d connections never reached the handler although net.ipv4.tcp_migrate_req is 1", lost)
	case lost > 0:
		t.Logf("%d connections never reached the handler: reset by config loads (net.ipv4.tcp_migrate_req is 0, known %v)", lost, migrateKnown)
	}
	summary := fmt.Sprintf("%d connections in %s (%.0f/s) by %d clients: %d replies, %d closed unserved, %d left on purpose; "+
		"zone: %d admitted, %d rejected %v, %d abandoned; backend peak %d; %d config loads, %d overrides, %d pauses; "+
		"%d never reached the handler (net.ipv4.tcp_migrate_req %v)",
		conns, took.Round(time.Millisecond), float64(conns)/took.Seconds(), workers,
		res.replies.Load(), res.closed.Load(), res.aborted.Load(),
		s.Counters.Admitted, s.Counters.RejectedTotal(), s.Counters.Rejected[1:], s.Counters.Abandoned,
		be.peak.Load(), ops.loads, ops.overrides, ops.pauses, lost, migrate)
	t.Log(summary)
	if os.Getenv("CONNLIMIT_SOAK_CONNS") != "" {
		fmt.Println("soak:", summary)
	}
	if res.replies.Load() == 0 || s.Counters.Abandoned == 0 || s.Counters.RejectedTotal() == 0 || ops.loads == 0 || ops.overrides == 0 || ops.pauses == 0 {
		t.Errorf("the run did not exercise every path: %s", summary)
	}
}

// soakArrivals counts, per zone, the connections that reached the route
// (the soak_count handler in front of connection_limit).
var soakArrivals sync.Map // zone -> *atomic.Int64

func init() { caddy.RegisterModule(soakCount{}) }

// soakCount is a test handler that counts connections and hands them on.
type soakCount struct {
	Zone string `json:"zone"`
}

func (soakCount) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "layer4.handlers.soak_count", New: func() caddy.Module { return new(soakCount) }}
}

func (h soakCount) Handle(cx *layer4.Connection, next layer4.Handler) error {
	if n, ok := soakArrivals.Load(h.Zone); ok {
		n.(*atomic.Int64).Add(1)
	}
	return next.Handle(cx)
}

// limitHistory records the limit in force over time. While a change is
// under way both the old and the new one may hold, so the larger is
// recorded from when it starts until it is done.
type limitHistory struct {
	mu      sync.Mutex
	changes []limitChange
}

type limitChange struct {
	at  time.Time
	max int
}

func (h *limitHistory) set(max int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.changes = append(h.changes, limitChange{time.Now(), max})
}

// change records a change from old to new made by f.
func (h *limitHistory) change(old, new int, f func() error) error {
	h.set(max(old, new))
	err := f()
	h.set(new)
	if err != nil {
		h.set(max(old, new)) // whether it took hold is not known
	}
	return err
}

// maxSince is the largest limit in force at any time from since on.
func (h *limitHistory) maxSince(since time.Time) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := 0
	for i := len(h.changes) - 1; i >= 0; i-- {
		c := h.changes[i]
		m = max(m, c.max)
		if !c.at.After(since) {
			break
		}
	}
	return m
}

// soakBackend serves "<id> <n> <hold ms> <connect unix ns>\n" followed by
// n bytes: it holds the connection, then answers "<id> <n> <sha256>" and
// waits for the client to close. At each request it checks its count of
// open connections against the limit: every connection open now was
// admitted after its client connected, and the last of them was admitted
// while all the others held their slots, so the count cannot exceed the
// largest limit in force since the earliest of those connects. (Those the
// proxy has closed or half-closed are not counted: a slot can be freed
// before this side has read the close.)
type soakBackend struct {
	t              testing.TB
	ln             net.Listener
	limits         limitHistory
	total          atomic.Int64
	peak           atomic.Int64 // of the open connections counted at a request
	violations     atomic.Int64
	firstViolation atomic.Value
	wg             sync.WaitGroup

	mu   sync.Mutex
	open map[net.Conn]time.Time // connect time of its client (or a bound below it)
}

func newSoakBackend(t testing.TB) *soakBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &soakBackend{t: t, ln: ln, open: map[net.Conn]time.Time{}}
	b.firstViolation.Store("")
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				b.handle(c)
			}()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); b.wg.Wait() })
	return b
}

func (b *soakBackend) addr() string { return b.ln.Addr().String() }

// wait waits until every backend connection has ended.
func (b *soakBackend) wait(t testing.TB) {
	testkit.WaitFor(t, 10*time.Second, "the backend's connections to end", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.open) == 0
	})
}

// maxWait bounds how long before its backend connection a client can have
// connected whose request line never came: wait_timeout and slack.
const soakMaxWait = 3 * time.Second

func (b *soakBackend) handle(c net.Conn) {
	defer c.Close()
	b.total.Add(1)
	b.mu.Lock()
	b.open[c] = time.Now().Add(-soakMaxWait)
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.open, c)
		b.mu.Unlock()
	}()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	var id string
	var n, hold, connected int64
	if _, err := fmt.Sscanf(line, "%s %d %d %d", &id, &n, &hold, &connected); err != nil {
		return
	}
	b.mu.Lock()
	b.open[c] = time.Unix(0, connected)
	earliest, count := time.Now(), 0
	for oc, at := range b.open {
		// The proxy may have closed a connection whose goroutine here has
		// not noticed yet (it sleeps): its slot may be free already.
		if oc != c && probeConn(oc) == platform.PeerGone {
			continue
		}
		count++
		if at.Before(earliest) {
			earliest = at
		}
	}
	if int64(count) > b.peak.Load() {
		b.peak.Store(int64(count))
	}
	b.mu.Unlock()
	if allowed := b.limits.maxSince(earliest); count > allowed {
		if b.violations.Add(1) == 1 {
			b.firstViolation.Store(fmt.Sprintf("%d open at %s, limit at most %d since %s", count, time.Now().Format(time.StampMicro), allowed, earliest.Format(time.StampMicro)))
		}
	}
	h := sha256.New()
	got, _ := io.CopyN(h, br, n)
	time.Sleep(time.Duration(hold) * time.Millisecond)
	fmt.Fprintf(c, "%s %d %s\n", id, got, hex.EncodeToString(h.Sum(nil)))
	_, _ = io.Copy(io.Discard, br)
}

// soakResults are what the clients saw.
type soakResults struct {
	replies, closed, aborted, wrong atomic.Int64
	firstWrong                      atomic.Value
}

type soakOutcome int

const (
	soakReply   soakOutcome = iota // its own reply
	soakClosed                     // closed (or reset) without a byte: rejected, abandoned, or lost at a load
	soakAborted                    // the client left on purpose
	soakWrong                      // anything else
)

func (r *soakResults) add(o soakOutcome, detail string) {
	switch o {
	case soakReply:
		r.replies.Add(1)
	case soakClosed:
		r.closed.Add(1)
	case soakAborted:
		r.aborted.Add(1)
	default:
		if r.wrong.Add(1) == 1 {
			r.firstWrong.Store(detail)
		}
	}
}

// soakClient makes one connection with a behaviour picked at random.
func soakClient(addr, id string, rng *rand.Rand) (soakOutcome, string) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if errors.Is(err, syscall.ECONNRESET) {
		return soakClosed, "" // reset by a config load (see lost)
	}
	if err != nil {
		return soakWrong, fmt.Sprintf("%s: dial: %v", id, err)
	}
	tc := c.(*net.TCPConn)
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
	payload := make([]byte, rng.IntN(32<<10))
	for i := range payload {
		payload[i] = byte(rng.Uint32())
	}
	hold := rng.IntN(12)
	line := fmt.Sprintf("%s %d %d %d\n", id, len(payload), hold, time.Now().UnixNano())
	sum := sha256.Sum256(payload)
	want := fmt.Sprintf("%s %d %s", id, len(payload), hex.EncodeToString(sum[:]))

	switch p := rng.IntN(100); {
	case p < 10: // abandons: sends part, waits a little, closes
		_, _ = tc.Write([]byte(line))
		time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
		return soakAborted, ""
	case p < 18: // resets
		_, _ = tc.Write([]byte(line))
		time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
		_ = tc.SetLinger(0)
		return soakAborted, ""
	case p < 26: // closes at once, having sent nothing
		return soakAborted, ""
	case p < 40: // half-closes after its request, then reads the reply
		if _, err := tc.Write(append([]byte(line), payload...)); err != nil {
			return soakClosed, ""
		}
		_ = tc.CloseWrite()
	case p < 52: // sends slowly
		if _, err := tc.Write([]byte(line)); err != nil {
			return soakClosed, ""
		}
		for rest := payload; len(rest) > 0; {
			k := min(len(rest), 4096)
			if _, err := tc.Write(rest[:k]); err != nil {
				return soakClosed, ""
			}
			rest = rest[k:]
			time.Sleep(time.Millisecond)
		}
	case p < 62: // reads slowly
		if _, err := tc.Write(append([]byte(line), payload...)); err != nil {
			return soakClosed, ""
		}
		time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
	default: // plain
		if _, err := tc.Write(append([]byte(line), payload...)); err != nil {
			return soakClosed, ""
		}
	}
	got, err := bufio.NewReader(tc).ReadString('\n')
	switch {
	case err == nil && strings.TrimSpace(got) == want:
		return soakReply, ""
	case got == "" && err != nil && !isTimeout(err):
		return soakClosed, ""
	}
	return soakWrong, fmt.Sprintf("%s: got %q (err %v), want %q", id, got, err, want)
}

// soakOps is the operator of the soak: it changes the limit by config
// load and through the limits route, and pauses the zone, at random.
type soakOps struct {
	loads, overrides, pauses int
	err                      error
}

func (o *soakOps) run(t testing.TB, be *soakBackend, admin, zone string, cfg func(int) obj, stop <-chan struct{}) {
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	config, inForce := 4, 4
	api := "http://" + admin + "/connection_limit/" + zone
	for o.err == nil {
		select {
		case <-stop:
			return
		case <-time.After(time.Duration(150+rng.IntN(250)) * time.Millisecond):
		}
		switch step := o.loads + o.overrides + o.pauses; {
		case step%3 == 0: // a config load with a new max_connections: ends any override
			next := 1 + rng.IntN(8)
			if next == config {
				next = config%8 + 1
			}
			raw, _ := json.Marshal(cfg(next))
			o.err = be.limits.change(inForce, next, func() error { return caddy.Load(raw, true) })
			config, inForce = next, next
			o.loads++
		case step%3 == 1: // an override through the admin API
			next := 1 + rng.IntN(8)
			o.err = be.limits.change(inForce, next, func() error {
				return soakAdmin(http.MethodPost, api+"/limits", fmt.Sprintf(`{"max_connections": %d}`, next))
			})
			inForce = next
			o.overrides++
		default: // a short pause
			o.err = soakAdmin(http.MethodPost, api+"/pause", "")
			time.Sleep(time.Duration(20+rng.IntN(80)) * time.Millisecond)
			if o.err == nil {
				o.err = soakAdmin(http.MethodPost, api+"/resume", "")
			}
			o.pauses++
		}
	}
}

// soakAdmin sends an admin request, again if the admin server was being
// replaced by a load (no answer came).
func soakAdmin(method, url, body string) error {
	var err error
	for range 20 {
		var req *http.Request
		req, err = http.NewRequest(method, url, bytes.NewReader([]byte(body)))
		if err != nil {
			return err
		}
		req.Close = true
		var resp *http.Response
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s %s: %d %s", method, url, resp.StatusCode, b)
		}
		return nil
	}
	return fmt.Errorf("%s %s: %v", method, url, err)
}

// Interface guard
var _ layer4.NextHandler = soakCount{}
