package connlimit

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/logging"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// The backend never sees more than max_connections at once; the rest wait
// and are all served once slots free.
func TestLimitHoldsAndWaitersAreServed(t *testing.T) {
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 3})

	const n = 12
	var wg sync.WaitGroup
	for i := range n {
		c := dial(t, listen, fmt.Sprintf("c%d", i))
		c.hello("")
		wg.Add(1)
		go func() { // each client reads its answer, then leaves
			defer wg.Done()
			if got, err := c.readLine(30 * time.Second); got != "ok "+c.id {
				t.Errorf("client %s: got %q (err %v)", c.id, got, err)
			}
			_ = c.conn.Close()
		}()
	}
	be.waitArrivals(3, 5*time.Second)
	waitCounts(t, "", 3, n-3)
	be.noArrival(200 * time.Millisecond)

	// Let them go one at a time: each freed slot lets exactly one more in.
	for served := range n {
		be.let(1)
		if served < n-3 {
			be.waitArrivals(1, 5*time.Second)
		}
		if _, peak, _, _ := be.stats(); peak > 3 {
			t.Fatalf("backend saw %d at once, limit 3", peak)
		}
	}
	wg.Wait()
	waitCounts(t, "", 0, 0)
	if _, peak, total, _ := be.stats(); peak != 3 || total != n {
		t.Fatalf("backend peak %d (limit 3), total %d (want %d)", peak, total, n)
	}
}

// Bytes a client sends while it waits are neither read nor lost: they
// reach the backend intact once the client is admitted.
func TestWaitingBytesArriveIntact(t *testing.T) {
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 1})

	holder := takeSlot(t, be, listen, "holder")

	payload := make([]byte, 96<<10)
	_, _ = rand.Read(payload)
	sum := sha256.Sum256(payload)
	w := dial(t, listen, "waiter")
	w.hello(fmt.Sprintf("hash %d", len(payload)))
	if _, err := w.conn.Write(payload); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, "", 1, 1)

	finish(be, holder) // frees the slot
	be.waitArrivals(1, 5*time.Second)
	be.let(1)
	w.expectLine(fmt.Sprintf("waiter %d %s", len(payload), hex.EncodeToString(sum[:])), 5*time.Second)
}

// admissionOrder queues five waiters behind one holder in a zone with the
// given order and returns the order in which they reach the backend.
func admissionOrder(t *testing.T, order string) []string {
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 1, "order": order})

	holder := takeSlot(t, be, listen, "holder")
	waiters := map[string]*client{}
	for i := 1; i <= 5; i++ {
		c := dial(t, listen, fmt.Sprintf("w%d", i))
		c.hello("")
		waiters[c.id] = c
		waitCounts(t, "", 1, i) // in line before the next one comes
	}
	finish(be, holder)
	var got []string
	for range 5 {
		id := be.waitArrivals(1, 5*time.Second)[0]
		got = append(got, id)
		finish(be, waiters[id])
	}
	return got
}

func TestFIFOOrder(t *testing.T) {
	if got := strings.Join(admissionOrder(t, "fifo"), " "); got != "w1 w2 w3 w4 w5" {
		t.Fatalf("fifo admitted %s", got)
	}
}

func TestLIFOOrder(t *testing.T) {
	if got := strings.Join(admissionOrder(t, "lifo"), " "); got != "w5 w4 w3 w2 w1" {
		t.Fatalf("lifo admitted %s", got)
	}
}

// Every kind of rejection goes to the overflow chain when there is one, and
// closes the connection when there is none.
func TestRejections(t *testing.T) {
	cases := []struct {
		name   string
		fields obj
		// queued is how many wait (and stay waiting) before the rejected one
		queued int
	}{
		{"queue_full", obj{"max_connections": 1, "max_waiting": 2}, 2},
		{"wait_timeout", obj{"max_connections": 1, "wait_timeout": "150ms"}, 0},
		{"no_waiting", obj{"max_connections": 1, "max_waiting": -1}, 0},
	}
	for _, tc := range cases {
		for _, withOverflow := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/overflow=%v", tc.name, withOverflow), func(t *testing.T) {
				be := newBackend(t, true)
				spill := newBackend(t, false)
				listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
				fields := obj{}
				for k, v := range tc.fields {
					fields[k] = v
				}
				if withOverflow {
					fields["overflow"] = []obj{proxyTo(spill.addr())}
				}
				loadConfig(t, l4Config("", listen, limit(fields), proxyTo(be.addr())))
				defer stopCaddy(t)

				takeSlot(t, be, listen, "holder")
				for i := range tc.queued {
					dial(t, listen, fmt.Sprintf("q%d", i)).hello("")
				}
				waitCounts(t, "", 1, tc.queued)

				start := time.Now()
				r := dial(t, listen, "rejected")
				r.hello("")
				if withOverflow {
					r.expectLine("ok rejected", 5*time.Second)
					spill.waitArrivals(1, time.Second)
				} else {
					r.expectClosed(5 * time.Second)
				}
				if tc.name == "wait_timeout" && time.Since(start) < 100*time.Millisecond {
					t.Fatalf("rejected after %s, before wait_timeout 150ms", time.Since(start))
				}
				_, _, total, _ := be.stats()
				if total != 1 {
					t.Fatalf("backend saw %d connections, want 1 (the holder)", total)
				}
				waitCounts(t, "", 1, tc.queued)
			})
		}
	}
}

// A slot is freed exactly once whatever way the next handler ends: here
// the backend is down, so proxy fails at once, over and over.
func TestSlotFreedWhenNextHandlerFails(t *testing.T) {
	dead := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen, limit(obj{"max_connections": 2}), proxyTo(dead)))
	defer stopCaddy(t)
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dial(t, listen, fmt.Sprintf("c%d", i))
			c.hello("")
			_, _ = c.readLine(5 * time.Second)
		}()
	}
	wg.Wait()
	waitCounts(t, "", 0, 0)
}

// connection_limit as the last handler of its route does not hold the
// limit (caddy-l4's route chain returns at once): a warning says so.
func TestWarnsWhenNothingServesAfterIt(t *testing.T) {
	logFile := t.TempDir() + "/caddy.log"
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	withLog := func(cfg obj) obj {
		cfg["logging"] = obj{"logs": obj{"default": obj{
			"level":  "WARN",
			"writer": obj{"output": "file", "filename": logFile},
		}}}
		return cfg
	}
	// Placed right, with proxy after it: no warning, even for quick
	// connections.
	be := newBackend(t, false)
	loadConfig(t, withLog(l4Config("", listen, limit(obj{"max_connections": 1, "zone": "placed"}), proxyTo(be.addr()))))
	for i := range 5 {
		c := dial(t, listen, fmt.Sprintf("ok%d", i))
		c.hello("")
		c.expectLine("ok "+c.id, 5*time.Second)
		_ = c.conn.Close()
	}
	waitCounts(t, "placed", 0, 0)
	if b, _ := os.ReadFile(logFile); strings.Contains(string(b), "returned without serving") {
		t.Fatalf("warned with proxy after connection_limit:\n%s", b)
	}

	loadConfig(t, withLog(l4Config("", listen, limit(obj{"max_connections": 1, "zone": "misplaced"}))))
	defer stopCaddy(t)
	c := dial(t, listen, "c")
	c.hello("")
	_, _ = c.readLine(time.Second)
	testkit.WaitFor(t, 5*time.Second, "the misplacement warning", func() bool {
		b, _ := os.ReadFile(logFile)
		return strings.Contains(string(b), "returned without serving the connection") &&
			strings.Contains(string(b), `"zone":"misplaced"`)
	})
}
