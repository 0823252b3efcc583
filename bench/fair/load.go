package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

// tenant is one tenant of the load: its clients connect from its own
// source address, which the proxy's fair_share ({l4.conn.remote_ip})
// tells apart.
type tenant struct {
	name    string
	ip      net.IP
	clients int
	weight  int // in the weighted variant; 1 otherwise
}

// backend holds each connection hold, answers "ok\n" and closes. The
// first line of a connection names its tenant and when its client started
// to connect; from them it records each connection's wait (client connect
// start → backend sees the line: the time in the limiter's queue, plus a
// connect and a proxy dial) and, per tenant, the slots held over time.
type backend struct {
	ln      *net.TCPListener
	base    time.Time
	hold    time.Duration
	tenants int
	stop    chan struct{}
	wg      sync.WaitGroup

	mu       sync.Mutex
	from, to int64   // the measured window, ns since base
	active   []int   // per tenant, now
	since    int64   // when active last changed
	area     []int64 // per tenant: slot·ns held within the window
	waits    [][]int64
	done     []int // per tenant: answered and closed within the window
	peak     int
	total    int
	bad      atomic.Int64
	conns    map[net.Conn]struct{}
	accepted atomic.Int64
}

func newBackend(base time.Time, hold time.Duration, tenants int) (*backend, error) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	b := &backend{ln: ln, base: base, hold: hold, tenants: tenants, stop: make(chan struct{}),
		active: make([]int, tenants), area: make([]int64, tenants), waits: make([][]int64, tenants),
		done: make([]int, tenants), conns: map[net.Conn]struct{}{}, from: -1, to: -1}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

func (b *backend) addr() string { return b.ln.Addr().String() }
func (b *backend) now() int64   { return int64(time.Since(b.base)) }

// window sets the measured window, ns since base.
func (b *backend) window(from, to int64) {
	b.mu.Lock()
	b.from, b.to = from, to
	b.mu.Unlock()
}

// advance adds the slots held since the last change to the areas. Lock held.
func (b *backend) advance(t int64) {
	lo, hi := max(b.since, b.from), min(t, b.to)
	if b.from >= 0 && hi > lo {
		for i, n := range b.active {
			b.area[i] += int64(n) * (hi - lo)
		}
	}
	b.since = t
}

func (b *backend) inWindow(t int64) bool { return b.from >= 0 && t >= b.from && t < b.to }

func (b *backend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.accepted.Add(1)
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go b.serve(c)
	}
}

// serve reads "<tenant> <client start ns>\n", holds, answers and closes.
func (b *backend) serve(c net.Conn) {
	defer b.wg.Done()
	defer func() {
		b.mu.Lock()
		delete(b.conns, c)
		b.mu.Unlock()
		_ = c.Close()
	}()
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
	line, err := bufio.NewReaderSize(c, 64).ReadString('\n')
	t := b.now()
	f := strings.Fields(line)
	var ti int
	var start int64
	if err == nil && len(f) == 2 {
		ti, err = strconv.Atoi(f[0])
		if err == nil {
			start, err = strconv.ParseInt(f[1], 10, 64)
		}
	}
	if err != nil || len(f) != 2 || ti < 0 || ti >= b.tenants {
		b.bad.Add(1)
		return
	}
	b.mu.Lock()
	b.advance(t)
	b.active[ti]++
	b.total++
	if n := b.sum(); n > b.peak {
		b.peak = n
	}
	if b.inWindow(t) {
		b.waits[ti] = append(b.waits[ti], t-start)
	}
	b.mu.Unlock()
	select {
	case <-time.After(b.hold):
	case <-b.stop:
	}
	_, _ = c.Write([]byte("ok\n"))
	t = b.now()
	b.mu.Lock()
	b.advance(t)
	b.active[ti]--
	if b.inWindow(t) {
		b.done[ti]++
	}
	b.mu.Unlock()
}

func (b *backend) sum() int {
	n := 0
	for _, a := range b.active {
		n += a
	}
	return n
}

// result is what the backend saw in the window: per tenant, the mean
// slots held, the waits (sorted) and the connections done.
func (b *backend) result() (held []float64, waits [][]int64, done []int, peak int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.advance(b.now())
	for i := range b.area {
		held = append(held, float64(b.area[i])/float64(b.to-b.from))
		w := slices.Clone(b.waits[i])
		slices.Sort(w)
		waits = append(waits, w)
	}
	return held, waits, slices.Clone(b.done), b.peak
}

// close stops the backend: held connections are answered, and it waits
// for them (at most 5 s).
func (b *backend) close() {
	_ = b.ln.Close()
	close(b.stop)
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		b.mu.Lock()
		for c := range b.conns {
			_ = c.Close()
		}
		b.mu.Unlock()
	}
}

// loadStats is what the clients saw over the whole run.
type loadStats struct {
	started, failed, timeouts atomic.Int64
}

// runClients runs every tenant's clients in a closed loop (connect, send
// the line, read the answer to EOF, close, again) until end; connections
// still open at hardStop are cut.
func runClients(addr string, base time.Time, tenants []tenant, end, hardStop time.Time) *loadStats {
	st := &loadStats{}
	var wg sync.WaitGroup
	for ti, tn := range tenants {
		for range tn.clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 0, 40)
				var reply [16]byte
				for time.Now().Before(end) {
					start := time.Since(base)
					st.started.Add(1)
					c, err := benchkit.DialFrom(tn.ip, addr, hardStop)
					if err != nil {
						st.failed.Add(1)
						time.Sleep(time.Millisecond)
						continue
					}
					_ = c.SetDeadline(hardStop)
					buf = fmt.Appendf(buf[:0], "%d %d\n", ti, int64(start))
					_, err = c.Write(buf)
					n := 0
					for err == nil && n < len(reply) {
						var m int
						m, err = c.Read(reply[n:])
						n += m
					}
					_ = c.Close()
					switch {
					case errors.Is(err, os.ErrDeadlineExceeded):
						st.timeouts.Add(1)
					case n < 3 || string(reply[:3]) != "ok\n":
						st.failed.Add(1)
						time.Sleep(time.Millisecond)
					}
				}
			}()
		}
	}
	wg.Wait()
	return st
}
