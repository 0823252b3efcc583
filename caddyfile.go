package connlimit

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/l4-connlimit/connlimit/store"
)

// UnmarshalCaddyfile sets up the Handler from Caddyfile tokens. Syntax:
//
//	connection_limit [<max_connections>] {
//		max_connections <n>
//		max_waiting <n>
//		wait_timeout <duration>
//		order fifo|lifo
//		zone <name>
//		key <placeholder expression>
//		fair_share <placeholder expression>
//		weight <tenant value> <n>
//		fair_max <n>
//		priority <n>
//		keep_half_closed
//		release return|close_write
//		overflow {
//			<handler> [<args...>]
//		}
//		store <backend> {
//			<backend options...>
//		}
//	}
//
// max_connections is required, on the first line or in the block (not both).
// max_waiting: 0 (default) no bound, -1 nobody waits. wait_timeout: 0
// (default) no timeout. order and release take their values in any case,
// as in JSON. weight may be given once per tenant value (at least 1; every
// other tenant weighs 1); weight and fair_max (at least 1) need fair_share,
// which cannot go with key, nor (yet) with store.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the handler name
	seen := make(map[string]bool)
	once := func(name string) error {
		if seen[name] {
			return d.Errf("connection_limit: duplicate option '%s'", name)
		}
		seen[name] = true
		return nil
	}
	intArg := func(name string, min int) (int, error) {
		if !d.NextArg() {
			return 0, d.Errf("connection_limit: option '%s' needs a value", name)
		}
		n, err := strconv.Atoi(d.Val())
		if err != nil {
			return 0, d.Errf("connection_limit: option '%s': '%s' is not an integer", name, d.Val())
		}
		if n < min {
			return 0, d.Errf("connection_limit: option '%s' must be at least %d, got %d", name, min, n)
		}
		// Caddy carries module JSON through float64, which rounds larger
		// integers: turn them down here rather than load another number.
		if n > maxJSONInt || n < -maxJSONInt {
			return 0, d.Errf("connection_limit: option '%s' must be within ±%d, got %s", name, maxJSONInt, d.Val())
		}
		return n, nil
	}
	noMore := func(name string) error {
		if d.NextArg() {
			return d.Errf("connection_limit: option '%s': unexpected argument '%s'", name, d.Val())
		}
		return nil
	}

	if d.NextArg() {
		d.Prev()
		_ = once("max_connections")
		n, err := intArg("max_connections", 1)
		if err != nil {
			return err
		}
		h.MaxConnections = n
		if err := noMore("max_connections"); err != nil {
			return err
		}
	}

	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if name == "weight" {
			if err := h.weightCaddyfile(d, intArg); err != nil {
				return err
			}
			if err := noMore(name); err != nil {
				return err
			}
			continue
		}
		if err := once(name); err != nil {
			return err
		}
		var err error
		switch name {
		case "max_connections":
			h.MaxConnections, err = intArg(name, 1)
		case "max_waiting":
			h.MaxWaiting, err = intArg(name, -1)
		case "priority":
			h.Priority, err = intArg(name, -int(^uint(0)>>1)-1)
		case "fair_max":
			var n int
			n, err = intArg(name, 1)
			h.FairMax = &n
		case "fair_share":
			if !d.NextArg() {
				return d.Errf("connection_limit: option '%s' needs a value", name)
			}
			h.FairShare = d.Val()
		case "wait_timeout":
			if !d.NextArg() {
				return d.Errf("connection_limit: option '%s' needs a value", name)
			}
			dur, perr := caddy.ParseDuration(d.Val())
			if perr != nil {
				return d.Errf("connection_limit: option '%s': %v", name, perr)
			}
			if dur < 0 {
				return d.Errf("connection_limit: option '%s' must not be negative, got %s", name, d.Val())
			}
			h.WaitTimeout = caddy.Duration(dur)
		case "order":
			if !d.NextArg() {
				return d.Errf("connection_limit: option '%s' needs a value", name)
			}
			if _, perr := store.ParseOrder(d.Val()); perr != nil {
				return d.Errf("connection_limit: option '%s' %v", name, perr)
			}
			h.Order = d.Val()
		case "zone", "key":
			if !d.NextArg() {
				return d.Errf("connection_limit: option '%s' needs a value", name)
			}
			if name == "zone" {
				h.Zone = d.Val()
			} else {
				h.Key = d.Val()
			}
		case "keep_half_closed":
			h.KeepHalfClosed = true
		case "release":
			if !d.NextArg() {
				return d.Errf("connection_limit: option '%s' needs a value", name)
			}
			if _, perr := parseRelease(d.Val()); perr != nil {
				return d.Errf("connection_limit: option '%s' %v", name, perr)
			}
			h.Release = d.Val()
		case "store":
			raw, err := parseStoreCaddyfile(d)
			if err != nil {
				return err
			}
			h.StoreRaw = raw
			continue
		case "overflow":
			if d.NextArg() {
				return d.Errf("connection_limit: option '%s' takes a block of handlers, not '%s'", name, d.Val())
			}
			if err := layer4.ParseCaddyfileNestedHandlers(d, &h.OverflowRaw); err != nil {
				return err
			}
			if len(h.OverflowRaw) == 0 {
				return d.Errf("connection_limit: option '%s' needs at least one handler in its block", name)
			}
			continue
		default:
			return d.Errf("connection_limit: unknown option '%s'", name)
		}
		if err != nil {
			return err
		}
		if err := noMore(name); err != nil {
			return err
		}
	}
	if h.MaxConnections == 0 {
		return d.Err("connection_limit: max_connections is required")
	}
	switch {
	case h.FairShare == "" && len(h.Weights) > 0:
		return d.Err("connection_limit: option 'weight' needs fair_share, which names each connection's tenant")
	case h.FairShare == "" && h.FairMax != nil:
		return d.Err("connection_limit: option 'fair_max' needs fair_share, which names each connection's tenant")
	case h.FairShare != "" && h.Key != "":
		return d.Err("connection_limit: options 'fair_share' and 'key' cannot be used together: key gives each key value a max_connections of its own, fair_share shares one between tenants")
	}
	return nil
}

// weightCaddyfile reads `weight <tenant value> <n>`.
func (h *Handler) weightCaddyfile(d *caddyfile.Dispenser, intArg func(string, int) (int, error)) error {
	if !d.NextArg() {
		return d.Err("connection_limit: option 'weight' needs a tenant value and a weight")
	}
	tenant := d.Val()
	if _, dup := h.Weights[tenant]; dup {
		return d.Errf("connection_limit: option 'weight': tenant '%s' is given twice", tenant)
	}
	n, err := intArg("weight", 1)
	if err != nil {
		return err
	}
	if h.Weights == nil {
		h.Weights = make(map[string]int)
	}
	h.Weights[tenant] = n
	return nil
}

// maxJSONInt is the largest integer a float64 holds exactly (2^53).
const maxJSONInt = 1 << 53

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
