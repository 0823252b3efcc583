package connlimit

import (
	"encoding/json"
	"sync"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/store"

	// The Redis store is built in: a plain xcaddy build registers it.
	_ "github.com/l4-connlimit/connlimit/store/redisstore"
)

// This file is the Caddy side of a fleet zone's store: a handler's "store"
// field names a module of store.Namespace (inline key "backend"), which
// opens the zone's shared state; package store is the contract.

// parseStoreCaddyfile reads the handler's `store <backend> { ... }`
// option, with d at the token "store", and returns the store's JSON with
// its "backend" key, for the handler's "store" field.
func parseStoreCaddyfile(d *caddyfile.Dispenser) (json.RawMessage, error) {
	if !d.NextArg() {
		return nil, d.Err("connection_limit: option 'store' needs a backend, for example 'store redis { ... }'")
	}
	name := d.Val()
	unm, err := caddyfile.UnmarshalModule(d, store.Namespace+"."+name)
	if err != nil {
		return nil, err
	}
	var warnings []caddyconfig.Warning
	raw := caddyconfig.JSONModuleObject(unm, "backend", name, &warnings)
	if len(warnings) > 0 {
		return nil, d.Errf("connection_limit: option 'store': %s", warnings[0].Message)
	}
	return raw, nil
}

// processNodeID names this process in every fleet it joins.
var processNodeID = sync.OnceValue(store.DefaultNodeID)

// storeFleet is how a zone joins the fleet of store m.
func storeFleet(m store.Module) *engine.Fleet {
	return &engine.Fleet{
		Open:        func(zone string) (store.Store, error) { return m.Open(zone, processNodeID()) },
		Unreachable: m.Unreachable(),
		Store:       m,
		Differs: func(other *engine.Fleet) string {
			om, ok := other.Store.(store.Module)
			if !ok {
				return "backend"
			}
			return m.Differs(om)
		},
	}
}
