package connlimit

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// A zone keeps its waiters and its count across reloads made through the
// admin API: nobody is closed, the backend never sees more than the limit
// in force, raising the limit admits waiters at once, lowering it cuts
// nobody.
func TestZoneSurvivesReloads(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	cfg := func(max int) obj {
		return l4Config(admin, listen, limit(obj{"max_connections": max, "zone": "reload"}), proxyTo(be.addr()))
	}
	loadConfig(t, cfg(2))
	defer stopCaddy(t)

	clients := map[string]*client{}
	for i := range 6 {
		c := dial(t, listen, fmt.Sprintf("c%d", i))
		c.hello("")
		clients[c.id] = c
	}
	be.waitArrivals(2, 5*time.Second)
	waitCounts(t, "reload", 2, 4)

	// Raise the limit with a PATCH of max_connections: two waiters are
	// admitted as soon as the new config is in.
	start := time.Now()
	code, body := adminDo(t, http.MethodPatch,
		"http://"+admin+"/config/apps/layer4/servers/test/routes/0/handle/0/max_connections",
		"application/json", []byte("4"))
	if code != http.StatusOK {
		t.Fatalf("PATCH: %d %s", code, body)
	}
	be.waitArrivals(2, 2*time.Second)
	t.Logf("raising max_connections 2 -> 4 admitted two waiters %s after the PATCH was sent", time.Since(start))
	waitCounts(t, "reload", 4, 2)
	if got := zoneLimits(t, "reload").MaxConnections; got != 4 {
		t.Fatalf("max_connections in force %d, want 4", got)
	}

	// Lower it to 1 with a full /load: nobody is cut, nobody new is let
	// in until the count is below 1.
	if code, body := adminLoad(t, admin, cfg(1)); code != http.StatusOK {
		t.Fatalf("load: %d %s", code, body)
	}
	waitCounts(t, "reload", 4, 2)
	for served := 0; served < 3; served++ { // 4 -> 1 active: no admission yet
		id := firstGated(t, be, clients)
		finish(be, clients[id])
		delete(clients, id)
	}
	waitCounts(t, "reload", 1, 2)
	be.noArrival(200 * time.Millisecond)
	for len(clients) > 0 { // from here on, one at a time
		id := firstGated(t, be, clients)
		finish(be, clients[id])
		delete(clients, id)
		if len(clients) > 0 {
			be.waitArrivals(1, 5*time.Second)
		}
	}
	waitCounts(t, "reload", 0, 0)
	if _, peak, total, _ := be.stats(); peak > 4 || total != 6 {
		t.Fatalf("backend peak %d (limits 2, 4, 1), total %d (want 6)", peak, total)
	}
}

// firstGated returns the id of a client that is at the backend's gate.
func firstGated(t *testing.T, be *backend, clients map[string]*client) string {
	t.Helper()
	_, _, _, order := be.stats()
	for _, id := range order {
		if _, ok := clients[id]; ok {
			return id
		}
	}
	t.Fatalf("no client of %v at the backend (order %v)", keys(clients), order)
	return ""
}

func keys(m map[string]*client) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// A config that is rejected leaves the running one serving, with its
// settings and its waiters.
func TestBadConfigLeavesRunningOne(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	good := l4Config(admin, listen, limit(obj{"max_connections": 1, "zone": "bad"}), proxyTo(be.addr()))
	loadConfig(t, good)
	defer stopCaddy(t)

	holder := takeSlot(t, be, listen, "holder")
	w := dial(t, listen, "waiter")
	w.hello("")
	waitCounts(t, "bad", 1, 1)

	for _, tc := range []struct {
		fields obj
		want   string
	}{
		{obj{"max_connections": 0, "zone": "bad"}, "max_connections"},
		{obj{"max_connections": 5, "max_waiting": -2, "zone": "bad"}, "max_waiting"},
		{obj{"max_connections": 5, "wait_timeout": "-1s", "zone": "bad"}, "wait_timeout"},
		{obj{"max_connections": 5, "order": "random", "zone": "bad"}, "order"},
		{obj{"max_connections": 5, "release": "early", "zone": "bad"}, "release"},
		{obj{"max_connections": 5, "zone": "a/b"}, "zone"},
		{obj{"max_connections": 5, "zone": "bad", "overflow": []obj{{"handler": "nonesuch"}}}, "overflow"},
	} {
		code, body := adminLoad(t, admin, l4Config(admin, listen, limit(tc.fields), proxyTo(be.addr())))
		if code == http.StatusOK || !strings.Contains(body, tc.want) {
			t.Errorf("load of %v: %d %s; want an error naming %s", tc.fields, code, body, tc.want)
		}
	}
	// Two handlers of one config naming one zone with different settings.
	twice := l4ConfigRoutes(admin, listen,
		obj{"match": []obj{{"remote_ip": obj{"ranges": []string{"127.0.0.2/32"}}}},
			"handle": []obj{limit(obj{"max_connections": 3, "zone": "bad"}), proxyTo(be.addr())}},
		obj{"handle": []obj{limit(obj{"max_connections": 5, "zone": "bad"}), proxyTo(be.addr())}})
	if code, body := adminLoad(t, admin, twice); code == http.StatusOK || !strings.Contains(body, `zone \"bad\" is configured twice`) || !strings.Contains(body, "max_connections 3 and 5") {
		t.Errorf("load of one zone with two settings: %d %s", code, body)
	}

	if got := zoneLimits(t, "bad").MaxConnections; got != 1 {
		t.Fatalf("max_connections in force %d after rejected configs, want 1", got)
	}
	waitCounts(t, "bad", 1, 1)
	finish(be, holder)
	be.waitArrivals(1, 5*time.Second)
	finish(be, w)
	waitCounts(t, "bad", 0, 0)
}

// Without a zone, a reload gives the handler a fresh count; the old
// handler's waiters are not stranded: they are served by its own slots as
// they free.
func TestReloadWithoutZoneServesOldWaiters(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	cfg := func(waiting int) obj {
		return l4Config(admin, listen, limit(obj{"max_connections": 1, "max_waiting": waiting}), proxyTo(be.addr()))
	}
	loadConfig(t, cfg(0))
	defer stopCaddy(t)

	holder := takeSlot(t, be, listen, "holder")
	old := dial(t, listen, "old-waiter")
	old.hello("")
	waitCounts(t, "", 1, 1)

	if code, body := adminLoad(t, admin, cfg(5)); code != http.StatusOK {
		t.Fatalf("load: %d %s", code, body)
	}
	// The new handler counts alone: a new client gets in at once.
	fresh := dial(t, listen, "fresh")
	fresh.hello("")
	be.waitArrivals(1, 5*time.Second)
	finish(be, fresh)
	// The old waiter is served when the old holder leaves.
	finish(be, holder)
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "old-waiter" {
		t.Fatalf("%s reached the backend, want old-waiter", id)
	}
	finish(be, old)
	waitCounts(t, "", 0, 0)
}

// A config that is only provisioned and then thrown away (it fails later
// in loading) does not change the settings in force.
func TestFailedLoadDoesNotChangeZoneSettings(t *testing.T) {
	be := newBackend(t, false)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config(admin, listen, limit(obj{"max_connections": 2, "zone": "failing"}), proxyTo(be.addr())))
	defer stopCaddy(t)

	// The zone's handler provisions fine; a second server on a port that
	// cannot be bound makes the config fail when it starts.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	busy := ln.Addr().String()
	cfg := l4Config(admin, listen, limit(obj{"max_connections": 7, "zone": "failing"}), proxyTo(be.addr()))
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	servers["clash"] = obj{"listen": []string{busy}, "routes": []obj{{"handle": []obj{proxyTo(be.addr())}}}}
	if code, body := adminLoad(t, admin, cfg); code == http.StatusOK {
		t.Fatalf("load with a clashing listener succeeded: %s", body)
	}
	if got := zoneLimits(t, "failing").MaxConnections; got != 2 {
		t.Fatalf("max_connections in force %d after a failed load, want 2", got)
	}
}
