package connlimit

import (
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// A backend that answers and closes while its client keeps the connection
// open: by default the slot is held until the client closes too (proxy
// returns then); with release close_write it is freed once proxy has
// passed the backend's close on to the client. Either way the backend
// never serves more than the limit, and the slot is freed exactly once.
func TestReleaseAtCloseWrite(t *testing.T) {
	for _, release := range []string{"return", "close_write"} {
		t.Run(release, func(t *testing.T) {
			be := newBackend(t, true)
			listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
			loadConfig(t, l4Config("", listen,
				limit(obj{"max_connections": 1, "release": release}), proxyTo(be.addr())))
			defer stopCaddy(t)

			c1 := dial(t, listen, "c1")
			c1.hello("close")
			be.waitArrivals(1, 5*time.Second)
			c2 := dial(t, listen, "c2")
			c2.hello("close")
			waitCounts(t, "", 1, 1)

			be.letID("c1")
			c1.expectLine("ok c1", 5*time.Second)
			if got, err := c1.readLine(5 * time.Second); got != "" || err != io.EOF {
				t.Fatalf("c1 after its reply: got %q (err %v), want EOF", got, err)
			}
			// c1 has read the end of its reply and keeps its side open.
			if release == "close_write" {
				be.waitArrivals(1, 5*time.Second)
				waitCounts(t, "", 1, 0)
			} else {
				be.noArrival(300 * time.Millisecond)
				waitCounts(t, "", 1, 1)
				_ = c1.conn.Close()
				be.waitArrivals(1, 5*time.Second)
			}
			be.letID("c2")
			c2.expectLine("ok c2", 5*time.Second)
			_ = c1.conn.Close()
			_ = c2.conn.Close()
			waitCounts(t, "", 0, 0)
			if _, peak, total, _ := be.stats(); peak != 1 || total != 2 {
				t.Fatalf("backend peak %d (limit 1), total %d (want 2)", peak, total)
			}
		})
	}
}

// Many clients through a per-IP limit and a global one, both with release
// close_write. Every client keeps its side open after reading the end of
// its reply, until all were served: only close_write lets the next ones
// in meanwhile (with the default this would wait for ever). The backend
// never serves more than the global limit, and every slot of both zones
// comes back.
func TestReleaseAtCloseWriteChainedCounts(t *testing.T) {
	be := newBackend(t, false)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	loadConfig(t, l4Config("", listen,
		limit(obj{"max_connections": 2, "zone": "rcw_ip", "key": "{l4.conn.remote_ip}", "release": "close_write"}),
		limit(obj{"max_connections": 3, "zone": "rcw_all", "release": "close_write"}),
		proxyTo(be.addr())))
	defer stopCaddy(t)

	const n = 40
	var wg sync.WaitGroup
	allServed := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialFrom(t, fmt.Sprintf("127.0.0.%d", 1+i%4), listen, fmt.Sprintf("c%d", i))
			c.hello("close")
			if got, err := c.readLine(30 * time.Second); got != "ok "+c.id {
				t.Errorf("client %s: got %q (err %v)", c.id, got, err)
			}
			<-allServed // the side of the client stays open until then
			_ = c.conn.Close()
		}()
	}
	testkit.WaitFor(t, 30*time.Second, "every client served while the earlier ones keep their side open", func() bool {
		_, _, total, _ := be.stats()
		return total == n
	})
	waitCounts(t, "rcw_ip", 0, 0)
	waitCounts(t, "rcw_all", 0, 0)
	close(allServed)
	wg.Wait()
	if _, peak, total, _ := be.stats(); peak > 3 || total != n {
		t.Fatalf("backend peak %d (limit 3), total %d (want %d)", peak, total, n)
	}
}

// blockingObserver blocks the first slot it sees freed until let go.
type blockingObserver struct {
	freeing chan struct{} // closed when a release has started
	letGo   chan struct{}
	once    sync.Once
}

func (o *blockingObserver) ActiveDelta(d int) {
	if d < 0 {
		o.once.Do(func() {
			close(o.freeing)
			<-o.letGo
		})
	}
}
func (*blockingObserver) WaitingDelta(int)                  {}
func (*blockingObserver) Admitted(time.Duration)            {}
func (*blockingObserver) Rejected(engine.Reason)            {}
func (*blockingObserver) Abandoned()                        {}
func (*blockingObserver) LimitsChanged(engine.Limits, bool) {}
func (*blockingObserver) OverrideEnded()                    {}
func (*blockingObserver) Paused(bool)                       {}

// heldSlot.free, called twice at once (a CloseWrite in some goroutine and
// the end of serve): the slot is freed once, and the second call does not
// return before the first is done, since the arrival then goes back to
// its pool.
func TestHeldSlotSecondFreeWaitsForTheFirst(t *testing.T) {
	obs := &blockingObserver{freeing: make(chan struct{}), letGo: make(chan struct{})}
	z := engine.NewZone("held", engine.Limits{MaxConnections: 1}, obs)
	a := &streamWait{}
	if out, _ := z.Acquire(&a.Waiter, nil, time.Now()); out != engine.Admitted {
		t.Fatal("not admitted")
	}
	s := &heldSlot{zone: z, a: a}
	first := make(chan struct{})
	go func() { s.free(); close(first) }()
	<-obs.freeing // the first free is inside engine.Zone.Free
	second := make(chan struct{})
	go func() { s.free(); close(second) }()
	select {
	case <-second:
		t.Fatal("the second free returned while the first was still releasing")
	case <-time.After(100 * time.Millisecond):
	}
	close(obs.letGo)
	<-first
	<-second
	if a, n := z.Counts(); a != 0 || n != 0 {
		t.Fatalf("counts %d active, %d waiting; want 0, 0", a, n)
	}
}
