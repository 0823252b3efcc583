package connlimit

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestMain runs the tests, then checks that none of this package's
// connection goroutines is left behind (waiting, serving, or stuck) and
// that every zone drained: each test closes its clients and backends, so
// nothing of connection_limit may outlive it.
func TestMain(m *testing.M) {
	code := m.Run()
	_ = caddy.Stop()
	removeCaddyBuild()
	if code == 0 {
		if err := checkNothingLeft(10 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "leak check:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// ourFrames are the functions a connection's goroutine is in while
// connection_limit holds it.
var ourFrames = [][]byte{
	[]byte("connlimit.(*Handler).Handle("),
	[]byte("connlimit.(*streamWait).wait("),
	[]byte("connlimit.(*flowWait).wait("),
}

func checkNothingLeft(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		stuck := goroutinesIn(ourFrames)
		var busy []string
		for _, z := range zones.Zones() {
			if a, w := z.Counts(); a != 0 || w != 0 {
				busy = append(busy, fmt.Sprintf("zone %q: %d active, %d waiting", z.Name(), a, w))
			}
		}
		if len(stuck) == 0 && len(busy) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d goroutines still in connection_limit, zones not drained %v:\n%s",
				len(stuck), busy, bytes.Join(stuck, []byte("\n\n")))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// goroutinesIn returns the stacks of the goroutines that are in any of
// the given functions.
func goroutinesIn(frames [][]byte) [][]byte {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var found [][]byte
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		for _, f := range frames {
			if bytes.Contains(g, f) {
				found = append(found, g)
				break
			}
		}
	}
	return found
}

// The check itself can fail: a waiter held in line is seen.
func TestLeakCheckSeesAWaiter(t *testing.T) {
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 1})
	holder := takeSlot(t, be, listen, "holder")
	w := dial(t, listen, "waiter")
	w.hello("")
	waitCounts(t, "", 1, 1)
	if err := checkNothingLeft(100 * time.Millisecond); err == nil {
		t.Fatal("leak check saw nothing while a connection waits and one is served")
	}
	finish(be, holder)
	be.waitArrivals(1, 5*time.Second)
	finish(be, w)
	waitCounts(t, "", 0, 0)
}
