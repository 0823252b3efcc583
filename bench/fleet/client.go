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

var (
	errTimeout  = errors.New("timeout")
	errBadReply = errors.New("bad or missing reply")
)

// exchange sends line on c and reads the reply to EOF (the proxy closes
// after the backend did), so that the client is the passive closer.
// firstByte, if not nil, is set when the reply's first byte arrives.
func exchange(c net.Conn, line []byte, firstByte *time.Time) error {
	if _, err := c.Write(line); err != nil {
		return err
	}
	var buf [64]byte
	n := 0
	for {
		m, err := c.Read(buf[n:])
		if m > 0 && n == 0 && firstByte != nil {
			*firstByte = time.Now()
		}
		n += m
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return errTimeout
			}
			if n >= 3 && bytes.HasPrefix(buf[:n], []byte("ok\n")) {
				return nil
			}
			return errBadReply
		}
		if n == len(buf) {
			return errBadReply
		}
	}
}

// loadResult is what a closed-loop load measured.
type loadResult struct {
	completed int     // answered, ending inside the window
	lat       []int64 // their latencies (dial start to EOF), ns, sorted
	failed    int     // failed, ending inside the window
	errs      int     // failed, whole run (dial errors, timeouts, bad replies)
}

// runLoad runs workers, worker i on addrs[i%len(addrs)], each in a loop:
// connect, send a line, read the reply to EOF, close; until mEnd.
// Connections still open at hardStop are cut.
func runLoad(d *benchkit.Dialer, addrs []string, workers int, mStart, mEnd, hardStop time.Time) *loadResult {
	type wres struct {
		completed, failed, errs int
		lat                     []int64
	}
	res := make([]wres, workers)
	var wg sync.WaitGroup
	var seq atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func(r *wres, addr string) {
			defer wg.Done()
			r.lat = make([]int64, 0, 1024)
			line := make([]byte, 0, 24)
			for time.Now().Before(mEnd) {
				t0 := time.Now()
				c, err := d.Dial(addr, hardStop)
				if err == nil {
					_ = c.SetDeadline(hardStop)
					line = append(strconv.AppendInt(line[:0], seq.Add(1), 10), '\n')
					err = exchange(c, line, nil)
					_ = c.Close()
				} else {
					time.Sleep(time.Millisecond)
				}
				t1 := time.Now()
				if err != nil {
					r.errs++
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
		}(&res[w], addrs[w%len(addrs)])
	}
	wg.Wait()
	out := &loadResult{}
	for _, r := range res {
		out.completed += r.completed
		out.failed += r.failed
		out.errs += r.errs
		out.lat = append(out.lat, r.lat...)
	}
	slices.Sort(out.lat)
	return out
}

// oneConn is one connection: dial, send, read the reply to EOF. It
// returns the time from the dial's start to the reply's first byte.
func oneConn(d *benchkit.Dialer, addr string, line []byte, timeout time.Duration) (time.Duration, error) {
	t0 := time.Now()
	deadline := t0.Add(timeout)
	c, err := d.Dial(addr, deadline)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	var first time.Time
	if err := exchange(c, line, &first); err != nil {
		return 0, err
	}
	return first.Sub(t0), nil
}
