package connlimit

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// End-to-end tests of per-key limits, keys from PROXY protocol headers,
// chained limits and priorities between routes sharing a zone.

// The state of a key is freed once its last connection is gone: after
// hundreds of distinct client IPs came and went (some waited, one waiter
// left), the zone holds no key.
func TestPerKeyStateIsFreed(t *testing.T) {
	const zone = "keys-freed"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		limit(obj{"max_connections": 1, "zone": zone, "key": ipKey}), proxyTo(be.addr())))
	defer stopCaddy(t)

	const ips, batch = 200, 25
	for first := 1; first <= ips; first += batch {
		var held []*client
		for i := first; i < first+batch; i++ {
			c := dialFrom(t, fmt.Sprintf("127.0.1.%d", i), listen, fmt.Sprintf("c%d", i))
			c.hello("")
			held = append(held, c)
		}
		for _, c := range held {
			c.expectLine("ok "+c.id, 10*time.Second)
		}
		be.waitArrivals(batch, 5*time.Second)
		// Every one of them waits for its own IP only: a second client
		// of the first IP waits, then leaves.
		extra := dialFrom(t, fmt.Sprintf("127.0.1.%d", first), listen, "extra")
		extra.hello("")
		waitCounts(t, zone, batch, 1)
		if n := zoneSnapshot(t, zone).Keys; n != batch {
			t.Fatalf("zone holds %d keys with %d distinct IPs connected, want %d", n, batch, batch)
		}
		_ = extra.conn.Close()
		waitCounts(t, zone, batch, 0)
		for _, c := range held {
			_ = c.conn.Close()
		}
		waitCounts(t, zone, 0, 0)
	}
	testkit.WaitFor(t, 5*time.Second, "every key to be freed", func() bool { return zoneSnapshot(t, zone).Keys == 0 })
	s := zoneSnapshot(t, zone)
	if s.Counters.Admitted != ips || s.Counters.Abandoned != ips/batch {
		t.Fatalf("admitted %d, abandoned %d; want %d and %d", s.Counters.Admitted, s.Counters.Abandoned, ips, ips/batch)
	}
	be.noArrival(100 * time.Millisecond)
	if _, _, total, _ := be.stats(); total != ips {
		t.Fatalf("backend saw %d connections, want %d", total, ips)
	}
}

// Behind proxy_protocol, the key and {l4.conn.remote_ip} are the client
// of the PROXY header, not the proxy that connects.
func TestProxyProtocolKeys(t *testing.T) {
	const zone = "keys-proxy-protocol"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		proxyProtocol(),
		limit(obj{"max_connections": 1, "zone": zone, "key": ipKey}),
		proxyTo(be.addr())))
	defer stopCaddy(t)

	// All three come from 127.0.0.1; the headers name two clients.
	c1 := proxyClient(t, listen, "c1", "10.9.8.7", 5555)
	c1.expectLine("ok c1", 5*time.Second)
	c2 := proxyClient(t, listen, "c2", "10.9.8.7", 5556)
	waitCounts(t, zone, 1, 1)
	c3 := proxyClient(t, listen, "c3", "10.9.8.8", 5557)
	c3.expectLine("ok c3", 5*time.Second)
	if got := be.waitArrivals(2, 5*time.Second); strings.Join(got, " ") != "c1 c3" {
		t.Fatalf("backend got %v, want c1 and c3", got)
	}
	waitCounts(t, zone, 2, 1)

	s := zoneSnapshot(t, zone)
	if len(s.Waiters) != 1 {
		t.Fatalf("waiters %+v, want one", s.Waiters)
	}
	if w := s.Waiters[0]; w.Key != "10.9.8.7" || w.Remote != "10.9.8.7:5556" {
		t.Fatalf("waiter has key %q (the value of {l4.conn.remote_ip}) and remote %q; want 10.9.8.7 and 10.9.8.7:5556", w.Key, w.Remote)
	}

	_ = c3.conn.Close() // another client's slot: c2 waits on
	waitCounts(t, zone, 1, 1)
	_ = c1.conn.Close()
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "c2" {
		t.Fatalf("backend got %q, want c2", id)
	}
	c2.expectLine("ok c2", 5*time.Second)
	_ = c2.conn.Close()
	waitCounts(t, zone, 0, 0)
	testkit.WaitFor(t, 5*time.Second, "the keys to be freed", func() bool { return zoneSnapshot(t, zone).Keys == 0 })
}

// A waiter behind proxy_protocol that leaves is noticed at once too: the
// PROXY protocol wrapper does not hide the socket from the watch.
func TestProxyProtocolWaiterLeaves(t *testing.T) {
	const zone = "keys-proxy-protocol-leave"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		proxyProtocol(),
		limit(obj{"max_connections": 1, "zone": zone}),
		proxyTo(be.addr())))
	defer stopCaddy(t)

	holder := proxyClient(t, listen, "holder", "10.9.8.7", 5555)
	holder.expectLine("ok holder", 5*time.Second)
	be.waitArrivals(1, 5*time.Second)
	w := proxyClient(t, listen, "waiter", "10.9.8.8", 5556)
	waitCounts(t, zone, 1, 1)
	staysCounts(t, zone, 1, 1, 100*time.Millisecond)

	start := time.Now()
	_ = w.conn.Close()
	took := waitingDrop(t, zone, 1, 0, start, abandonBound)
	t.Logf("behind proxy_protocol: waiter left the waiting list %s after closing", took)
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 1 {
		t.Fatalf("abandoned %d, want 1", s.Counters.Abandoned)
	}
	_ = holder.conn.Close()
	waitCounts(t, zone, 0, 0)
	be.noArrival(300 * time.Millisecond)
}

// Two limits chained in one route, per IP (1) and then for everyone (2),
// hold both: never two connections of one IP, never more than two in
// all, and everyone is served in the end.
func TestChainedPerIPAndGlobalLimits(t *testing.T) {
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		limit(obj{"max_connections": 1, "zone": "chain-ip", "key": ipKey}),
		limit(obj{"max_connections": 2, "zone": "chain-all"}),
		proxyTo(be.addr())))
	defer stopCaddy(t)

	type plan struct{ id, ip string }
	plans := []plan{
		{"a1", "127.0.0.2"}, {"a2", "127.0.0.2"}, {"a3", "127.0.0.2"},
		{"b1", "127.0.0.3"}, {"b2", "127.0.0.3"},
		{"c1", "127.0.0.4"}, {"d1", "127.0.0.5"},
	}
	ipOf := map[string]string{}
	clients := map[string]*client{}
	for _, p := range plans {
		ipOf[p.id] = p.ip
		c := dialFrom(t, p.ip, listen, p.id)
		c.hello("")
		clients[p.id] = c
	}
	// a1 and b1 in; a2, a3, b2 wait for their IP; c1 and d1 for a
	// global slot (the order among them depends on arrival).
	testkit.WaitFor(t, 5*time.Second, "the limits to fill", func() bool {
		ipA, ipW := zoneCounts("chain-ip")
		allA, allW := zoneCounts("chain-all")
		return ipA == 4 && ipW == 3 && allA == 2 && allW == 2
	})

	inBackend := map[string]bool{}
	check := func(arrived []string) {
		t.Helper()
		for _, id := range arrived {
			for other := range inBackend {
				if ipOf[other] == ipOf[id] {
					t.Fatalf("%s and %s of %s at the backend at once", other, id, ipOf[id])
				}
			}
			inBackend[id] = true
			clients[id].expectLine("ok "+id, 5*time.Second)
		}
		if len(inBackend) > 2 {
			t.Fatalf("%d at the backend at once, want at most 2", len(inBackend))
		}
	}
	check(be.waitArrivals(2, 5*time.Second))
	be.noArrival(200 * time.Millisecond)
	served := 2
	for len(inBackend) > 0 {
		// One of them leaves.
		ids := make([]string, 0, len(inBackend))
		for id := range inBackend {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		_ = clients[ids[0]].conn.Close()
		delete(inBackend, ids[0])
		if served < len(plans) {
			check(be.waitArrivals(1, 5*time.Second))
			served++
		}
	}
	waitCounts(t, "chain-ip", 0, 0)
	waitCounts(t, "chain-all", 0, 0)
	if _, peak, total, _ := be.stats(); peak != 2 || total != len(plans) {
		t.Fatalf("backend peak %d, total %d; want 2 and %d", peak, total, len(plans))
	}
}

// Two routes share a zone with different priorities: when a slot frees, a
// waiter of the higher priority goes first even though it came last, and
// waiters of equal priority keep their order.
func TestPrioritiesAcrossRoutes(t *testing.T) {
	const zone = "shared"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	shared := func(prio int) obj {
		return limit(obj{"max_connections": 1, "zone": zone, "priority": prio})
	}
	loadConfig(t, l4ConfigRoutes("", listen,
		obj{
			"match":  []obj{{"remote_ip": obj{"ranges": []string{"127.0.0.2/32"}}}},
			"handle": []obj{shared(10), proxyTo(be.addr())},
		},
		obj{"handle": []obj{shared(0), proxyTo(be.addr())}},
	))
	defer stopCaddy(t)

	holder := dialFrom(t, "127.0.0.1", listen, "holder")
	holder.hello("")
	holder.expectLine("ok holder", 5*time.Second)
	be.waitArrivals(1, 5*time.Second)

	clients := map[string]*client{}
	queue := func(ip, id string, waiting int) {
		c := dialFrom(t, ip, listen, id)
		c.hello("")
		clients[id] = c
		waitCounts(t, zone, 1, waiting) // in line before the next one
	}
	queue("127.0.0.1", "low1", 1)
	queue("127.0.0.3", "low2", 2)
	queue("127.0.0.1", "low3", 3)
	queue("127.0.0.2", "high1", 4)
	queue("127.0.0.4", "low4", 5)
	queue("127.0.0.2", "high2", 6)

	s := zoneSnapshot(t, zone)
	var prios []string
	for _, w := range s.Waiters {
		prios = append(prios, fmt.Sprint(w.Priority))
	}
	if got := strings.Join(prios, " "); got != "10 10 0 0 0 0" {
		t.Fatalf("waiters' priorities in admission order: %s", got)
	}

	_ = holder.conn.Close()
	var order []string
	for range len(clients) {
		id := be.waitArrivals(1, 5*time.Second)[0]
		order = append(order, id)
		clients[id].expectLine("ok "+id, 5*time.Second)
		_ = clients[id].conn.Close()
	}
	if got := strings.Join(order, " "); got != "high1 high2 low1 low2 low3 low4" {
		t.Fatalf("admitted %s, want high1 high2 low1 low2 low3 low4", got)
	}
	waitCounts(t, zone, 0, 0)
	if _, peak, _, _ := be.stats(); peak != 1 {
		t.Fatalf("backend peak %d, want 1", peak)
	}
}
