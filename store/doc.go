// Package store is the contract between connlimit's fleet zones and the
// store that shares them between Caddy processes: the interface a store
// implements (Store), the Caddy module that opens one for a zone (Module),
// and the tickets, states and errors they exchange. It holds no
// implementation; the Redis store is package store/redisstore, and an etcd
// or a Consul store can be written in a module of its own.
//
// A store module is a Caddy module in the namespace Namespace that
// implements Module; a handler names it in its "store" field (inline key
// "backend").
package store
