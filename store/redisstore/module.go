package redisstore

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/l4-connlimit/connlimit/store"
)

func init() {
	caddy.RegisterModule(new(Module))
	// go-redis logs to stderr on its own (a failed dial, for example, once
	// per pooled connection); in Caddy that goes to Caddy's log, at debug:
	// the zone says itself, once, when its store cannot be reached.
	redis.SetLogger(redisLog{})
}

// redisLog hands go-redis's log lines to Caddy's logger.
type redisLog struct{}

func (redisLog) Printf(_ context.Context, format string, v ...any) {
	caddy.Log().Named("layer4.connection_limit.redis").Debug(fmt.Sprintf(format, v...))
}

// The values of on_unreachable.
const (
	onUnreachableLocalShare = "local_share"
	onUnreachableRefuse     = "refuse"
)

// Module keeps a fleet zone's shared state in Redis (version 7.0 or
// newer, for Redis Functions, or a server that speaks its protocol and
// runs them: Valkey). Every key of a zone is "<key_prefix>:{<zone>}:...": one
// zone is one Redis Cluster slot.
//
// Caddyfile (in a connection_limit block):
//
//	store redis {
//		address <host:port>
//		username <name>
//		password <password>
//		db <n>
//		cluster
//		tls
//		tls_ca_file <file>
//		tls_server_name <name>
//		key_prefix <prefix>
//		lease <duration>
//		on_unreachable local_share [<n>] | refuse
//	}
type Module struct {
	// host:port of the Redis server. Required: every node of a fleet must
	// name the same server. Placeholders are replaced at provision
	// ({env.REDIS_ADDRESS}).
	Address string `json:"address,omitempty"`

	// The ACL user name (Redis 6 and newer), with password. Optional.
	// Placeholders are replaced at provision.
	Username string `json:"username,omitempty"`

	// The password (requirepass, or the ACL user's). Optional. Give it as
	// a placeholder, for example {env.CONNLIMIT_REDIS_PASSWORD}: it is
	// replaced at provision, and the configuration (which Caddy may show
	// or log) then holds only the placeholder. It is never logged. A
	// password that resolves to nothing is an error.
	Password string `json:"password,omitempty"`

	// The database number. Default 0.
	DB int `json:"db,omitempty"`

	// address is a node of a Redis Cluster: the client learns the other
	// nodes from it and sends each zone's commands to the shard of its
	// slot. db must then be 0.
	Cluster bool `json:"cluster,omitempty"`

	// Connect with TLS (to a Redis with tls-port), verifying the server's
	// certificate against the system's roots, or tls_ca_file.
	TLS bool `json:"tls,omitempty"`

	// With tls: a PEM file of the CA certificates to trust instead of the
	// system's. Placeholders are replaced at provision.
	TLSCAFile string `json:"tls_ca_file,omitempty"`

	// With tls: the name to verify the server's certificate for; default
	// the host of address.
	TLSServerName string `json:"tls_server_name,omitempty"`

	// Starts every key; default "connlimit". Fleets that share a Redis
	// and a zone name apart need different prefixes. No '{' or '}'.
	KeyPrefix string `json:"key_prefix,omitempty"`

	// How long the store keeps a node registered without hearing from it.
	// A node renews every third of it (every second at most); the slots
	// and waiters of a node that stops (crash, network split, a stall
	// longer than the lease) go to the others within lease + 1 s. Default
	// 5s; at least 1s.
	LeaseDuration caddy.Duration `json:"lease,omitempty"`

	// What a node does with new arrivals while the store cannot be
	// reached (down, or not answering within a second): "local_share"
	// (the default) admits up to local_share connections on this node on
	// its own; "refuse" admits nobody new (they wait, on this node, up to
	// wait_timeout, or are rejected as when the zone is full). Connections
	// already admitted go on either way, and once the store is back the
	// node registers what it serves.
	//
	// local_share is the default because the store exists to share a
	// limit, not to be a single point of failure: with "refuse" an outage
	// of Redis stops every new connection of the fleet, and the backend a
	// limit protects is usually still up. With the automatic share each
	// node fills its part of max_connections, counting what it holds: a
	// node that held more than its part when Redis went away keeps it and
	// admits nobody new, so the fleet can hold up to the sum over nodes of
	// the larger of what each held and its part (max_connections when the
	// load was even), more if a node joins meanwhile. Choose "refuse"
	// where exceeding the limit is worse than rejecting newcomers.
	OnUnreachable string `json:"on_unreachable,omitempty"`

	// With on_unreachable local_share: how many connections (per key
	// value) this node admits on its own while the store is unreachable,
	// counting those it holds. 0 (the default) is the automatic share:
	// max_connections divided by the number of nodes the fleet had when
	// the store was last reached (at least 1), or 1 if this node never
	// reached it since it started.
	LocalShare int `json:"local_share,omitempty"`

	// resolved at provision
	address, username, password, caFile string
	tlsConfig                           *tls.Config
	lease                               time.Duration
	policy                              store.UnreachablePolicy
	provisioned                         bool
}

// CaddyModule returns the Caddy module information.
func (*Module) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  store.Namespace + ".redis",
		New: func() caddy.Module { return new(Module) },
	}
}

// Provision replaces the placeholders, checks every setting (an error
// names the field) and loads tls_ca_file. It does not connect: Caddy
// starts while Redis is down.
func (s *Module) Provision(caddy.Context) error {
	return s.provision(caddy.NewReplacer())
}

func (s *Module) provision(repl *caddy.Replacer) error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("connection_limit store redis: "+format, args...)
	}
	s.address = repl.ReplaceKnown(s.Address, "")
	if s.address == "" {
		if s.Address != "" {
			return fail("address %q resolves to nothing (is the environment variable set?)", s.Address)
		}
		return fail("address is required (host:port of the Redis server)")
	}
	host, port, err := net.SplitHostPort(s.address)
	if err != nil {
		return fail("address must be host:port: %v", err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || host == "" {
		return fail("address must be host:port with a port from 1 to 65535, got %q", s.address)
	}
	s.username = repl.ReplaceKnown(s.Username, "")
	if s.Username != "" && s.username == "" {
		return fail("username %q resolves to nothing (is the environment variable set?)", s.Username)
	}
	s.password = repl.ReplaceKnown(s.Password, "")
	if s.Password != "" && s.password == "" {
		// the configured value is a placeholder (or it would not resolve
		// to nothing): safe to show
		return fail("password %q resolves to nothing (is the environment variable set?)", s.Password)
	}
	if s.username != "" && s.password == "" {
		return fail("username needs a password")
	}
	if s.DB < 0 {
		return fail("db must not be negative, got %d", s.DB)
	}
	if s.Cluster && s.DB != 0 {
		return fail("db must be 0 with cluster, got %d", s.DB)
	}
	s.tlsConfig, s.caFile = nil, ""
	if !s.TLS && (s.TLSCAFile != "" || s.TLSServerName != "") {
		return fail("tls_ca_file and tls_server_name need tls")
	}
	if s.TLS {
		s.tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: s.TLSServerName}
		if s.TLSCAFile != "" {
			s.caFile = repl.ReplaceKnown(s.TLSCAFile, "")
			pem, err := os.ReadFile(s.caFile)
			if err != nil {
				return fail("tls_ca_file: %v", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return fail("tls_ca_file %s holds no PEM certificate", s.caFile)
			}
			s.tlsConfig.RootCAs = pool
		}
	}
	if s.KeyPrefix == "" {
		s.KeyPrefix = DefaultKeyPrefix
	}
	if err := store.CheckName("key_prefix", s.KeyPrefix); err != nil {
		return fail("%v", err)
	}
	s.lease = time.Duration(s.LeaseDuration)
	if s.lease == 0 {
		s.lease = store.DefaultLease
	}
	if s.lease < store.MinLease {
		return fail("lease must be at least %s, got %s", store.MinLease, s.lease)
	}
	switch s.OnUnreachable {
	case "", onUnreachableLocalShare:
		s.policy = store.UnreachablePolicy{Share: s.LocalShare}
	case onUnreachableRefuse:
		if s.LocalShare != 0 {
			return fail("local_share is for on_unreachable local_share, not refuse")
		}
		s.policy = store.UnreachablePolicy{Refuse: true}
	default:
		return fail("on_unreachable must be local_share or refuse, got %q", s.OnUnreachable)
	}
	if s.LocalShare < 0 {
		return fail("local_share must not be negative, got %d", s.LocalShare)
	}
	s.provisioned = true
	return nil
}

// Open implements store.Module.
func (s *Module) Open(zone, nodeID string) (store.Store, error) {
	if !s.provisioned {
		return nil, errors.New("connection_limit store redis: not provisioned")
	}
	st, err := New(Options{
		Address:   s.address,
		Username:  s.username,
		Password:  s.password,
		DB:        s.DB,
		Cluster:   s.Cluster,
		TLS:       s.tlsConfig,
		KeyPrefix: s.KeyPrefix,
		Lease:     s.lease,
	}, zone, nodeID)
	if err != nil {
		return nil, err
	}
	st.(*redisFleet).evictWarn = func(policy string) {
		caddy.Log().Named("layer4.handlers.connection_limit").Warn("the zone's Redis may evict its keys under memory pressure, which loses the fleet's slots and waiters as a restart empty would; set maxmemory-policy to noeviction (or a volatile-* policy: the zone's keys have no TTL)",
			zap.String("zone", zone), zap.String("maxmemory_policy", policy))
	}
	return st, nil
}

// Unreachable implements store.Module.
func (s *Module) Unreachable() store.UnreachablePolicy { return s.policy }

// Lease implements store.Module.
func (s *Module) Lease() time.Duration { return s.lease }

// Differs implements store.Module, comparing the provisioned settings.
func (s *Module) Differs(other store.Module) string {
	o, ok := other.(*Module)
	if !ok {
		return "backend"
	}
	switch {
	case s.address != o.address:
		return "address"
	case s.username != o.username:
		return "username"
	case s.password != o.password:
		return "password"
	case s.DB != o.DB:
		return "db"
	case s.Cluster != o.Cluster:
		return "cluster"
	case s.TLS != o.TLS:
		return "tls"
	case s.caFile != o.caFile:
		return "tls_ca_file"
	case s.TLSServerName != o.TLSServerName:
		return "tls_server_name"
	case s.KeyPrefix != o.KeyPrefix:
		return "key_prefix"
	case s.lease != o.lease:
		return "lease"
	case s.policy.Refuse != o.policy.Refuse:
		return "on_unreachable"
	case s.policy.Share != o.policy.Share:
		return "local_share"
	}
	return ""
}

// UnmarshalCaddyfile sets up the store from the Caddyfile tokens of
// `redis { ... }` (the backend's name first); see Module.
func (s *Module) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the backend's name
	if d.NextArg() {
		return d.Errf("connection_limit store redis: unexpected argument '%s' (the settings go in a block)", d.Val())
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("connection_limit store redis: duplicate option '%s'", name)
		}
		seen[name] = true
		var args []string
		for d.NextArg() {
			args = append(args, d.Val())
		}
		want := func(n int) error {
			if len(args) != n {
				if n == 0 {
					return d.Errf("connection_limit store redis: option '%s' takes no value", name)
				}
				return d.Errf("connection_limit store redis: option '%s' needs one value", name)
			}
			return nil
		}
		atoi := func(v string) (int, error) {
			n, err := strconv.Atoi(v)
			if err != nil {
				return 0, d.Errf("connection_limit store redis: option '%s': '%s' is not an integer", name, v)
			}
			if n < 0 {
				return 0, d.Errf("connection_limit store redis: option '%s' must not be negative, got %d", name, n)
			}
			return n, nil
		}
		var err error
		switch name {
		case "address", "username", "password", "tls_ca_file", "tls_server_name", "key_prefix":
			if err := want(1); err != nil {
				return err
			}
			switch name {
			case "address":
				s.Address = args[0]
			case "username":
				s.Username = args[0]
			case "password":
				s.Password = args[0]
			case "tls_ca_file":
				s.TLSCAFile = args[0]
			case "tls_server_name":
				s.TLSServerName = args[0]
			case "key_prefix":
				s.KeyPrefix = args[0]
			}
		case "db":
			if err := want(1); err != nil {
				return err
			}
			s.DB, err = atoi(args[0])
		case "tls":
			err = want(0)
			s.TLS = true
		case "cluster":
			err = want(0)
			s.Cluster = true
		case "lease":
			if err := want(1); err != nil {
				return err
			}
			dur, perr := caddy.ParseDuration(args[0])
			if perr != nil {
				return d.Errf("connection_limit store redis: option '%s': %v", name, perr)
			}
			if dur < store.MinLease {
				return d.Errf("connection_limit store redis: option '%s' must be at least %s, got %s", name, store.MinLease, args[0])
			}
			s.LeaseDuration = caddy.Duration(dur)
		case "on_unreachable":
			switch {
			case len(args) == 1 && args[0] == onUnreachableRefuse:
				s.OnUnreachable = onUnreachableRefuse
			case len(args) == 1 && args[0] == onUnreachableLocalShare:
				s.OnUnreachable = onUnreachableLocalShare
			case len(args) == 2 && args[0] == onUnreachableLocalShare:
				s.OnUnreachable = onUnreachableLocalShare
				s.LocalShare, err = atoi(args[1])
			default:
				return d.Errf("connection_limit store redis: option '%s' must be 'local_share [<n>]' or 'refuse'", name)
			}
		default:
			return d.Errf("connection_limit store redis: unknown option '%s'", name)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Interface guards
var (
	_ store.Module          = (*Module)(nil)
	_ caddy.Module          = (*Module)(nil)
	_ caddy.Provisioner     = (*Module)(nil)
	_ caddyfile.Unmarshaler = (*Module)(nil)
)
