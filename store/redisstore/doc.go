// Package redisstore keeps connlimit's fleet zones in Redis: the Caddy
// module layer4.connection_limit.stores.redis (Module), and the store.Store
// it opens for each zone, whose every operation is one function of a Redis
// Functions library in Lua (lua/).
// A build of connlimit registers it: the root package imports it.
package redisstore
