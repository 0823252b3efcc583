package connlimit

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// End-to-end tests of clients that leave while they wait: they must leave
// the waiting list at once, count as abandoned, and never reach the
// backend.

// Helpers shared by abandon_test.go, keys_test.go, udp_test.go and
// httpwrapper_test.go. They are prefixed e2e to stay clear of the helpers
// of other test files of the package.

// abandonBound is the bound asserted on abandon detection. The contract is
// 100 ms; the assertion is generous because -race and other test runs share
// two CPUs, and the measured values are logged.
const abandonBound = 500 * time.Millisecond

// A waiting client that leaves (FIN without bytes, bytes then a full close,
// a reset, or a half-close after sending its request) is out of the
// waiting list within 100 ms, is counted as abandoned, and never reaches
// the backend when the slot frees.
func TestAbandonedWaitersLeaveAtOnce(t *testing.T) {
	sendRequest := func(c *client) {
		c.hello("hash")
		_, _ = c.conn.Write([]byte("the request body"))
	}
	closeIt := func(c *client) { _ = c.conn.Close() }
	reset := func(c *client) {
		_ = c.conn.SetLinger(0)
		_ = c.conn.Close()
	}
	cases := []struct {
		name   string
		before func(c *client) // what it sends while it waits (nil: nothing)
		leave  func(c *client)
	}{
		{"fin-without-bytes", nil, closeIt},
		{"bytes-then-close", sendRequest, closeIt},
		{"reset", nil, reset},
		{"bytes-then-reset", sendRequest, reset},
		{"half-close-after-request", sendRequest, func(c *client) { _ = c.conn.CloseWrite() }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			zone := "abandon-" + tc.name
			be := newBackend(t, false)
			listen := limitedRoute(t, be, obj{"max_connections": 1, "zone": zone})

			holder := dial(t, listen, "holder")
			holder.hello("")
			holder.expectLine("ok holder", 5*time.Second)
			be.waitArrivals(1, 5*time.Second)
			w := dial(t, listen, "waiter")
			waitCounts(t, zone, 1, 1)
			if tc.before != nil {
				// Bytes sent while waiting are not leaving.
				tc.before(w)
				staysCounts(t, zone, 1, 1, 100*time.Millisecond)
			}

			start := time.Now()
			tc.leave(w)
			took := waitingDrop(t, zone, 1, 0, start, abandonBound)
			t.Logf("%s: waiter left the waiting list %s after leaving", tc.name, took)

			if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 1 || s.Counters.RejectedTotal() != 0 {
				t.Fatalf("counters: abandoned %d, rejected %d; want 1 and 0", s.Counters.Abandoned, s.Counters.RejectedTotal())
			}
			if tc.name == "half-close-after-request" {
				// It can still read: it is closed without a byte.
				w.expectClosed(5 * time.Second)
			}

			// The holder leaves: nobody may take its place.
			_ = holder.conn.Close()
			waitCounts(t, zone, 0, 0)
			be.noArrival(300 * time.Millisecond)
			if _, _, total, order := be.stats(); total != 1 {
				t.Fatalf("backend saw %d connections (%v), want only the holder", total, order)
			}
		})
	}
}

// A client that sends its request and then closes its sending side keeps
// its place with keep_half_closed, and gets its answer once admitted.
func TestKeepHalfClosedWaiterIsServed(t *testing.T) {
	const zone = "abandon-keep-half-closed"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		limit(obj{"max_connections": 1, "zone": zone, "keep_half_closed": true}), proxyTo(be.addr())))
	defer stopCaddy(t)

	holder := dial(t, listen, "holder")
	holder.hello("")
	holder.expectLine("ok holder", 5*time.Second)
	be.waitArrivals(1, 5*time.Second)

	payload := make([]byte, 64<<10)
	_, _ = rand.Read(payload)
	sum := sha256.Sum256(payload)
	w := dial(t, listen, "hw")
	w.hello("hash")
	if _, err := w.conn.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := w.conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, zone, 1, 1)
	// It keeps its place.
	staysCounts(t, zone, 1, 1, 400*time.Millisecond)
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 0 {
		t.Fatalf("half-closed waiter counted as abandoned (%d) with keep_half_closed", s.Counters.Abandoned)
	}
	be.noArrival(0)

	_ = holder.conn.Close()
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "hw" {
		t.Fatalf("backend got %q, want hw", id)
	}
	w.expectLine(fmt.Sprintf("hw %d %s", len(payload), hex.EncodeToString(sum[:])), 5*time.Second)
	_ = w.conn.Close()
	waitCounts(t, zone, 0, 0)
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 0 || s.Counters.Admitted != 2 {
		t.Fatalf("counters: abandoned %d, admitted %d; want 0 and 2", s.Counters.Abandoned, s.Counters.Admitted)
	}
}

// keep_half_closed keeps only clients that sent something: one that
// half-closes without a byte has nothing to be served and is abandoned.
// A reset is abandoned too.
func TestKeepHalfClosedStillDropsEmptyAndReset(t *testing.T) {
	cases := []struct {
		name  string
		leave func(c *client)
	}{
		{"half-close-without-bytes", func(c *client) { _ = c.conn.CloseWrite() }},
		{"reset-after-bytes", func(c *client) {
			_ = c.conn.SetLinger(0)
			_ = c.conn.Close()
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			zone := "abandon-khc-" + tc.name
			be := newBackend(t, false)
			listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
			loadConfig(t, l4Config("", listen,
				limit(obj{"max_connections": 1, "zone": zone, "keep_half_closed": true}), proxyTo(be.addr())))
			defer stopCaddy(t)

			holder := dial(t, listen, "holder")
			holder.hello("")
			holder.expectLine("ok holder", 5*time.Second)
			be.waitArrivals(1, 5*time.Second)
			w := dial(t, listen, "waiter")
			if tc.name == "reset-after-bytes" {
				w.hello("")
			}
			waitCounts(t, zone, 1, 1)
			if tc.name == "reset-after-bytes" {
				staysCounts(t, zone, 1, 1, 100*time.Millisecond)
			}

			start := time.Now()
			tc.leave(w)
			took := waitingDrop(t, zone, 1, 0, start, abandonBound)
			t.Logf("keep_half_closed, %s: waiter left the waiting list %s after leaving", tc.name, took)
			if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 1 {
				t.Fatalf("abandoned %d, want 1", s.Counters.Abandoned)
			}

			_ = holder.conn.Close()
			waitCounts(t, zone, 0, 0)
			be.noArrival(300 * time.Millisecond)
			if _, _, total, _ := be.stats(); total != 1 {
				t.Fatalf("backend saw %d connections, want only the holder", total)
			}
		})
	}
}

// Behind proxy_protocol, the request that came with the PROXY header has
// already been read from the socket into the wrapper: with
// keep_half_closed, a waiter that sent it and half-closed still keeps its
// place and is served.
func TestKeepHalfClosedBehindProxyProtocol(t *testing.T) {
	const zone = "abandon-khc-proxy-protocol"
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		proxyProtocol(),
		limit(obj{"max_connections": 1, "zone": zone, "keep_half_closed": true}),
		proxyTo(be.addr())))
	defer stopCaddy(t)

	holder := proxyClient(t, listen, "holder", "10.9.8.7", 5555)
	holder.expectLine("ok holder", 5*time.Second)
	be.waitArrivals(1, 5*time.Second)

	w := dial(t, listen, "hw")
	body := "the request body"
	if _, err := w.conn.Write([]byte("PROXY TCP4 10.9.8.8 127.0.0.1 5556 80\r\nhw hash\n" + body)); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, zone, 1, 1)
	if err := w.conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	staysCounts(t, zone, 1, 1, 300*time.Millisecond)

	_ = holder.conn.Close()
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "hw" {
		t.Fatalf("backend got %q, want hw", id)
	}
	sum := sha256.Sum256([]byte(body))
	w.expectLine(fmt.Sprintf("hw %d %s", len(body), hex.EncodeToString(sum[:])), 5*time.Second)
	waitCounts(t, zone, 0, 0)
	if s := zoneSnapshot(t, zone); s.Counters.Abandoned != 0 {
		t.Fatalf("abandoned %d, want 0", s.Counters.Abandoned)
	}
}
