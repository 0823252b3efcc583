package connlimit

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// End-to-end tests of UDP flows: a waiting flow must not stall the other
// flows of its listener (caddy-l4 reads every packet of a listener in one
// loop), keeps its first packets for when it is admitted, and is abandoned
// when it goes quiet.

// With two slots taken, a third flow waits and blasts packets; the flows
// being served keep getting their echoes promptly, the waiting flow gets
// nothing until a slot frees, and then the first 32 packets it sent while
// waiting (the bound) are replayed to the backend in order.
func TestUDPWaitingFlowDoesNotStallOthers(t *testing.T) {
	const zone = "udp-flows"
	echo := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 2, "zone": zone}, "2s"))
	defer stopCaddy(t)

	// A holds a slot as long as it keeps sending (idle_timeout 2s).
	a := dialUDP(t, port, "A")
	a.send("A-0")
	a.expect("A-0", 5*time.Second)
	stopA := a.keepSending(100*time.Millisecond, func() string { return "A-ka" })

	// B holds the other one, pinging all along; its round trips are
	// recorded.
	b := dialUDP(t, port, "B")
	b.send("B-first")
	b.expect("B-first", 5*time.Second)
	var bmu sync.Mutex
	bSent := map[string]time.Time{}
	var bReplies []time.Time
	var bMaxRTT time.Duration
	bSeq := 0
	stopB := b.keepSending(50*time.Millisecond, func() string {
		bmu.Lock()
		defer bmu.Unlock()
		bSeq++
		s := fmt.Sprintf("B-%d", bSeq)
		bSent[s] = time.Now()
		return s
	})
	bReader := make(chan struct{})
	go func() {
		defer close(bReader)
		for {
			s, err := b.recv(10 * time.Second)
			if err != nil {
				return
			}
			bmu.Lock()
			if sent, ok := bSent[s]; ok {
				bReplies = append(bReplies, time.Now())
				if rtt := time.Since(sent); rtt > bMaxRTT {
					bMaxRTT = rtt
				}
			}
			bmu.Unlock()
		}
	}()
	defer func() {
		stopB()
		_ = b.conn.SetReadDeadline(time.Now())
		<-bReader
	}()
	waitCounts(t, zone, 2, 0)

	// C waits and sends 40 packets, far more than caddy-l4's 5-packet
	// channel per flow, then keeps sending so that it does not go idle.
	c := dialUDP(t, port, "C")
	const burst, bound = 40, maxHeldPackets
	for i := range burst {
		c.send(fmt.Sprintf("C-%02d", i))
	}
	burstEnd := time.Now()
	cSeq := burst
	var cmu sync.Mutex
	stopC := c.keepSending(150*time.Millisecond, func() string {
		cmu.Lock()
		defer cmu.Unlock()
		s := fmt.Sprintf("C-%02d", cSeq)
		cSeq++
		return s
	})
	waitCounts(t, zone, 2, 1)

	// While C waits, B is served as before, and C gets nothing.
	if s, err := c.recv(600 * time.Millisecond); err == nil {
		t.Fatalf("waiting flow C got %q before it was admitted", s)
	}
	if a, w := zoneCounts(zone); a != 2 || w != 1 {
		t.Fatalf("zone has %d active and %d waiting, want 2 and 1", a, w)
	}
	bmu.Lock()
	repliesWhileCWaits := 0
	for _, at := range bReplies {
		if at.After(burstEnd) {
			repliesWhileCWaits++
		}
	}
	bmu.Unlock()
	if repliesWhileCWaits < 3 {
		t.Fatalf("flow B got %d echoes while C waited and blasted, want it served all along", repliesWhileCWaits)
	}
	if peers, payloads := echo.seen(); peers != 2 || payloads["C-00"] {
		t.Fatalf("backend saw %d flows (C-00 seen: %v), want only A and B", peers, payloads["C-00"])
	}

	// A goes quiet: after idle_timeout its flow ends and C is admitted.
	stopA()
	aQuiet := time.Now()
	var got []int
	for len(got) < bound {
		s, err := c.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("flow C: only %v echoed after A left (%v)", got, err)
		}
		n, err := strconv.Atoi(strings.TrimPrefix(s, "C-"))
		if err != nil {
			t.Fatalf("flow C got %q", s)
		}
		got = append(got, n)
	}
	t.Logf("flow C admitted and replayed %s after A went quiet (idle_timeout 2s)", time.Since(aQuiet))
	for i, n := range got {
		if n != i {
			t.Fatalf("flow C's first echoes are %v, want the packets sent while waiting, 0..%d, in order", got, bound-1)
		}
	}
	stopC()
	// What came later was sent after admission: nothing of the dropped
	// rest of the burst, and in order.
	c.send("C-live")
	last := bound - 1
	for {
		s, err := c.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("flow C: no echo of C-live (%v)", err)
		}
		if s == "C-live" {
			break
		}
		n, err := strconv.Atoi(strings.TrimPrefix(s, "C-"))
		if err != nil || n < burst || n <= last {
			t.Fatalf("flow C got %q after %d: packets %d..%d (over the bound) must have been dropped, the rest in order", s, last, bound, burst-1)
		}
		last = n
	}

	bmu.Lock()
	maxRTT := bMaxRTT
	bmu.Unlock()
	t.Logf("flow B: slowest echo %s while C waited", maxRTT)
	if maxRTT > 2*time.Second {
		t.Fatalf("flow B's echoes took up to %s: stalled by the waiting flow", maxRTT)
	}
	if peers, _ := echo.seen(); peers != 3 {
		t.Fatalf("backend saw %d flows, want 3", peers)
	}
	stopB()
	waitCounts(t, zone, 0, 0)
	if s := zoneSnapshot(t, zone); s.Counters.Admitted != 3 || s.Counters.Abandoned != 0 {
		t.Fatalf("admitted %d, abandoned %d; want 3 and 0", s.Counters.Admitted, s.Counters.Abandoned)
	}
}

// A waiting flow that goes quiet for idle_timeout has left: it is
// abandoned, and its packets never reach the backend.
func TestUDPQuietWaiterIsAbandoned(t *testing.T) {
	const zone = "udp-quiet"
	echo := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 1, "zone": zone}, "1s"))
	defer stopCaddy(t)

	a := dialUDP(t, port, "A")
	a.send("A-0")
	a.expect("A-0", 5*time.Second)
	stopA := a.keepSending(100*time.Millisecond, func() string { return "A-ka" })

	c := dialUDP(t, port, "C")
	sent := time.Now()
	c.send("C-0")
	waitCounts(t, zone, 1, 1)
	took := waitingDrop(t, zone, 1, 0, sent, 6*time.Second)
	t.Logf("quiet UDP waiter abandoned %s after its only packet (idle_timeout 1s)", took)
	if took < 900*time.Millisecond {
		t.Fatalf("waiter dropped %s after its packet, before idle_timeout", took)
	}
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 1 {
		t.Fatalf("abandoned %d, want 1", s.Counters.Abandoned)
	}

	stopA()
	waitCounts(t, zone, 0, 0)
	// The same client again: a new flow, admitted at once.
	c.send("C-again")
	c.expect("C-again", 5*time.Second)
	if peers, payloads := echo.seen(); peers != 2 || payloads["C-0"] {
		t.Fatalf("backend saw %d flows (C-0 seen: %v); the abandoned one must not reach it", peers, payloads["C-0"])
	}
}

// A UDP flow rejected after waiting (wait_timeout) is handed to overflow
// with the packets it sent while it waited, in order.
func TestUDPRejectedFlowTakesItsPacketsToOverflow(t *testing.T) {
	const zone = "udp-overflow"
	echo := newUDPEcho(t)
	spill := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{
		"max_connections": 1, "zone": zone, "wait_timeout": "500ms",
		"overflow": []obj{proxyTo("udp/" + spill.addr())},
	}, "5s"))
	defer stopCaddy(t)

	a := dialUDP(t, port, "A") // holds the slot
	a.send("A-0")
	a.expect("A-0", 5*time.Second)

	c := dialUDP(t, port, "C")
	c.send("C-0")
	waitCounts(t, zone, 1, 1)
	c.send("C-1")
	c.send("C-2")
	// Rejected at the wait_timeout (rounded up to a whole second for UDP
	// flows), then its three packets reach the spill-over server, in order.
	for _, want := range []string{"C-0", "C-1", "C-2"} {
		c.expect(want, 5*time.Second)
	}
	if peers, payloads := spill.seen(); peers != 1 || !payloads["C-0"] || !payloads["C-2"] {
		t.Fatalf("spill-over saw %d flows, payloads %v", peers, payloads)
	}
	if _, payloads := echo.seen(); payloads["C-0"] {
		t.Fatal("the rejected flow reached the limited backend")
	}
	if s := zoneSnapshot(t, zone); s.Counters.Rejected[engine.ReasonWaitTimeout] != 1 {
		t.Fatalf("wait_timeout rejections %d, want 1", s.Counters.Rejected[engine.ReasonWaitTimeout])
	}
}

// Matchers before and after the limit on a UDP route, with a flow that
// waited and sent more packets meanwhile: the packets a matcher before the
// limit read, those held while waiting, and the later ones all reach the
// backend in order and as separate datagrams, and a matcher after the
// limit (in a subroute) matches the flow. caddy-l4 handles a UDP flow's
// connection as one over its own packet type, so a matcher after the
// limit must not find anything else under it (it would panic).
func TestUDPMatchersAroundAWaitingFlow(t *testing.T) {
	for _, before := range []bool{false, true} {
		t.Run(fmt.Sprintf("matcher_before_%v", before), func(t *testing.T) {
			zone := fmt.Sprintf("udp-matchers-%v", before)
			echo := newUDPEcho(t)
			port := freeUDPPort(t)
			match := func(pattern string, count int) []obj {
				return []obj{{"regexp": obj{"pattern": pattern, "count": count}}}
			}
			route := obj{"handle": []obj{
				limit(obj{"max_connections": 1, "zone": zone}),
				{"handler": "subroute", "routes": []obj{{
					"match":  match("^[AC]-", 2),
					"handle": []obj{proxyTo("udp/" + echo.addr())},
				}}},
			}}
			if before {
				route["match"] = match("^[A-Z]-[0-9][A-Z]-", 5) // two datagrams
			}
			cfg := l4ConfigRoutes("", fmt.Sprintf("udp/127.0.0.1:%d", port), route)
			cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)["test"].(obj)["idle_timeout"] = "1s"
			loadConfig(t, cfg)
			defer stopCaddy(t)

			// With the matcher before the limit, a flow matches on its
			// first two datagrams, which caddy-l4 keeps as two frames.
			a := dialUDP(t, port, "A") // holds the slot until it goes quiet
			a.send("A-0")
			if before {
				a.send("A-1")
			}
			a.expect("A-0", 5*time.Second)

			c := dialUDP(t, port, "C")
			c.send("C-0")
			if before {
				c.send("C-1")
			}
			waitCounts(t, zone, 1, 1)
			// Sent well after A's last packet, so that A's flow reaches
			// the idle_timeout (and frees the slot) well before C's.
			time.Sleep(300 * time.Millisecond)
			if !before {
				c.send("C-1")
			}
			c.send("C-2")
			for _, want := range []string{"C-0", "C-1", "C-2"} { // after A's idle_timeout
				c.expect(want, 5*time.Second)
			}
			c.send("C-3")
			c.expect("C-3", 5*time.Second)
			if peers, _ := echo.seen(); peers != 2 {
				t.Fatalf("backend saw %d flows, want 2", peers)
			}
		})
	}
}

// A flow rejected without overflow (nobody may wait) that bursts packets:
// its packets are read and dropped until it goes idle, so caddy-l4's
// packet loop, shared by the listener's flows, keeps going: the admitted
// flow keeps its echoes, and a new flow is served once the slot frees.
func TestUDPRejectedBurstDoesNotStallListener(t *testing.T) {
	const zone = "udp-rejected-burst"
	echo := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 1, "max_waiting": -1, "zone": zone}, "1s"))
	defer stopCaddy(t)

	a := dialUDP(t, port, "A")
	a.send("A-0")
	a.expect("A-0", 5*time.Second)

	c := dialUDP(t, port, "C")
	for i := range 50 {
		c.send(fmt.Sprintf("C-%02d", i))
	}
	testkit.WaitFor(t, 5*time.Second, "C rejected", func() bool {
		return zoneSnapshot(t, zone).Counters.Rejected[engine.ReasonNoWaiting] == 1
	})
	a.send("A-1")
	a.expect("A-1", 2*time.Second)

	// A and C go quiet; after the idle_timeout the slot is free again.
	waitCounts(t, zone, 0, 0)
	b := dialUDP(t, port, "B")
	b.send("B-0")
	b.expect("B-0", 5*time.Second)
	if _, payloads := echo.seen(); payloads["C-00"] {
		t.Fatal("the rejected flow reached the backend")
	}
}

// UDP flows that are being served when the config is replaced: caddy-l4
// stops reading their packets (the clients' next packets start new flows
// under the new config), and v0.1.2 blocks some of them for good when they
// go idle, once more than five have ended after the reload. Their slots in
// the zone, which outlives the config, come back when the old config is
// cleaned up, not when (or if) they end; so does the place of a waiting
// flow. (Three flows here, so that none blocks for good and the leak check
// at the end sees them end.)
func TestUDPFlowsOfAReplacedConfigFreeTheirSlots(t *testing.T) {
	const zone = "udp-reload"
	echo := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 3, "zone": zone}, "3s"))
	defer stopCaddy(t)

	const n = 3
	for i := range n {
		f := dialUDP(t, port, fmt.Sprint(i))
		f.send(fmt.Sprintf("F%d", i))
		f.expect(fmt.Sprintf("F%d", i), 5*time.Second)
	}
	w := dialUDP(t, port, "W")
	w.send("W-0")
	waitCounts(t, zone, n, 1)

	reloaded := time.Now()
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 3, "zone": zone}, "5s"))
	waitCounts(t, zone, 0, 0)
	if d := time.Since(reloaded); d > 2*time.Second {
		t.Fatalf("the zone drained %s after the reload, want at once (the old flows' idle_timeout is 3s)", d)
	}
	// The zone serves the new config's flows with its whole capacity.
	for i := range n {
		f := dialUDP(t, port, fmt.Sprint("new", i))
		f.send(fmt.Sprintf("G%d", i))
		f.expect(fmt.Sprintf("G%d", i), 5*time.Second)
	}
	waitCounts(t, zone, n, 0)
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 1 {
		t.Fatalf("abandoned %d, want 1 (the flow that waited under the old config)", s.Counters.Abandoned)
	}
}

// A UDP client rejected without overflow is let go once it has been
// silent for a while (drainQuiet), so its next packets start a new flow,
// which is admitted when there is room; they are not swallowed until the
// listener's idle_timeout (5s here, longer than the client's pause). A TCP connection on another server of
// the same zone holds the only slot meanwhile.
func TestUDPRejectedClientIsAdmittedWhenItComesBack(t *testing.T) {
	const zone = "udp-retry"
	be := newBackend(t, true)
	echo := newUDPEcho(t)
	tcpListen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	port := freeUDPPort(t)
	fields := obj{"max_connections": 1, "max_waiting": -1, "zone": zone}
	cfg := udpConfig(port, echo, fields, "5s")
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	servers["tcp"] = obj{
		"listen": []string{tcpListen},
		"routes": []obj{{"handle": []obj{limit(fields), proxyTo(be.addr())}}},
	}
	loadConfig(t, cfg)
	defer stopCaddy(t)

	holder := takeSlot(t, be, tcpListen, "holder")
	c := dialUDP(t, port, "C")
	for i := range 10 {
		c.send(fmt.Sprintf("C-%02d", i))
	}
	testkit.WaitFor(t, 5*time.Second, "C rejected", func() bool {
		return zoneSnapshot(t, zone).Counters.Rejected[engine.ReasonNoWaiting] == 1
	})
	finish(be, holder)
	waitCounts(t, zone, 0, 0)

	time.Sleep(drainQuiet + time.Second)
	c.send("C-again")
	c.expect("C-again", 5*time.Second)
	if _, payloads := echo.seen(); payloads["C-00"] {
		t.Fatal("a packet of the rejected flow reached the backend")
	}
}
