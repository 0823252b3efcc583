package connlimit

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// Fleet zones, end to end: separate Caddy processes share one zone through
// a real redis-server, in front of one backend.

// startFleet starts n nodes whose zone "db" has fields and the store st.
func startFleet(t *testing.T, n int, backend string, fields obj, st obj) []*caddyProc {
	t.Helper()
	f := obj{"zone": "db"}
	for k, v := range fields {
		f[k] = v
	}
	nodes := make([]*caddyProc, n)
	for i := range nodes {
		nodes[i] = startNode(t, string(rune('A'+i)), nodeConfig(backend, f, st))
	}
	registered(t, "db", nodes...)
	return nodes
}

// hashClient is a client that sends a payload after its line and expects
// the backend's digest of it.
type hashClient struct {
	*client
	want string
}

func dialHash(t *testing.T, addr, id string, size int) *hashClient {
	t.Helper()
	payload := make([]byte, size)
	_, _ = rand.Read(payload)
	c := dial(t, addr, id)
	c.hello(fmt.Sprintf("hash %d", size))
	if _, err := c.conn.Write(payload); err != nil {
		t.Fatalf("client %s: write: %v", id, err)
	}
	sum := sha256.Sum256(payload)
	return &hashClient{client: c, want: fmt.Sprintf("%s %d %s", id, size, hex.EncodeToString(sum[:]))}
}

// 1. With three nodes sharing zone db (max 6) and clients spread over all
// of them, the backend never sees more than 6 at once, and every client
// is served with its bytes intact.
func TestFleetBound(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 6}, redisStore(r, nil))

	const perNode = 10
	var clients []*hashClient
	for i := range perNode {
		for _, n := range nodes {
			clients = append(clients, dialHash(t, n.listen, fmt.Sprintf("%s%d", n.name, i), 64<<10))
		}
	}
	be.waitArrivals(6, 10*time.Second)
	be.noArrival(300 * time.Millisecond)
	views := waitNodes(t, 5*time.Second, "6 active and 24 waiting in the fleet", "db", nodes, func(vs []zoneDetailJSON) bool {
		a, w := 0, 0
		for _, v := range vs {
			a += v.Active
			w += v.Waiting
		}
		return a == 6 && w == 3*perNode-6
	})
	if views[0].Fleet.Active != 6 || views[0].Fleet.Waiting != 24 || views[0].Fleet.NodeCount != 3 || len(views[0].Fleet.Nodes) != 3 {
		t.Errorf("the store says %+v", views[0].Fleet)
	}

	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := c.readLine(30 * time.Second)
			if err != nil || got != c.want {
				t.Errorf("client %s: got %q (err %v), want its digest", c.id, got, err)
			}
			_ = c.conn.Close()
		}()
	}
	for range len(clients) {
		be.let(1)
	}
	wg.Wait()
	if _, peak, total, _ := be.stats(); peak > 6 || total != len(clients) {
		t.Fatalf("backend peak %d (max 6), %d connections (want %d)", peak, total, len(clients))
	}
	waitNodes(t, 5*time.Second, "the fleet to drain", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Active != 0 || v.Waiting != 0 || v.Fleet.Active != 0 || v.Fleet.Waiting != 0 {
				return false
			}
		}
		return true
	})
}
