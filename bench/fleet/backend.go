package main

import (
	"bytes"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// backend is the benchmark's upstream server. Each connection sends one
// line; the backend answers "ok\n" and closes. How long it holds a
// connection first depends on the mode in force when it reads the line:
// hold (0: answer at once), or gated: the connection is handed to the
// driver (gate) with the time it was accepted, and answered when the
// driver closes its release channel. It counts its peak concurrency (from
// Accept returning to just before Close, so a proxy sees a slot free only
// after it was counted free).
type backend struct {
	ln   *net.TCPListener
	base time.Time

	hold   atomic.Int64 // ns
	gated  atomic.Bool
	gate   chan *heldConn
	stop   chan struct{}
	active atomic.Int64
	peak   atomic.Int64
	served atomic.Int64
	bad    atomic.Int64

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}

	// while record: when each connection was accepted and closed (ns
	// since base), for the hand-off gaps of a run
	record  atomic.Bool
	accepts []int64
	closes  []int64
}

// heldConn is a gated connection.
type heldConn struct {
	line     string
	accepted time.Time
	release  chan struct{}
	closed   chan time.Time // when the backend closed it (just before Close)
}

func newBackend() (*backend, error) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	b := &backend{ln: ln, base: time.Now(), gate: make(chan *heldConn, 16), stop: make(chan struct{}),
		conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go b.acceptLoop()
	return b, nil
}

func (b *backend) addr() string { return b.ln.Addr().String() }

// setHold: answer each connection after d. resetPeak starts a new peak.
func (b *backend) setHold(d time.Duration) {
	b.gated.Store(false)
	b.hold.Store(int64(d))
}

func (b *backend) setGated() { b.gated.Store(true) }

func (b *backend) resetPeak() { b.peak.Store(b.active.Load()) }

func (b *backend) acceptLoop() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		at := time.Now()
		n := b.active.Add(1)
		for {
			p := b.peak.Load()
			if n <= p || b.peak.CompareAndSwap(p, n) {
				break
			}
		}
		b.mu.Lock()
		b.conns[c] = struct{}{}
		if b.record.Load() {
			b.accepts = append(b.accepts, int64(at.Sub(b.base)))
		}
		b.mu.Unlock()
		b.wg.Add(1)
		go b.serve(c, at)
	}
}

func (b *backend) serve(c net.Conn, at time.Time) {
	defer b.wg.Done()
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
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
	var closed chan time.Time
	if ok {
		switch {
		case b.gated.Load():
			line, _, _ := bytes.Cut(buf[:n], []byte("\n"))
			h := &heldConn{line: string(line), accepted: at, release: make(chan struct{}), closed: make(chan time.Time, 1)}
			closed = h.closed
			select {
			case b.gate <- h:
				select {
				case <-h.release:
				case <-b.stop:
				}
			case <-b.stop:
			}
		case b.hold.Load() > 0:
			t := time.NewTimer(time.Duration(b.hold.Load()))
			select {
			case <-t.C:
			case <-b.stop:
				t.Stop()
			}
		}
		_, _ = c.Write([]byte("ok\n"))
	} else {
		b.bad.Add(1)
	}
	b.active.Add(-1)
	now := time.Now()
	if closed != nil {
		closed <- now
	}
	b.mu.Lock()
	delete(b.conns, c)
	if b.record.Load() {
		b.closes = append(b.closes, int64(now.Sub(b.base)))
	}
	b.mu.Unlock()
	_ = c.Close()
	if ok {
		b.served.Add(1)
	}
}

// startRecording starts recording accepts and closes afresh.
func (b *backend) startRecording() {
	b.mu.Lock()
	b.accepts, b.closes = b.accepts[:0], b.closes[:0]
	b.mu.Unlock()
	b.record.Store(true)
}

// stopRecording stops recording and returns what was recorded.
func (b *backend) stopRecording() (accepts, closes []int64) {
	b.record.Store(false)
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.accepts), slices.Clone(b.closes)
}

// close stops the backend; it waits at most 5 s for its connections.
func (b *backend) close() {
	_ = b.ln.Close()
	close(b.stop)
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
