package connlimit

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// parseStoreIn parses a connection_limit-like block around a store
// option, as the handler's Caddyfile parser would: the options after
// the store are read too.
func parseStoreIn(t *testing.T, block string) (json.RawMessage, []string, error) {
	t.Helper()
	d := caddyfile.NewTestDispenser("connection_limit 1 {\n" + block + "\n}")
	d.Next()
	d.NextArg()
	var raw json.RawMessage
	var others []string
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if d.Val() != "store" {
			others = append(others, d.Val())
			for d.NextArg() {
			}
			continue
		}
		var err error
		if raw, err = parseStoreCaddyfile(d); err != nil {
			return nil, others, err
		}
	}
	return raw, others, nil
}

func TestStoreCaddyfile(t *testing.T) {
	raw, others, err := parseStoreIn(t, `
	zone db
	store redis {
		address 127.0.0.1:6379
		username u
		password {env.CONNLIMIT_REDIS_PASSWORD}
		db 0
		cluster
		tls
		tls_ca_file /etc/ca.pem
		tls_server_name redis.internal
		key_prefix fleet1
		lease 3s
		on_unreachable local_share 20    # or: on_unreachable refuse
	}
	priority 1`)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(others, " ") != "zone priority" {
		t.Errorf("options around the store: %q", others)
	}
	var got map[string]any
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"backend": "redis", "address": "127.0.0.1:6379", "username": "u",
		"password": "{env.CONNLIMIT_REDIS_PASSWORD}", "cluster": true, "tls": true,
		"tls_ca_file": "/etc/ca.pem", "tls_server_name": "redis.internal",
		"key_prefix": "fleet1", "lease": float64(3 * time.Second),
		"on_unreachable": "local_share", "local_share": 20.0,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %s\nwant %v", raw, want)
	}

	for block, want := range map[string]string{
		"store redis {\n address a:1\n on_unreachable refuse\n}":      `{"address":"a:1","backend":"redis","on_unreachable":"refuse"}`,
		"store redis {\n address a:1\n on_unreachable local_share\n}": `{"address":"a:1","backend":"redis","on_unreachable":"local_share"}`,
		"store redis": `{"backend":"redis"}`,
	} {
		raw, _, err := parseStoreIn(t, block)
		if err != nil || string(raw) != want {
			t.Errorf("%q: got %s, %v; want %s", block, raw, err, want)
		}
	}
}

func TestStoreCaddyfileErrors(t *testing.T) {
	for block, want := range map[string]string{
		"store":                      "needs a backend",
		"store etcd {\n}":            "layer4.connection_limit.stores.etcd",
		"store redis extra {\n}":     "unexpected argument 'extra'",
		"store redis {\n bogus 1\n}": "unknown option 'bogus'",
		"store redis {\n address a:1\n address b:1\n}":     "duplicate option 'address'",
		"store redis {\n address\n}":                       "'address' needs one value",
		"store redis {\n address a:1 b:1\n}":               "'address' needs one value",
		"store redis {\n db x\n}":                          "'db': 'x' is not an integer",
		"store redis {\n db -1\n}":                         "'db' must not be negative",
		"store redis {\n cluster 1\n}":                     "'cluster' takes no value",
		"store redis {\n tls yes\n}":                       "'tls' takes no value",
		"store redis {\n lease soon\n}":                    "option 'lease'",
		"store redis {\n lease 500ms\n}":                   "'lease' must be at least 1s",
		"store redis {\n on_unreachable\n}":                "'local_share [<n>]' or 'refuse'",
		"store redis {\n on_unreachable panic\n}":          "'local_share [<n>]' or 'refuse'",
		"store redis {\n on_unreachable refuse 3\n}":       "'local_share [<n>]' or 'refuse'",
		"store redis {\n on_unreachable local_share -2\n}": "'on_unreachable' must not be negative",
	} {
		_, _, err := parseStoreIn(t, block)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error with %q", block, err, want)
		}
	}
}
