package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/l4-connlimit/connlimit/store"
	"github.com/l4-connlimit/connlimit/store/redisstore"
)

// Redis 7.0's INFO commandstats counts every FCALL alike, whatever the
// function, and FUNCTION STATS gives no time. To split Redis' CPU by
// function exactly, this part calls one operation at a time, many times
// over, straight at the store (zone "split", nodes of this program), and
// reads commandstats' usec (the time in the command, with what the
// function ran; not reading and answering the connection) and redis-server's
// CPU (schedstat, all of it) over each phase. Calls go one after another (one
// goroutine): each wakes Redis on its own, so the CPU per call is that of
// a quiet zone, the most a call costs.

const zSplit = "split"

type splitRow struct {
	name  string
	calls int64   // FCALL and BRPOPLPUSH calls in the phase
	ops   int     // operations the phase did
	usec  float64 // commandstats µs per operation (FCALL + BRPOPLPUSH)
	cpu   float64 // redis-server CPU µs per operation (schedstat)
}

type splitResult struct {
	rows []splitRow
	load loadInfo
}

// schedCPU is the time pid's threads ran on a CPU, in ns
// (/proc/<pid>/task/*/schedstat): utime+stime's 10 ms ticks are too coarse
// for a phase of a few thousand calls.
func schedCPU(pid int) time.Duration {
	dirs, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	var t time.Duration
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			t += time.Duration(ns)
		}
	}
	return t
}

// cmdTimes is INFO commandstats' calls and usec of each command.
func (r *redisProc) cmdTimes() (map[string][2]int64, error) {
	s, err := r.c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		return nil, err
	}
	out := map[string][2]int64{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		name, rest, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		var v [2]int64
		for _, f := range strings.Split(rest, ",") {
			if x, ok := strings.CutPrefix(f, "calls="); ok {
				v[0], _ = strconv.ParseInt(x, 10, 64)
			} else if x, ok := strings.CutPrefix(f, "usec="); ok {
				v[1], _ = strconv.ParseInt(x, 10, 64)
			}
		}
		out[strings.TrimPrefix(name, "cmdstat_")] = v
	}
	return out, sc.Err()
}

func split(e *env, r *report) error {
	c := e.cfg
	n := 3000
	if c.quick {
		n = 1000
	}
	res := &splitResult{load: c.waitLoad("split")}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	open := func(node string) (store.Store, error) {
		return redisstore.New(redisstore.Options{Address: e.redis.addr, Lease: time.Hour}, zSplit, node)
	}
	a, err := open("split-A")
	if err != nil {
		return err
	}
	defer a.Close()
	b, err := open("split-B")
	if err != nil {
		return err
	}
	defer b.Close()
	faS, err := a.Register(ctx, store.NodeState{Limits: store.Limits{MaxConnections: 1 << 30}})
	if err != nil {
		return err
	}
	fbS, err := b.Register(ctx, store.NodeState{})
	if err != nil {
		return err
	}
	_ = faS
	// phase runs f ops times and notes Redis' time per operation
	phase := func(name string, ops int, f func(i int) error) error {
		before, err := e.redis.cmdTimes()
		if err != nil {
			return err
		}
		cpu := schedCPU(e.redis.pid)
		for i := range ops {
			if err := f(i); err != nil {
				return fmt.Errorf("%s: %v", name, err)
			}
		}
		used := schedCPU(e.redis.pid) - cpu
		after, err := e.redis.cmdTimes()
		if err != nil {
			return err
		}
		row := splitRow{name: name, ops: ops, cpu: float64(used.Microseconds()) / float64(ops)}
		var us int64
		for _, cmd := range []string{"fcall", "evalsha", "brpoplpush"} { // EVALSHA: a build before the library
			row.calls += after[cmd][0] - before[cmd][0]
			us += after[cmd][1] - before[cmd][1]
		}
		row.usec = float64(us) / float64(ops)
		res.rows = append(res.rows, row)
		logf("  %s: %d ops, %d calls, %.1f µs (commandstats), %.1f µs CPU per op", name, ops, row.calls, row.usec, row.cpu)
		return nil
	}
	logf("split: Redis' time by operation, %d of each, one at a time", n)
	id := uint64(0)
	if err := phase("take, admitted at once", n, func(int) error {
		id++
		out, _, err := a.Take(ctx, store.Ticket{ID: id})
		if err == nil && out != store.Admitted {
			err = fmt.Errorf("outcome %v", out)
		}
		return err
	}); err != nil {
		return err
	}
	if err := phase("give, nobody waiting", n, func(int) error { return a.Give(ctx, "") }); err != nil {
		return err
	}
	// A holds the zone's one slot; B's tickets queue
	if err := a.SetLimits(ctx, store.Settings{Limits: store.Limits{MaxConnections: 1}}); err != nil {
		return err
	}
	if out, _, err := a.Take(ctx, store.Ticket{ID: 0}); err != nil || out != store.Admitted {
		return fmt.Errorf("take of the holder: %v %v", out, err)
	}
	first := id + 1
	if err := phase("take, queued", n, func(int) error {
		id++
		out, _, err := b.Take(ctx, store.Ticket{ID: id})
		if err == nil && out != store.Queued {
			err = fmt.Errorf("outcome %v", out)
		}
		return err
	}); err != nil {
		return err
	}
	// each give frees the slot and grants it to B's next ticket
	giver := a
	if err := phase("give that grants the next waiter", n, func(int) error {
		err := giver.Give(ctx, "")
		giver = b
		return err
	}); err != nil {
		return err
	}
	var acks []store.Ticket
	if err := phase("grant delivery (BRPOPLPUSH, grants function), per grant", n, func(i int) error {
		g, err := b.NextGrant(ctx)
		if err == nil && g.ID != first+uint64(i) {
			err = fmt.Errorf("grant of ticket %d, want %d", g.ID, first+uint64(i))
		}
		acks = append(acks, g)
		return err
	}); err != nil {
		return err
	}
	if err := phase("renewal acknowledging 10 grants", n/10, func(i int) error {
		_, err := b.Renew(ctx, store.NodeState{Epoch: fbS.Epoch, Active: 1, Acks: acks[10*i : 10*i+10]})
		return err
	}); err != nil {
		return err
	}
	if err := phase("renewal, nothing to acknowledge", n/10, func(int) error {
		_, err := b.Renew(ctx, store.NodeState{Epoch: fbS.Epoch, Active: 1})
		return err
	}); err != nil {
		return err
	}
	for range n - 1 { // B's queue drained: the last grant's slot stays
		if err := b.Give(ctx, ""); err != nil {
			return err
		}
	}
	if err := phase("take, queued (for leave)", n, func(int) error {
		id++
		_, _, err := b.Take(ctx, store.Ticket{ID: id})
		return err
	}); err != nil {
		return err
	}
	if err := phase("leave (a waiter gives up)", n, func(i int) error {
		_, err := b.Leave(ctx, store.Ticket{ID: id - uint64(n) + 1 + uint64(i)})
		return err
	}); err != nil {
		return err
	}
	_ = a.Deregister(ctx)
	_ = b.Deregister(ctx)
	res.load.done()
	r.split = res
	return nil
}

// splitText is the table of split.
func (r *report) splitText(p printer) {
	sp := r.split
	p("### Redis' time by function\n\n")
	p("Method: Redis 7.0 counts every FCALL alike in `INFO commandstats`, so each operation runs alone, "+
		"many times over, straight at the store (zone `%s`, two nodes of this program, one call after "+
		"another), with commandstats' `usec` (the time in FCALL and BRPOPLPUSH, with the commands "+
		"the function ran; not reading and answering the connection) and redis-server's CPU "+
		"(`/proc/<pid>/task/*/schedstat`, in ns: all of it, I/O included) read before and after each phase. "+
		"Calls one at a time each wake Redis: the CPU column is the most a call costs (a busy Redis "+
		"reads and answers many at once). %s.\n\n", zSplit, sp.load)
	p("| operation | operations | calls (FCALL + BRPOPLPUSH) | Redis time per operation (commandstats) | Redis CPU per operation (schedstat) |\n|---|---|---|---|---|\n")
	by := map[string]splitRow{}
	for _, row := range sp.rows {
		by[row.name] = row
		p("| %s | %d | %d | %.1f µs | %.1f µs |\n", row.name, row.ops, row.calls, row.usec, row.cpu)
	}
	sum := func(names ...string) (us, cpu float64) {
		for _, nm := range names {
			us += by[nm].usec
			cpu += by[nm].cpu
		}
		return
	}
	us, cpu := sum("take, admitted at once", "give, nobody waiting")
	p("| **a connection admitted at once** (take + give) | | | **%.1f µs** | **%.1f µs** |\n", us, cpu)
	us, cpu = sum("take, queued", "give that grants the next waiter", "grant delivery (BRPOPLPUSH, grants function), per grant", "give, nobody waiting")
	ack := by["renewal acknowledging 10 grants"]
	noack := by["renewal, nothing to acknowledge"]
	us += (ack.usec - noack.usec) / 10
	cpu += (ack.cpu - noack.cpu) / 10
	p("| **a connection that waited** (take queued, the holder's give that grants, delivery, its own give, its share of an ack) | | | **%.1f µs** | **%.1f µs** |\n\n", us, cpu)
}
