// Package engine is connlimit's engine: zones (counts, waiting lists,
// order, timeouts, run-time overrides, pause), the registry that keeps
// them across config reloads, and a node's side of a zone shared by a
// fleet through a store (package store). It knows nothing of Caddy or of
// sockets: the handler drives it.
package engine
