package store

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
)

// UnreachablePolicy is what a node does with new arrivals while its
// zone's store cannot be reached. Connections admitted before go on
// either way.
type UnreachablePolicy struct {
	// Refuse: nobody new is admitted; arrivals wait (up to wait_timeout
	// and max_waiting, on this node) until the store is back, or are
	// rejected as when the zone is full.
	Refuse bool
	// Share, when not Refuse: this node admits up to Share connections
	// (per key value) on its own, counting those it holds; 0 means the
	// automatic share (see Admits).
	Share int
}

// Admits is how many connections (per key value) a node admits on its
// own while the store is unreachable, counting those it holds: 0 with
// Refuse; Share if set; else the automatic share, max_connections divided
// by the number of nodes the store had at the node's last successful
// renewal (rounded down, at least 1), or 1 if the node never reached the
// store since it started.
func (p UnreachablePolicy) Admits(maxConnections, nodesSeen int) int {
	switch {
	case p.Refuse:
		return 0
	case p.Share > 0:
		return p.Share
	case nodesSeen <= 0:
		return 1
	}
	return max(maxConnections/nodesSeen, 1)
}

// CheckName reports whether s can name a zone or be a key prefix in a
// store: not empty, and no '{' or '}' (they would move a Redis Cluster
// hash tag).
func CheckName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s must not be empty", what)
	}
	if strings.ContainsAny(s, "{}") {
		return fmt.Errorf("%s must not contain '{' or '}' (Redis Cluster hash tags), got %q", what, s)
	}
	return nil
}

// DefaultNodeID is a node id unique to this process: host name, process
// id and a random part.
func DefaultNodeID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "node"
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}
