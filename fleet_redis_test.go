package connlimit

import (
	"context"
	_ "errors"
	"fmt"
	_ "net"
	"sort"
	"strings"
	_ "sync"
	_ "sync/atomic"
	"testing"
	"time"

	_ "github.com/redis/go-redis/v9"
)

// Tests of the fleet store (fleet.go, fleet_redis.go) against a real
// redis-server (redis_harness_test.go).

const testZone = "db"

// newFleet opens zone's store at r for node; closed at cleanup.
func newFleet(t testing.TB, r *redisServer, zone, node string, mod ...func(*RedisOptions)) FleetStore {
	t.Helper()
	o := RedisOptions{Address: r.Addr(), Password: r.cfg.Password, TLS: r.clientTLS, Lease: 2 * time.Second}
	for _, m := range mod {
		m(&o)
	}
	s, err := NewRedisFleet(o, zone, node)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func withLease(d time.Duration) func(*RedisOptions) {
	return func(o *RedisOptions) { o.Lease = d }
}

func tctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustRegister(t testing.TB, s FleetStore, st NodeState) FleetState {
	t.Helper()
	fs, err := s.Register(tctx(t), st)
	if err != nil {
		t.Fatalf("register %s: %v", s.NodeID(), err)
	}
	if fs.Lapsed {
		t.Fatalf("register %s: lapsed", s.NodeID())
	}
	return fs
}

func mustSetLimits(t testing.TB, s FleetStore, l Limits) {
	t.Helper()
	if err := s.SetLimits(tctx(t), l); err != nil {
		t.Fatal(err)
	}
}

func take(t testing.TB, s FleetStore, tk Ticket, want Outcome) {
	t.Helper()
	out, r, err := s.Take(tctx(t), tk)
	if err != nil {
		t.Fatalf("take %s/%d: %v", s.NodeID(), tk.ID, err)
	}
	if out != want {
		t.Fatalf("take %s/%d: got outcome %d (%s), want %d", s.NodeID(), tk.ID, out, r, want)
	}
}

func give(t testing.TB, s FleetStore, key string) {
	t.Helper()
	if err := s.Give(tctx(t), key); err != nil {
		t.Fatalf("give %s %q: %v", s.NodeID(), key, err)
	}
}

func status(t testing.TB, s FleetStore) FleetStatus {
	t.Helper()
	st, err := s.Status(tctx(t))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func wantCounts(t testing.TB, s FleetStore, active, waiting int) {
	t.Helper()
	st := status(t, s)
	if st.Active != active || st.Waiting != waiting {
		t.Fatalf("fleet counts: active %d waiting %d, want %d %d", st.Active, st.Waiting, active, waiting)
	}
}

// nextGrant waits up to within for a grant of s.
func nextGrant(t testing.TB, s FleetStore, within time.Duration) Ticket {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	g, err := s.NextGrant(ctx)
	if err != nil {
		t.Fatalf("grant for %s: %v", s.NodeID(), err)
	}
	return g
}

// noGrant checks that s gets no grant within d.
func noGrant(t testing.TB, s FleetStore, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if g, err := s.NextGrant(ctx); err == nil {
		t.Fatalf("unexpected grant for %s: %+v", s.NodeID(), g)
	}
}

// checkStore checks the store's own consistency for zone: per key value,
// the fleet's active count is the sum of the nodes' held slots and the
// waiting count the length of its lists; the totals are their sums; every
// ticket is in a list and every list member has its ticket.
func checkStore(t testing.TB, r *redisServer, zone string) {
	t.Helper()
	ctx := tctx(t)
	c := r.Admin()
	base := DefaultKeyPrefix + ":{" + zone + "}"
	keys, err := c.Keys(ctx, DefaultKeyPrefix+":*").Result()
	if err != nil {
		t.Fatal(err)
	}
	held := map[string]int{}
	queued := map[string]int{}
	members := map[string]bool{}
	tickets := map[string]bool{}
	for _, k := range keys {
		if !strings.HasPrefix(k, base+":") {
			t.Errorf("key %q is not under the zone's base %q (Cluster hash tag)", k, base)
			continue
		}
		what := strings.TrimPrefix(k, base+":")
		switch {
		case strings.HasPrefix(what, "held:"):
			for key, v := range c.HGetAll(ctx, k).Val() {
				var n int
				fmt.Sscan(v, &n)
				held[key] += n
			}
		case strings.HasPrefix(what, "q:"):
			_, key, _ := strings.Cut(strings.TrimPrefix(what, "q:"), ":")
			for _, m := range c.ZRange(ctx, k, 0, -1).Val() {
				queued[key]++
				id, node, _ := strings.Cut(m, "\n")
				members[node+"/"+id] = true
			}
		case strings.HasPrefix(what, "tickets:"):
			node := strings.TrimPrefix(what, "tickets:")
			for id := range c.HGetAll(ctx, k).Val() {
				tickets[node+"/"+id] = true
			}
		}
	}
	toInt := func(m map[string]string) map[string]int {
		out := map[string]int{}
		for k, v := range m {
			var n int
			fmt.Sscan(v, &n)
			out[k] = n
		}
		return out
	}
	active := toInt(c.HGetAll(ctx, base+":active").Val())
	waiting := toInt(c.HGetAll(ctx, base+":waiting").Val())
	tot := toInt(c.HGetAll(ctx, base+":tot").Val())
	sum := func(m map[string]int) (n int) {
		for _, v := range m {
			n += v
		}
		return n
	}
	for _, m := range []map[string]int{held, queued} {
		for k, v := range m {
			if v == 0 {
				delete(m, k)
			}
		}
	}
	if fmt.Sprint(active) != fmt.Sprint(held) {
		t.Errorf("store: active %v, held by the nodes %v", active, held)
	}
	if fmt.Sprint(waiting) != fmt.Sprint(queued) {
		t.Errorf("store: waiting %v, in the lists %v", waiting, queued)
	}
	if tot["a"] != sum(active) || tot["w"] != sum(waiting) {
		t.Errorf("store: totals %v, sums active %d waiting %d", tot, sum(active), sum(waiting))
	}
	if fmt.Sprint(members) != fmt.Sprint(tickets) {
		t.Errorf("store: list members %v, tickets %v", members, tickets)
	}
	wkeys := c.SMembers(ctx, base+":wkeys").Val()
	sort.Strings(wkeys)
	var want []string
	for k := range waiting {
		want = append(want, k)
	}
	sort.Strings(want)
	if fmt.Sprint(wkeys) != fmt.Sprint(want) {
		t.Errorf("store: keys with waiters %q, want %q", wkeys, want)
	}
}

func fifo(max, maxWaiting int) Limits {
	return Limits{MaxConnections: max, MaxWaiting: maxWaiting}
}

// Take admits up to max per key across nodes, queues the rest, Give hands
// a freed slot to the next waiter's node, Leave takes a waiter out.
func TestRedisFleetTakeGiveLeave(t *testing.T) {
	r := startRedis(t, redisConfig{})
	a := newFleet(t, r, testZone, "A")
	b := newFleet(t, r, testZone, "B")
	c := newFleet(t, r, testZone, "C")
	fs := mustRegister(t, a, NodeState{Limits: fifo(2, 0)})
	if fs.Limits.MaxConnections != 2 || fs.LimitsSet.IsZero() {
		t.Fatalf("register with limits: %+v", fs)
	}
	mustRegister(t, b, NodeState{Limits: fifo(5, 0)}) // limits in force are kept
	mustRegister(t, c, NodeState{})

	take(t, a, Ticket{ID: 1}, Admitted)
	take(t, b, Ticket{ID: 1}, Admitted)
	take(t, c, Ticket{ID: 1}, Queued)
	take(t, a, Ticket{ID: 2}, Queued)
	take(t, b, Ticket{ID: 2, Key: "other"}, Admitted) // keys count apart
	wantCounts(t, a, 3, 2)
	checkStore(t, r, testZone)

	give(t, b, "") // to C's ticket, first in line
	g := nextGrant(t, c, 2*time.Second)
	if g.ID != 1 || g.Key != "" {
		t.Fatalf("grant for C: %+v", g)
	}
	noGrant(t, a, 100*time.Millisecond)
	wantCounts(t, a, 3, 1)

	left, err := a.Leave(tctx(t), Ticket{ID: 2})
	if err != nil || !left {
		t.Fatalf("leave: %v %v", left, err)
	}
	left, err = a.Leave(tctx(t), Ticket{ID: 2})
	if err != nil || left {
		t.Fatalf("second leave: %v %v", left, err)
	}
	wantCounts(t, a, 3, 0)
	give(t, a, "")
	give(t, c, "")
	give(t, b, "other")
	give(t, b, "other") // holds none: nothing happens
	wantCounts(t, a, 0, 0)
	checkStore(t, r, testZone)
	st := status(t, a)
	if len(st.Nodes) != 3 || st.NodeCount != 3 || st.Limits.MaxConnections != 2 {
		t.Fatalf("status: %+v", st)
	}
}
