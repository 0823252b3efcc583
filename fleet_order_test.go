package connlimit

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/l4-connlimit/connlimit/store/redisstore"
)

// Fleet zones, end to end (issue 11, "What must hold" 2 to 4): waiters stay
// on their node, unread; the fleet's waiting list is one, in one order,
// pushed to the nodes; per-key limits hold across the fleet. Real Caddy
// processes (fleet_harness_test.go), a real redis-server, a real backend
// and real clients.

// fleetKey is the store's key of zone db's shared state (the store's
// default key_prefix), for the tests' own looks into Redis.
func fleetKey(what string) string { return redisstore.DefaultKeyPrefix + ":{db}:" + what }

// storeTotals are the fleet's active and waiting counts as the store has
// them, read straight from Redis (no script: nothing a node would do).
func storeTotals(t *testing.T, r *testkit.Redis) (active, waiting int) {
	t.Helper()
	v, err := r.Array("HMGET", fleetKey("tot"), "a", "w")
	if err != nil {
		t.Fatal(err)
	}
	n := func(x any) int {
		s, _ := x.(string)
		i, _ := strconv.Atoi(s)
		return i
	}
	return n(v[0]), n(v[1])
}

// waitStore waits until the store counts active and waiting.
func waitStore(t *testing.T, r *testkit.Redis, within time.Duration, active, waiting int) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		a, w := storeTotals(t, r)
		if a == active && w == waiting {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the store counts %d active and %d waiting after %s, want %d and %d", a, w, within, active, waiting)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// startNodes starts one node per fields, named A, B, C..., sharing zone db
// through st, and waits until each one is registered.
func startNodes(t *testing.T, backend string, st obj, fields ...obj) []*caddyProc {
	t.Helper()
	nodes := make([]*caddyProc, len(fields))
	for i, f := range fields {
		ff := obj{"zone": "db"}
		for k, v := range f {
			ff[k] = v
		}
		nodes[i] = startNode(t, string(rune('A'+i)), nodeConfig(backend, ff, st))
	}
	registered(t, "db", nodes...)
	return nodes
}

// rxQueue is how many bytes the kernel holds unread in the receive queue
// of the TCP socket from local to remote (as /proc/net/tcp shows them, for
// every process of this network namespace); -1 if there is no such
// socket.
func rxQueue(t *testing.T, local, remote string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("no /proc/net/tcp: %v", err)
	}
	l, r := procAddr(t, local), procAddr(t, remote)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 5 || f[1] != l || f[2] != r {
			continue
		}
		_, rx, _ := strings.Cut(f[4], ":")
		n, err := strconv.ParseInt(rx, 16, 64)
		if err != nil {
			t.Fatalf("/proc/net/tcp: %q: %v", line, err)
		}
		return int(n)
	}
	return -1
}

// procAddr is an IPv4 host:port as /proc/net/tcp prints it (the address
// as the host's 32-bit integer in hex, little-endian here, and the port).
func procAddr(t *testing.T, hostport string) string {
	t.Helper()
	a, err := net.ResolveTCPAddr("tcp4", hostport)
	if err != nil {
		t.Fatal(err)
	}
	ip := a.IP.To4()
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], a.Port)
}

// 2. Waiting stays local and unread. With max 1 on two nodes, a holder on
// A and two waiters on B: they wait on B (B's own counts, not A's), the
// bytes the second one sends while it waits stay unread in the kernel
// (B's socket's receive queue holds every one of them); the first one
// leaves, and is out of the fleet's waiting list (as a node's view of the
// store shows it) within 100 ms, and never reaches the backend; when the
// holder leaves, the second one gets the slot and the backend gets its
// bytes intact.
func TestFleetWaiterUnreadAndLeaves(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startNodes(t, be.addr(), redisStore(r, nil), obj{"max_connections": 1}, obj{"max_connections": 1})
	a, b := nodes[0], nodes[1]

	holder := takeSlot(t, be, a.listen, "holder")
	leaver := dial(t, b.listen, "leaver")
	leaver.hello("")
	waitStore(t, r, 10*time.Second, 1, 1)
	const size = 16 << 10
	w := dialHash(t, b.listen, "w", size)
	waitStore(t, r, 10*time.Second, 1, 2)

	// They wait on B, as B's own: A has its holder and nobody waiting.
	views := waitNodes(t, 5*time.Second, "the waiters on B, the holder on A", "db", nodes, func(vs []zoneDetailJSON) bool {
		return vs[0].Active == 1 && vs[0].Waiting == 0 && vs[1].Active == 0 && vs[1].Waiting == 2 &&
			vs[1].Fleet.Active == 1 && vs[1].Fleet.Waiting == 2
	})
	if len(views[1].Waiters) != 2 || len(views[0].Waiters) != 0 {
		t.Fatalf("waiters listed: A %+v, B %+v; want both on B", views[0].Waiters, views[1].Waiters)
	}

	// Unread: every byte w sent is still in B's socket for it, and stays
	// there while it waits.
	sent := len(fmt.Sprintf("w hash %d\n", size)) + size
	testkit.WaitFor(t, 5*time.Second, "w's bytes in B's receive queue", func() bool {
		return rxQueue(t, b.listen, w.conn.LocalAddr().String()) == sent
	})
	time.Sleep(300 * time.Millisecond)
	if n := rxQueue(t, b.listen, w.conn.LocalAddr().String()); n != sent {
		t.Fatalf("B's socket for w holds %d unread bytes, want all %d it sent", n, sent)
	}
	be.noArrival(100 * time.Millisecond)

	// The leaver goes: out of the fleet's waiting list at once.
	start := time.Now()
	_ = leaver.conn.Close()
	var took time.Duration
	for {
		v := b.zone("db")
		if v.Fleet.Waiting == 1 {
			took = time.Since(start)
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("the fleet still counts %d waiting 5s after a waiter left, want 1", v.Fleet.Waiting)
		}
	}
	t.Logf("a waiter that left was out of the fleet's waiting list %s later (contract 100 ms)", took)
	if took > abandonBound {
		t.Fatalf("a waiter that left was out of the fleet's waiting list only %s later, want within 100 ms (asserted: %s)", took, abandonBound)
	}
	if v := b.zone("db"); v.Waiting != 1 || v.Abandoned != 1 {
		t.Fatalf("B: waiting %d, abandoned %d; want 1 and 1", v.Waiting, v.Abandoned)
	}

	// The holder leaves: the slot goes to w, with its bytes intact; the
	// leaver never reaches the backend.
	finish(be, holder)
	if id := be.waitArrivals(1, 10*time.Second)[0]; id != "w" {
		t.Fatalf("backend got %q, want w", id)
	}
	be.letID("w")
	if got, err := w.readLine(10 * time.Second); err != nil || got != w.want {
		t.Fatalf("w: got %q (err %v), want the digest of its bytes %q", got, err, w.want)
	}
	_ = w.conn.Close()
	be.noArrival(300 * time.Millisecond)
	if _, peak, total, order := be.stats(); peak != 1 || total != 2 {
		t.Fatalf("backend: peak %d, %d connections (%v); want 1 and 2 (holder, w)", peak, total, order)
	}
	waitNodes(t, 5*time.Second, "the fleet to drain", "db", nodes, func(vs []zoneDetailJSON) bool {
		return vs[0].Active+vs[1].Active+vs[0].Waiting+vs[1].Waiting == 0 && vs[0].Fleet.Active == 0 && vs[0].Fleet.Waiting == 0
	})
}

// 2. A waiter that leaves just as the store grants it a slot gives the slot
// back at once. B is stopped (SIGSTOP, well within its lease) while the
// holder on A leaves: the store grants the slot to B's first waiter, whose
// client then leaves too; when B goes on it must give that slot back (to
// its second waiter), never hand the leaver to the backend. Which of the
// two B sees first when it goes on, the grant or the client's FIN, is up
// to its scheduler (in practice the FIN: the waiter leaves the line, finds
// its ticket granted, and the grant that follows is given back); both ways
// must give the slot back.
func TestFleetWaiterGrantedAsItLeaves(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	// A long lease: B's stop must not look like a crash.
	nodes := startNodes(t, be.addr(), redisStore(r, obj{"lease": "5s"}), obj{"max_connections": 1}, obj{"max_connections": 1})
	a, b := nodes[0], nodes[1]
	bID := b.zone("db").Fleet.Node

	holder := takeSlot(t, be, a.listen, "holder")
	leaver := dial(t, b.listen, "leaver")
	leaver.hello("")
	waitStore(t, r, 10*time.Second, 1, 1)
	w := dialHash(t, b.listen, "w", 4<<10)
	waitStore(t, r, 10*time.Second, 1, 2)

	b.signal(syscall.SIGSTOP)
	stopped := true
	defer func() {
		if stopped {
			b.signal(syscall.SIGCONT)
		}
	}()
	finish(be, holder)
	// The store gave the holder's slot to B (for the leaver, first in
	// line) while B cannot take it in.
	waitStore(t, r, 5*time.Second, 1, 1)
	held, err := r.Int("HGET", fleetKey("held:"+bID), "")
	if err != nil || held != 1 {
		t.Fatalf("B holds %d slots in the store (err %v), want the 1 granted while it is stopped", held, err)
	}
	_ = leaver.conn.Close()
	time.Sleep(100 * time.Millisecond) // its FIN reaches B's socket
	start := time.Now()
	b.signal(syscall.SIGCONT)
	stopped = false

	// At once: well within B's lease, so not by a repair.
	if id := be.waitArrivals(1, 2*time.Second)[0]; id != "w" {
		t.Fatalf("backend got %q, want w (the leaver must not be handed on)", id)
	}
	t.Logf("the slot granted to a waiter that left reached the next waiter %s after its node went on", time.Since(start))
	be.letID("w")
	if got, err := w.readLine(10 * time.Second); err != nil || got != w.want {
		t.Fatalf("w: got %q (err %v), want %q", got, err, w.want)
	}
	_ = w.conn.Close()
	be.noArrival(300 * time.Millisecond)
	if _, peak, total, order := be.stats(); peak != 1 || total != 2 {
		t.Fatalf("backend: peak %d, %d connections (%v); want 1 and 2 (holder, w)", peak, total, order)
	}
	if v := b.zone("db"); v.Abandoned != 1 || v.Admitted != 1 {
		t.Fatalf("B: abandoned %d, admitted %d; want 1 and 1", v.Abandoned, v.Admitted)
	}
	waitStore(t, r, 5*time.Second, 0, 0)
}

// 3. Fleet-wide order, pushed not polled. With max 1 and a holder, waiters
// arrive at A, B, C, A, B, C, 100 ms apart (each one in the store's line
// before the next comes): they are admitted in that order with fifo, in
// the reverse with lifo, and by priority then order when B's handler has
// priority 5 and A's and C's 0 (priority is per handler: it may differ
// between nodes). The backend's arrivals tell the order.
func TestFleetOrder(t *testing.T) {
	cases := []struct {
		name  string
		order string
		prio  [3]int // of A, B, C
		want  []string
	}{
		{"fifo", "fifo", [3]int{}, []string{"A1", "B1", "C1", "A2", "B2", "C2"}},
		{"lifo", "lifo", [3]int{}, []string{"C2", "B2", "A2", "C1", "B1", "A1"}},
		{"priority", "fifo", [3]int{0, 5, 0}, []string{"B1", "B2", "A1", "C1", "A2", "C2"}},
		{"priority-lifo", "lifo", [3]int{0, 5, 0}, []string{"B2", "B1", "C2", "A2", "C1", "A1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := testkit.StartRedis(t, testkit.RedisConfig{})
			be := newBackend(t, true)
			var fields []obj
			for _, p := range tc.prio {
				fields = append(fields, obj{"max_connections": 1, "order": tc.order, "priority": p})
			}
			nodes := startNodes(t, be.addr(), redisStore(r, nil), fields...)

			holder := takeSlot(t, be, nodes[0].listen, "holder")
			clients := map[string]*client{}
			for i := range 6 {
				n := nodes[i%3]
				id := fmt.Sprintf("%s%d", n.name, i/3+1)
				start := time.Now()
				c := dial(t, n.listen, id)
				c.hello("")
				clients[id] = c
				waitStore(t, r, 10*time.Second, 1, i+1)
				time.Sleep(time.Until(start.Add(100 * time.Millisecond)))
			}
			be.noArrival(100 * time.Millisecond)

			finish(be, holder)
			var got []string
			for range tc.want {
				id := be.waitArrivals(1, 10*time.Second)[0]
				got = append(got, id)
				c := clients[id]
				if c == nil {
					t.Fatalf("backend got %q, not a waiter (so far %v)", id, got)
				}
				finish(be, c)
			}
			if strings.Join(got, " ") != strings.Join(tc.want, " ") {
				t.Fatalf("admitted %v, want %v", got, tc.want)
			}
			if _, peak, total, _ := be.stats(); peak != 1 || total != 7 {
				t.Fatalf("backend: peak %d, %d connections; want 1 and 7", peak, total)
			}
			waitStore(t, r, 5*time.Second, 0, 0)
		})
	}
}

// 3. When nothing changes the store sees only the nodes' lease renewals
// (and each node's BRPOPLPUSH on its grants list, armed again once a lease),
// whatever the number of waiters: 20 waiters spread over three nodes,
// idle for 3 s, cost no more Redis commands than none (INFO commandstats,
// which counts the commands a function runs too, so a function whose cost
// grew with the waiters would show).
//
// The slack: each node renews on its own timer, every lease/3 (333 ms)
// plus the time a renewal takes, and re-arms its BRPOPLPUSH every lease, so a
// 3 s window holds one renewal and one BRPOPLPUSH more or less of each node
// depending on where it falls. Each command may be counted up to what one
// renewal (or BRPOPLPUSH) of every node costs above the idle baseline; a
// waiter that cost one command a second would cost 60 here.
func TestFleetIdleCost(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	f := obj{"max_connections": 1}
	nodes := startNodes(t, be.addr(), redisStore(r, nil), f, f, f)
	_ = takeSlot(t, be, nodes[0].listen, "holder")
	waitStore(t, r, 5*time.Second, 1, 0)

	const window = 3 * time.Second
	measure := func() map[string]int64 {
		time.Sleep(500 * time.Millisecond) // what the last change set off is done
		r.ResetStats()
		time.Sleep(window)
		return r.CommandStats()
	}
	idle := measure()

	const waiters = 20
	for i := range waiters {
		c := dial(t, nodes[i%3].listen, fmt.Sprintf("w%d", i))
		c.hello("")
	}
	waitStore(t, r, 10*time.Second, 1, waiters)
	busy := measure()
	t.Logf("commands in %s: no waiters %v; %d waiters %v", window, idle, waiters, busy)

	renewals := idle["fcall"]
	if renewals < int64(len(nodes)) {
		t.Fatalf("only %d functions ran in %s without waiters: the nodes do not renew (%v)", renewals, window, idle)
	}
	for cmd, n := range busy {
		perRenewal := (idle[cmd] + renewals - 1) / renewals // rounded up; 0 if none idle
		if slack := int64(len(nodes)) * perRenewal; n > idle[cmd]+slack {
			t.Errorf("%s: %d calls in %s with %d idle waiters, %d without (slack %d)", cmd, n, window, waiters, idle[cmd], slack)
		}
	}
	if v := nodes[1].zone("db"); v.Fleet.Waiting != waiters {
		t.Fatalf("the fleet counts %d waiting, want %d", v.Fleet.Waiting, waiters)
	}
}

// 4. Per-key limits fleet-wide. With key {l4.conn.remote_ip}, max 2 and
// max_waiting 1: one client address gets 2 slots across the nodes
// together (A and B), its third connection waits (at C, which holds none
// of its slots), its fourth is rejected (queue_full: the fleet's list of
// that key is full) and closed; another address is admitted meanwhile
// (at C). wait_timeout bounds each waiter: the third one is rejected
// after it, closed, and leaves the fleet's line, so that the address may
// queue again, and that one is admitted when a slot of its key frees.
func TestFleetPerKey(t *testing.T) {
	const timeout = 3 * time.Second
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	f := obj{"max_connections": 2, "max_waiting": 1, "wait_timeout": timeout.String(), "key": ipKey}
	nodes := startNodes(t, be.addr(), redisStore(r, nil), f, f, f)
	a, b, c := nodes[0], nodes[1], nodes[2]
	expectArrival := func(id string) {
		t.Helper()
		if got := be.waitArrivals(1, 10*time.Second)[0]; got != id {
			t.Fatalf("backend got %q, want %q", got, id)
		}
	}
	connect := func(ip string, n *caddyProc, id string) *client {
		cl := dialFrom(t, ip, n.listen, id)
		cl.hello("")
		return cl
	}

	a1 := connect("127.0.0.2", a, "a1")
	expectArrival("a1")
	_ = connect("127.0.0.2", b, "a2")
	expectArrival("a2")
	queued := time.Now()
	a3 := connect("127.0.0.2", c, "a3")
	waitStore(t, r, 10*time.Second, 2, 1)
	be.noArrival(200 * time.Millisecond)
	if v := c.zone("db"); v.Active != 0 || v.Waiting != 1 || len(v.Waiters) != 1 || v.Waiters[0].Key != "127.0.0.2" {
		t.Fatalf("C: active %d, waiting %d, waiters %+v; want a3 waiting, of key 127.0.0.2", v.Active, v.Waiting, v.Waiters)
	}

	a4 := connect("127.0.0.2", a, "a4")
	a4.expectClosed(5 * time.Second)
	if v := a.zone("db"); v.RejectedByReason["queue_full"] != 1 {
		t.Fatalf("A rejected %v, want one queue_full", v.RejectedByReason)
	}

	_ = connect("127.0.0.3", c, "b1")
	expectArrival("b1")
	if n, err := r.Int("HGET", fleetKey("active"), "127.0.0.2"); err != nil || n != 2 {
		t.Fatalf("the store counts %d active of key 127.0.0.2 (err %v), want 2", n, err)
	}
	waitStore(t, r, 5*time.Second, 3, 1)
	if time.Since(queued) > timeout-500*time.Millisecond {
		t.Fatalf("the steps before the wait timeout took %s: too slow to test it", time.Since(queued))
	}

	// a3 times out: rejected and closed, and out of the fleet's line.
	a3.expectClosed(timeout + 5*time.Second)
	waited := time.Since(queued)
	t.Logf("a3 was rejected %s after it came (wait_timeout %s)", waited, timeout)
	if waited < timeout-100*time.Millisecond {
		t.Fatalf("a3 was rejected after %s, before its wait_timeout %s", waited, timeout)
	}
	if v := c.zone("db"); v.RejectedByReason["wait_timeout"] != 1 || v.Waiting != 0 {
		t.Fatalf("C: rejected %v, waiting %d; want one wait_timeout and none waiting", v.RejectedByReason, v.Waiting)
	}
	waitStore(t, r, time.Second, 3, 0)

	// The key may queue again (the list has room), and is admitted when
	// one of its slots frees, on whichever node.
	a5 := connect("127.0.0.2", b, "a5")
	waitStore(t, r, 5*time.Second, 3, 1)
	be.noArrival(200 * time.Millisecond)
	finish(be, a1)
	expectArrival("a5")
	be.letID("a5")
	a5.expectLine("ok a5", 5*time.Second)

	be.noArrival(300 * time.Millisecond)
	if _, peak, total, order := be.stats(); peak != 3 || total != 4 {
		t.Fatalf("backend: peak %d, %d connections (%v); want 3 and 4 (a1, a2, b1, a5)", peak, total, order)
	}
}
