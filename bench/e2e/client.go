package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

// readReply reads until EOF (the proxy closes after the backend did) and
// checks the answer. Reading to EOF makes the client the passive closer,
// so its ephemeral ports do not sit in TIME_WAIT.
func readReply(c net.Conn) error {
	var buf [64]byte
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return errTimeout
			}
			if n >= 3 && bytes.HasPrefix(buf[:n], []byte("ok\n")) {
				return nil // EOF (or reset after the answer)
			}
			return errBadReply
		}
		if n == len(buf) {
			return errBadReply
		}
	}
}

var (
	errTimeout  = errors.New("timeout")
	errBadReply = errors.New("bad or missing reply")
)

// loadResult is what the load client measured.
type loadResult struct {
	completed int     // connections answered, ending inside the window
	lat       []int64 // their latencies (dial start to EOF), ns, sorted
	failed    int     // connections that failed, ending inside the window
	dialErrs  int     // whole run
	timeouts  int     // whole run (still waiting at the hard stop)
	bad       int     // whole run
	started   int     // whole run
}

// runLoad runs workers that each loop: connect, send a line, read the
// reply to EOF, close, until mEnd. Connections still open at hardStop are
// cut (counted as timeouts). Times are relative to base.
func runLoad(addr string, workers int, d *benchkit.Dialer, mStart, mEnd, hardStop time.Time) *loadResult {
	type wres struct {
		completed, failed, dialErrs, timeouts, bad, started int
		lat                                                 []int64
	}
	res := make([]wres, workers)
	var wg sync.WaitGroup
	var seq atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func(r *wres) {
			defer wg.Done()
			r.lat = make([]int64, 0, 4096)
			line := make([]byte, 0, 24)
			for time.Now().Before(mEnd) {
				t0 := time.Now()
				r.started++
				c, err := d.Dial(addr, hardStop)
				if err != nil {
					r.dialErrs++
					if t := time.Now(); !t.Before(mStart) && t.Before(mEnd) {
						r.failed++
					}
					time.Sleep(time.Millisecond)
					continue
				}
				_ = c.SetDeadline(hardStop)
				line = strconv.AppendInt(line[:0], seq.Add(1), 10)
				line = append(line, '\n')
				_, err = c.Write(line)
				if err == nil {
					err = readReply(c)
				}
				_ = c.Close()
				t1 := time.Now()
				switch err {
				case nil:
				case errTimeout:
					r.timeouts++
				default:
					r.bad++
				}
				if t1.Before(mStart) || !t1.Before(mEnd) {
					continue
				}
				if err != nil {
					r.failed++
					continue
				}
				r.completed++
				r.lat = append(r.lat, int64(t1.Sub(t0)))
			}
		}(&res[w])
	}
	wg.Wait()
	out := &loadResult{}
	for _, r := range res {
		out.completed += r.completed
		out.failed += r.failed
		out.dialErrs += r.dialErrs
		out.timeouts += r.timeouts
		out.bad += r.bad
		out.started += r.started
		out.lat = append(out.lat, r.lat...)
	}
	slices.Sort(out.lat)
	return out
}

// waiterClient holds the connections of a scale run: each sends its index
// and waits for its answer.
type waiterClient struct {
	wg       sync.WaitGroup
	ok       atomic.Int64
	failed   atomic.Int64
	mu       sync.Mutex
	conns    []net.Conn
	lastDone atomic.Int64 // ns since base of the last answer
	base     time.Time
	byAddr   map[string]int // client address of the first waiters -> index
	doneAt   []atomic.Int64 // per index: when its answer and EOF arrived (ns since base)
}

// open dials index idx, sends it and starts reading the answer.
func (w *waiterClient) open(d *benchkit.Dialer, addr string, idx int, deadline time.Time) error {
	c, err := d.Dial(addr, deadline)
	if err != nil {
		return err
	}
	_ = c.SetDeadline(deadline)
	if _, err := c.Write(append(strconv.AppendInt(nil, int64(idx), 10), '\n')); err != nil {
		_ = c.Close()
		return err
	}
	w.mu.Lock()
	w.conns = append(w.conns, c)
	if idx <= 200 {
		if w.byAddr == nil {
			w.byAddr = map[string]int{}
		}
		w.byAddr[c.LocalAddr().String()] = idx
	}
	w.mu.Unlock()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		err := readReply(c)
		_ = c.Close()
		if err != nil {
			w.failed.Add(1)
			return
		}
		w.ok.Add(1)
		t := int64(time.Since(w.base))
		if idx < len(w.doneAt) {
			w.doneAt[idx].Store(t)
		}
		for {
			p := w.lastDone.Load()
			if t <= p || w.lastDone.CompareAndSwap(p, t) {
				break
			}
		}
	}()
	return nil
}

// closeAll cuts every connection still open and waits (bounded) for the
// readers.
func (w *waiterClient) closeAll(wait time.Duration) {
	w.mu.Lock()
	for _, c := range w.conns {
		_ = c.SetDeadline(time.Now())
	}
	w.mu.Unlock()
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(wait):
	}
}
