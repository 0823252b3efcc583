package main

import (
	"bytes"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// backend is the benchmark's upstream server. Each connection sends one
// line; the backend holds the connection for hold, answers "ok\n" and
// closes it. It records when it accepted and when it closed each
// connection, its peak concurrency (counted from Accept returning to just
// before Close, so a proxy can only see the slot free after it is counted
// free), and, in scale mode, the order in which the client indices
// arrived. In scale mode the connection that sends index 0 (the holder) is
// held until release is closed, and the others are answered at once.
type backend struct {
	ln    *net.TCPListener
	base  time.Time
	hold  time.Duration
	scale bool

	release  chan struct{}
	holderIn chan struct{}
	stop     chan struct{}
	holdOnce sync.Once

	active atomic.Int64
	peak   atomic.Int64
	served atomic.Int64 // answered and closed
	bad    atomic.Int64 // closed without a proper line

	mu        sync.Mutex
	accepts   []int64 // ns since base, in accept order
	closes    []int64 // ns since base
	order     []int64 // scale: index received on the n-th accepted connection (-1: none)
	closeSeq  []int64 // scale: when the n-th accepted connection was closed
	lastClose int64
	wg        sync.WaitGroup
	conns     map[net.Conn]struct{}
}

func newBackend(base time.Time, hold time.Duration, scale bool, expect int) (*backend, error) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	b := &backend{
		ln: ln, base: base, hold: hold, scale: scale,
		release: make(chan struct{}), holderIn: make(chan struct{}), stop: make(chan struct{}),
		accepts: make([]int64, 0, expect), closes: make([]int64, 0, expect),
		conns: make(map[net.Conn]struct{}),
	}
	if scale {
		b.order = make([]int64, 0, expect)
		b.closeSeq = make([]int64, 0, expect)
	}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

func (b *backend) addr() string { return b.ln.Addr().String() }
func (b *backend) now() int64   { return int64(time.Since(b.base)) }

func (b *backend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		t := b.now()
		n := b.active.Add(1)
		for {
			p := b.peak.Load()
			if n <= p || b.peak.CompareAndSwap(p, n) {
				break
			}
		}
		b.mu.Lock()
		seq := len(b.accepts)
		b.accepts = append(b.accepts, t)
		if b.scale {
			b.order = append(b.order, -1)
			b.closeSeq = append(b.closeSeq, -1)
		}
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go b.serve(c, seq)
	}
}

func (b *backend) serve(c net.Conn, seq int) {
	defer b.wg.Done()
	_ = c.SetDeadline(time.Now().Add(10 * time.Minute))
	var buf [64]byte
	n := 0
	ok := false
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if bytes.IndexByte(buf[:n], '\n') >= 0 {
			ok = true
			break
		}
		if err != nil {
			break
		}
	}
	idx := int64(-1)
	if ok {
		line, _, _ := bytes.Cut(buf[:n], []byte("\n"))
		if v, err := strconv.ParseInt(string(line), 10, 64); err == nil {
			idx = v
		}
	}
	if ok && b.scale {
		b.mu.Lock()
		b.order[seq] = idx
		b.mu.Unlock()
	}
	if ok {
		switch {
		case b.scale && idx == 0:
			b.holdOnce.Do(func() { close(b.holderIn) })
			select {
			case <-b.release:
			case <-b.stop:
			}
		case b.hold > 0:
			select {
			case <-time.After(b.hold):
			case <-b.stop:
			}
		}
		_, _ = c.Write([]byte("ok\n"))
	} else {
		b.bad.Add(1)
	}
	t := b.now()
	b.active.Add(-1)
	b.mu.Lock()
	b.closes = append(b.closes, t)
	if b.scale {
		b.closeSeq[seq] = t
	}
	if t > b.lastClose {
		b.lastClose = t
	}
	delete(b.conns, c)
	b.mu.Unlock()
	if ok {
		b.served.Add(1)
	}
	_ = c.Close()
}

// closeTimes copies the close time of each accepted connection (scale mode).
func (b *backend) closeTimes() []int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]int64(nil), b.closeSeq...)
}

// snapshot copies the recorded events.
func (b *backend) snapshot() (accepts, closes, order []int64, lastClose int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]int64(nil), b.accepts...), append([]int64(nil), b.closes...),
		append([]int64(nil), b.order...), b.lastClose
}

// close stops the backend: no new connections, held ones are answered,
// open ones are closed. It waits at most 5 s.
func (b *backend) close() {
	_ = b.ln.Close()
	select {
	case <-b.stop:
	default:
		close(b.stop)
	}
	b.mu.Lock()
	for c := range b.conns {
		_ = c.SetDeadline(time.Now())
	}
	b.mu.Unlock()
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
}
