package testkit

import (
	"errors"
	"testing"
)

// A snapshot brings back the data of its moment, and only on RestartFrom:
// a plain Restart still starts empty.
func TestSnapshotRestartFrom(t *testing.T) {
	r := StartRedis(t, RedisConfig{})
	if _, err := r.Do("SET", "k", "then"); err != nil {
		t.Fatal(err)
	}
	snap, err := r.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("SET", "k", "now"); err != nil {
		t.Fatal(err)
	}
	r.Kill()
	r.Restart()
	if _, err := r.Str("GET", "k"); !errors.Is(err, ErrNil) {
		t.Fatalf("after Restart: GET k: %v, want nil (empty)", err)
	}
	r.Kill()
	r.RestartFrom(snap)
	if v, err := r.Str("GET", "k"); err != nil || v != "then" {
		t.Fatalf("after RestartFrom: GET k = %q (%v), want \"then\"", v, err)
	}
	r.Kill()
	r.Restart()
	if _, err := r.Str("GET", "k"); !errors.Is(err, ErrNil) {
		t.Fatalf("a Restart after RestartFrom: GET k: %v, want nil (empty)", err)
	}
}
