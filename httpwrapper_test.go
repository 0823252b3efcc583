package connlimit

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/standard"
)

// End-to-end test of connection_limit in front of Caddy's own HTTP server
// (caddy-l4 as the listener wrapper caddy.listeners.layer4): the slot is
// held for the connection's whole life, idle keep-alive included.

// e2eHTTPConfig is an HTTP server on listen that answers "hello" behind a
// layer4 listener wrapper whose one route has the given handlers.
func e2eHTTPConfig(listen string, handlers ...obj) obj {
	return obj{
		"admin":   obj{"disabled": true},
		"logging": testLogging(),
		"apps": obj{"http": obj{"servers": obj{"front": obj{
			"listen":            []string{listen},
			"automatic_https":   obj{"disable": true},
			"listener_wrappers": []obj{{"wrapper": "layer4", "routes": []obj{{"handle": handlers}}}},
			"routes": []obj{{"handle": []obj{{
				"handler": "static_response",
				"body":    "hello",
			}}}},
		}}}},
	}
}

// e2eHTTPClient is one HTTP client with a single keep-alive connection.
type e2eHTTPClient struct {
	t     *testing.T
	name  string
	tr    *http.Transport
	cl    *http.Client
	conns chan net.Conn // the connections it dialled
}

func newE2EHTTPClient(t *testing.T, name string) *e2eHTTPClient {
	c := &e2eHTTPClient{t: t, name: name, conns: make(chan net.Conn, 10)}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c.tr = &http.Transport{
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		IdleConnTimeout:     time.Minute,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, network, addr)
			if err == nil {
				c.conns <- conn
			}
			return conn, err
		},
	}
	c.cl = &http.Client{Transport: c.tr, Timeout: 20 * time.Second}
	t.Cleanup(c.tr.CloseIdleConnections)
	return c
}

// get fetches url and returns the body, or the error.
func (c *e2eHTTPClient) get(url string) (string, error) {
	resp, err := c.cl.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), nil
}

func (c *e2eHTTPClient) mustGet(url string) {
	c.t.Helper()
	if body, err := c.get(url); err != nil || body != "hello" {
		c.t.Fatalf("client %s: got %q (err %v), want hello", c.name, body, err)
	}
}

// Two keep-alive clients hold both slots while their connections are idle
// and open: a third client's request waits until one of them closes its
// idle connection, and is answered promptly then.
func TestHTTPListenerWrapperHoldsSlotForKeepAlive(t *testing.T) {
	const zone = "http-front"
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	url := "http://" + listen + "/"
	loadConfig(t, e2eHTTPConfig(listen, limit(obj{"max_connections": 2, "zone": zone})))
	defer stopCaddy(t)

	c1 := newE2EHTTPClient(t, "c1")
	c2 := newE2EHTTPClient(t, "c2")
	c1.mustGet(url)
	c2.mustGet(url)
	// Both keep their connection, idle.
	c1.mustGet(url)
	if n := len(c1.conns); n != 1 {
		t.Fatalf("client c1 dialled %d connections, want 1 kept alive", n)
	}
	waitCounts(t, zone, 2, 0)

	c3 := newE2EHTTPClient(t, "c3")
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
	if s := e2eSnapshot(t, zone); s.Counters.Admitted != 3 || s.Counters.Abandoned != 0 {
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
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	url := "http://" + listen + "/"
	loadConfig(t, e2eHTTPConfig(listen, limit(obj{"max_connections": 2, "zone": zone})))
	defer stopCaddy(t)

	c := newE2EHTTPClient(t, "c")
	c.mustGet(url)
	c.mustGet(url)
	waitCounts(t, zone, 1, 0)
	c.tr.CloseIdleConnections()
	waitCounts(t, zone, 0, 0)
}
