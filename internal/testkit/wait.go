// Package testkit holds the helpers that the tests of several packages
// share: a real redis-server started per test, and polling with a bound.
package testkit

import (
	"testing"
	"time"
)

// WaitFor polls cond every millisecond until it holds or within passes.
func WaitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(time.Millisecond)
	}
}
