package connlimit

import (
	"fmt"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/standard"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// End-to-end test of connection_limit in front of Caddy's own HTTP server
// (caddy-l4 as the listener wrapper caddy.listeners.layer4): the slot is
// held for the connection's whole life, idle keep-alive included.

// Two keep-alive clients hold both slots while their connections are idle
// and open: a third client's request waits until one of them closes its
// idle connection, and is answered promptly then.
func TestHTTPListenerWrapperHoldsSlotForKeepAlive(t *testing.T) {
	const zone = "http-front"
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	url := "http://" + listen + "/"
	loadConfig(t, httpConfig(listen, limit(obj{"max_connections": 2, "zone": zone})))
	defer stopCaddy(t)

	c1 := newHTTPClient(t, "c1")
	c2 := newHTTPClient(t, "c2")
	c1.mustGet(url)
	c2.mustGet(url)
	// Both keep their connection, idle.
	c1.mustGet(url)
	if n := len(c1.conns); n != 1 {
		t.Fatalf("client c1 dialled %d connections, want 1 kept alive", n)
	}
	waitCounts(t, zone, 2, 0)

	c3 := newHTTPClient(t, "c3")
	type answer struct {
		body string
		err  error
		at   time.Time
	}
	answered := make(chan answer, 1)
	go func() {
		body, err := c3.get(url)
		answered <- answer{body, err, time.Now()}
	}()
	waitCounts(t, zone, 2, 1)
	select {
	case a := <-answered:
		t.Fatalf("client c3 got %q (err %v) while both slots are held by idle keep-alive connections", a.body, a.err)
	case <-time.After(500 * time.Millisecond):
	}
	if a, w := zoneCounts(zone); a != 2 || w != 1 {
		t.Fatalf("zone has %d active and %d waiting, want 2 and 1", a, w)
	}

	closed := time.Now()
	c1.tr.CloseIdleConnections()
	select {
	case a := <-answered:
		if a.err != nil || a.body != "hello" {
			t.Fatalf("client c3 got %q (err %v), want hello", a.body, a.err)
		}
		t.Logf("client c3 answered %s after c1 closed its idle connection", a.at.Sub(closed))
	case <-time.After(5 * time.Second):
		t.Fatalf("client c3 not answered 5s after c1 closed its idle connection")
	}
	// c3's connection now holds c1's slot, idle.
	waitCounts(t, zone, 2, 0)
	c2.mustGet(url) // c2's kept connection still works

	c2.tr.CloseIdleConnections()
	c3.tr.CloseIdleConnections()
	waitCounts(t, zone, 0, 0)
	if s := zoneSnapshot(t, zone); s.Counters.Admitted != 3 || s.Counters.Abandoned != 0 {
		t.Fatalf("admitted %d, abandoned %d; want 3 and 0", s.Counters.Admitted, s.Counters.Abandoned)
	}
}

// caddy-l4 v0.1.2's listener wrapper reads the byte counters of the
// Connection it made (for a debug log) after handing it to the HTTP
// server, whose reads and writes update them. serveHTTP therefore hands
// the HTTP server a copy (cx.Wrap), so that no connection through
// connection_limit in front of Caddy's HTTP server is a data race; under
// -race this test fails if the HTTP server gets caddy-l4's Connection.
func TestHTTPListenerWrapperNoDataRace(t *testing.T) {
	const zone = "http-race"
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	url := "http://" + listen + "/"
	loadConfig(t, httpConfig(listen, limit(obj{"max_connections": 2, "zone": zone})))
	defer stopCaddy(t)

	c := newHTTPClient(t, "c")
	c.mustGet(url)
	c.mustGet(url)
	waitCounts(t, zone, 1, 0)
	c.tr.CloseIdleConnections()
	waitCounts(t, zone, 0, 0)
}
