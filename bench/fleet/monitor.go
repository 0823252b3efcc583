package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// INFO commandstats counts every FCALL alike, whatever the function. To
// tell a connection's round trips (take, give, leave, the BRPOPLPUSH of its
// grant) from the nodes' own traffic (renewals, BRPOPLPUSHes re-armed after a
// timeout), the round-trip measurements also watch Redis' MONITOR feed,
// which names each FCALL's function ("connlimit_<hash of the library>_take")
// and its zone (its one key). MONITOR costs Redis time, so it runs only in
// those measurements, never in a timed one.

// opOfFunction is the operation of one of the store's functions
// ("take"), or "" for another function.
func opOfFunction(fn string) string {
	rest, ok := strings.CutPrefix(fn, "connlimit_")
	if !ok {
		return ""
	}
	_, op, ok := strings.Cut(rest, "_")
	if !ok {
		return ""
	}
	return op
}

// monitor counts the commands clients send (not those functions run), per
// zone: "take", "give", "renew"... for FCALL, "brpoplpush", and the
// command's name for anything else.
type monitor struct {
	conn    net.Conn
	marker  string
	mu      sync.Mutex
	counts  map[string]map[string]int64 // zone -> what -> calls
	done    chan struct{}
	readErr error
}

func startMonitor(addr string) (*monitor, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
	if _, err := c.Write([]byte("MONITOR\r\n")); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(c, 1<<16)
	first, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(first, "+OK") {
		c.Close()
		return nil, fmt.Errorf("MONITOR: %q %v", first, err)
	}
	m := &monitor{conn: c, counts: map[string]map[string]int64{}, done: make(chan struct{}),
		marker: fmt.Sprintf("connlimit-bench-monitor-end-%d", time.Now().UnixNano())}
	go m.read(br)
	return m, nil
}

func (m *monitor) read(br *bufio.Reader) {
	defer close(m.done)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			m.readErr = err
			return
		}
		// +1700000000.123456 [0 127.0.0.1:5555] "fcall" "fn" "1" "key" ...
		_, rest, ok := strings.Cut(line, " [")
		if !ok {
			continue
		}
		client, args, ok := strings.Cut(rest, "] ")
		if !ok || strings.HasSuffix(client, " lua") {
			continue // a command a function ran
		}
		f := splitQuoted(strings.TrimSpace(args))
		if len(f) == 0 {
			continue
		}
		cmd := strings.ToLower(f[0])
		if cmd == "echo" && len(f) > 1 && f[1] == m.marker {
			return
		}
		what, zone := cmd, ""
		switch cmd {
		case "fcall":
			if len(f) > 3 {
				zone = zoneOfKey(f[3])
			}
			what = "fcall(other function)"
			if len(f) > 1 {
				if op := opOfFunction(f[1]); op != "" {
					what = op
				}
			}
		case "brpoplpush":
			if len(f) > 1 {
				zone = zoneOfKey(f[1])
			}
		}
		m.mu.Lock()
		if m.counts[zone] == nil {
			m.counts[zone] = map[string]int64{}
		}
		m.counts[zone][what]++
		m.mu.Unlock()
	}
}

// stop ends the feed after every command sent before it, and returns the
// counts.
func (m *monitor) stop(r *redisProc) (map[string]map[string]int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := r.c.Echo(ctx, m.marker).Err()
	cancel()
	if err == nil {
		select {
		case <-m.done:
		case <-time.After(10 * time.Second):
			err = fmt.Errorf("MONITOR: end marker not seen")
		}
	}
	m.conn.Close()
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.counts, err
}

// zoneOfKey is the zone of a store key "<prefix>:{<zone>}...".
func zoneOfKey(k string) string {
	_, rest, ok := strings.Cut(k, "{")
	if !ok {
		return ""
	}
	z, _, _ := strings.Cut(rest, "}")
	return z
}

// splitQuoted splits MONITOR's `"a" "b\"c"` into its unquoted fields.
func splitQuoted(s string) []string {
	var out []string
	for len(s) > 0 {
		if s[0] != '"' {
			f, rest, _ := strings.Cut(s, " ")
			out = append(out, f)
			s = strings.TrimLeft(rest, " ")
			continue
		}
		i := 1
		for i < len(s) && s[i] != '"' {
			if s[i] == '\\' {
				i++
			}
			i++
		}
		if i > len(s) {
			i = len(s)
		}
		q := s[:min(i+1, len(s))]
		if u, err := strconv.Unquote(q); err == nil {
			out = append(out, u)
		} else {
			out = append(out, strings.Trim(q, `"`))
		}
		if i+1 >= len(s) {
			break
		}
		s = strings.TrimLeft(s[i+1:], " ")
	}
	return out
}
