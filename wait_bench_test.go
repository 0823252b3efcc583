package connlimit

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/engine"
)

// BenchmarkSocketWaitHandoff: the path of a waiting TCP connection
// (wait.go), on real sockets: newStreamWait, Acquire (queued), wait parked
// on the socket (watched, not read), woken by the Free of the one before
// it, Free. With max_connections 1 the waiters form a chain, so one op is
// one waiter's whole wait plus one handoff, goroutine wake-up included.
// The goroutines (caddy-l4 runs one per connection) are started before the
// timer runs.
func BenchmarkSocketWaitHandoff(b *testing.B) {
	const batch = 500
	servers, cleanup := socketPairs(b, batch)
	defer cleanup()
	z := engine.NewZone("bench", engine.Limits{MaxConnections: 1}, nil)
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(batch, b.N-done)
		b.StopTimer()
		holder := &engine.Waiter{}
		if out, _ := z.Acquire(holder, nil, time.Now()); out != engine.Admitted {
			b.Fatal("holder not admitted")
		}
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s := newStreamWait(servers[i], false, false)
				if out, _ := s.admit(z); out != engine.Admitted {
					panic("waiter not admitted")
				}
				z.Free(&s.Waiter)
				s.done()
			}()
		}
		for {
			if _, w := z.Counts(); w == n {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
		b.StartTimer()
		z.Free(holder)
		wg.Wait()
		done += n
	}
	b.StopTimer()
	if a, w := z.Counts(); a != 0 || w != 0 {
		b.Fatalf("counts %d %d", a, w)
	}
}

// socketPairs returns the server sides of n loopback TCP connections.
func socketPairs(b *testing.B, n int) ([]net.Conn, func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var clients, servers []net.Conn
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		clients = append(clients, c)
		servers = append(servers, s)
	}
	return servers, func() {
		for i := range clients {
			_ = clients[i].Close()
			_ = servers[i].Close()
		}
	}
}
