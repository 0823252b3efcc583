package redisstore

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/l4-connlimit/connlimit/store"
)

// provisioned makes a Module from JSON and provisions it.
func provisioned(t *testing.T, js string) (*Module, error) {
	t.Helper()
	s := new(Module)
	if err := json.Unmarshal([]byte(js), s); err != nil {
		t.Fatal(err)
	}
	return s, s.Provision(caddy.Context{})
}

func TestStoreProvision(t *testing.T) {
	t.Setenv("CONNLIMIT_TEST_REDIS_ADDRESS", "127.0.0.1:6390")
	t.Setenv("CONNLIMIT_TEST_REDIS_PASSWORD", "hunter2{x}")
	s, err := provisioned(t, `{"address": "{env.CONNLIMIT_TEST_REDIS_ADDRESS}",
		"password": "{env.CONNLIMIT_TEST_REDIS_PASSWORD}"}`)
	if err != nil {
		t.Fatal(err)
	}
	if s.address != "127.0.0.1:6390" || s.password != "hunter2{x}" {
		t.Errorf("placeholders: address %q password %q", s.address, s.password)
	}
	// the defaults
	if s.Lease() != 5*time.Second || s.KeyPrefix != "connlimit" || s.Unreachable() != (store.UnreachablePolicy{}) {
		t.Errorf("defaults: lease %s prefix %q policy %+v", s.Lease(), s.KeyPrefix, s.Unreachable())
	}
	// the resolved password is in no JSON of the module
	out, _ := json.Marshal(s)
	if strings.Contains(string(out), "hunter2") {
		t.Errorf("the password shows in %s", out)
	}
	// a literal password with braces stays as it is
	s, err = provisioned(t, `{"address": "r:1", "password": "{not-a-placeholder}"}`)
	if err != nil || s.password != "{not-a-placeholder}" {
		t.Errorf("literal password: %q, %v", s.password, err)
	}
	s, err = provisioned(t, `{"address": "r:1", "on_unreachable": "refuse", "lease": "2s"}`)
	if err != nil || !s.Unreachable().Refuse || s.Lease() != 2*time.Second {
		t.Errorf("refuse: %+v %s, %v", s.Unreachable(), s.Lease(), err)
	}

	for js, field := range map[string]string{
		`{}`: "address is required",
		`{"address": "{env.CONNLIMIT_TEST_UNSET}"}`:                        "address",
		`{"address": "localhost"}`:                                         "address must be host:port",
		`{"address": "localhost:0"}`:                                       "address must be host:port",
		`{"address": "r:1", "password": "{env.CONNLIMIT_TEST_UNSET}"}`:     "password",
		`{"address": "r:1", "username": "u"}`:                              "username needs a password",
		`{"address": "r:1", "db": 1, "cluster": true}`:                     "db must be 0 with cluster",
		`{"address": "r:1", "db": -1}`:                                     "db must not be negative",
		`{"address": "r:1", "tls_ca_file": "/x"}`:                          "tls_ca_file and tls_server_name need tls",
		`{"address": "r:1", "tls": true, "tls_ca_file": "/nonexistent"}`:   "tls_ca_file",
		`{"address": "r:1", "key_prefix": "a{b}"}`:                         "key_prefix",
		`{"address": "r:1", "lease": "999ms"}`:                             "lease must be at least 1s",
		`{"address": "r:1", "on_unreachable": "panic"}`:                    "on_unreachable must be local_share or refuse",
		`{"address": "r:1", "on_unreachable": "refuse", "local_share": 2}`: "local_share is for on_unreachable local_share",
		`{"address": "r:1", "local_share": -1}`:                            "local_share must not be negative",
	} {
		_, err := provisioned(t, js)
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: got %v, want an error naming %q", js, err, field)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: the password shows in %v", js, err)
		}
	}
}

func TestStoreUnreachablePolicy(t *testing.T) {
	for _, tc := range []struct {
		p                  store.UnreachablePolicy
		max, nodes, admits int
	}{
		{store.UnreachablePolicy{Refuse: true}, 100, 5, 0},
		{store.UnreachablePolicy{Share: 20}, 100, 5, 20},
		{store.UnreachablePolicy{}, 100, 5, 20},
		{store.UnreachablePolicy{}, 100, 3, 33},
		{store.UnreachablePolicy{}, 2, 5, 1},
		{store.UnreachablePolicy{}, 100, 0, 1},
	} {
		if got := tc.p.Admits(tc.max, tc.nodes); got != tc.admits {
			t.Errorf("%+v max %d nodes %d: admits %d, want %d", tc.p, tc.max, tc.nodes, got, tc.admits)
		}
	}
}

func TestStoreDiffers(t *testing.T) {
	base := `"address": "r:1", "password": "p"`
	a, _ := provisioned(t, `{`+base+`}`)
	for js, field := range map[string]string{
		`{` + base + `}`:                             "",
		`{` + base + `, "lease": "5s"}`:              "",
		`{"address": "r:2", "password": "p"}`:        "address",
		`{"address": "r:1", "password": "q"}`:        "password",
		`{` + base + `, "db": 1}`:                    "db",
		`{` + base + `, "key_prefix": "x"}`:          "key_prefix",
		`{` + base + `, "lease": "2s"}`:              "lease",
		`{` + base + `, "on_unreachable": "refuse"}`: "on_unreachable",
		`{` + base + `, "local_share": 3}`:           "local_share",
		`{` + base + `, "tls": true}`:                "tls",
		`{` + base + `, "cluster": true}`:            "cluster",
	} {
		b, err := provisioned(t, js)
		if err != nil {
			t.Fatal(err)
		}
		if got := a.Differs(b); got != field {
			t.Errorf("%s: differs in %q, want %q", js, got, field)
		}
	}
}

func TestStoreModuleRegistered(t *testing.T) {
	m, err := caddy.GetModule("layer4.connection_limit.stores.redis")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.New().(store.Module); !ok {
		t.Fatalf("%T is not a store.Module", m.New())
	}
}

// The module opens a working store: TLS with tls_ca_file, and a password
// from the environment. Provisioning and Open do not need Redis up.
func TestStoreOpensRedis(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{TLS: true, Password: "s3cret"})
	t.Setenv("CONNLIMIT_TEST_REDIS_PASSWORD", "s3cret")
	s, err := provisioned(t, `{"address": "`+r.Addr()+`", "password": "{env.CONNLIMIT_TEST_REDIS_PASSWORD}",
		"tls": true, "tls_ca_file": "`+r.CAFile+`", "tls_server_name": "localhost", "lease": "1s"}`)
	if err != nil {
		t.Fatal(err)
	}
	f, err := s.Open("db", "n1")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Lease() != time.Second || f.NodeID() != "n1" {
		t.Errorf("opened: lease %s node %q", f.Lease(), f.NodeID())
	}
	mustRegister(t, f, store.NodeState{Limits: fifo(1, 0)})
	take(t, f, store.Ticket{ID: 1}, store.Admitted)
	give(t, f, "")

	r.Kill()
	down, err := provisioned(t, `{"address": "`+r.Addr()+`"}`)
	if err != nil {
		t.Fatalf("provision with Redis down: %v", err)
	}
	g, err := down.Open("db", "")
	if err != nil {
		t.Fatalf("open with Redis down: %v", err)
	}
	defer g.Close()
	if _, err := new(Module).Open("db", ""); err == nil {
		t.Error("open before provision: no error")
	}
}
