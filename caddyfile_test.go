package connlimit

import (
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// caddyfileFor wraps a route body in a Caddyfile with one layer4 server.
func caddyfileFor(admin, listen, route string) string {
	adminLine := "admin off"
	if admin != "" {
		adminLine = "admin " + admin
	}
	return fmt.Sprintf(`{
	%s
	log {
		output discard
	}
	layer4 {
		%s {
			route {
%s
			}
		}
	}
}
`, adminLine, listen, route)
}

// handlersOf returns the handlers of the first route of the adapted
// config's layer4 server.
func handlersOf(t *testing.T, adapted []byte) []json.RawMessage {
	t.Helper()
	var cfg struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []json.RawMessage `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"layer4"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatalf("%v: %s", err, adapted)
	}
	for _, s := range cfg.Apps.Layer4.Servers {
		return s.Routes[0].Handle
	}
	t.Fatalf("no layer4 server in %s", adapted)
	return nil
}

func TestCaddyfileAdaptsToJSON(t *testing.T) {
	for _, tc := range []struct{ name, route, want string }{
		{"inline", `connection_limit 10`,
			`{"handler":"connection_limit","max_connections":10}`},
		{"block", `connection_limit {
					max_connections 5
					max_waiting 100
					wait_timeout 30s
					order lifo
				}`,
			`{"handler":"connection_limit","max_connections":5,"max_waiting":100,"wait_timeout":30000000000,"order":"lifo"}`},
		{"no waiting", `connection_limit 3 {
					max_waiting -1
				}`,
			`{"handler":"connection_limit","max_connections":3,"max_waiting":-1}`},
		{"overflow", `connection_limit 2 {
					wait_timeout 1s
					overflow {
						proxy 127.0.0.1:6000
					}
				}`,
			`{"handler":"connection_limit","max_connections":2,"wait_timeout":1000000000,"overflow":[{"handler":"proxy","upstreams":[{"dial":["127.0.0.1:6000"]}]}]}`},
		{"zones and keys", `connection_limit 1 {
					zone per_ip
					key {l4.conn.remote_ip}
					priority 10
					keep_half_closed
					release close_write
				}`,
			`{"handler":"connection_limit","max_connections":1,"zone":"per_ip","key":"{l4.conn.remote_ip}","priority":10,"keep_half_closed":true,"release":"close_write"}`},
		{"fair share", `connection_limit 20 {
					zone postgres
					fair_share {l4.tls.server_name}
					weight big.example.com 3
					weight "" 2
					weight small.example.com 1
					fair_max 10
				}`,
			`{"handler":"connection_limit","max_connections":20,"zone":"postgres","fair_share":"{l4.tls.server_name}","weights":{"big.example.com":3,"":2,"small.example.com":1},"fair_max":10}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := adaptCaddyfile(t, caddyfileFor("", "127.0.0.1:5000", tc.route))
			if err != nil {
				t.Fatal(err)
			}
			// caddy-l4 re-encodes handlers through a map: keys sorted.
			got := handlersOf(t, out)[0]
			var g, w any
			if err := json.Unmarshal(got, &g); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal([]byte(tc.want), &w); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(g, w) {
				t.Fatalf("adapted to\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ route, want string }{
		{`connection_limit`, "max_connections is required"},
		{`connection_limit {
					max_waiting 3
				}`, "max_connections is required"},
		{`connection_limit 0`, "'max_connections' must be at least 1, got 0"},
		{`connection_limit ten`, "'max_connections': 'ten' is not an integer"},
		{`connection_limit 9007199254740993`, "'max_connections' must be within ±9007199254740992, got 9007199254740993"},
		{`connection_limit 1 {
					priority -9223372036854775808
				}`, "'priority' must be within ±9007199254740992"},
		{`connection_limit 1 2`, "unexpected argument '2'"},
		{`connection_limit 1 {
					max_connections 2
				}`, "duplicate option 'max_connections'"},
		{`connection_limit 1 {
					max_waiting 1
					max_waiting 2
				}`, "duplicate option 'max_waiting'"},
		{`connection_limit 1 {
					max_waiting -2
				}`, "'max_waiting' must be at least -1"},
		{`connection_limit 1 {
					wait_timeout soon
				}`, "'wait_timeout'"},
		{`connection_limit 1 {
					wait_timeout -1s
				}`, "'wait_timeout' must not be negative"},
		{`connection_limit 1 {
					order random
				}`, "'order' must be fifo or lifo, got 'random'"},
		{`connection_limit 1 {
					order
				}`, "'order' needs a value"},
		{`connection_limit 1 {
					release early
				}`, "'release' must be return or close_write, got 'early'"},
		{`connection_limit 1 {
					release
				}`, "'release' needs a value"},
		{`connection_limit 1 {
					frobnicate 1
				}`, "unknown option 'frobnicate'"},
		{`connection_limit 1 {
					overflow
				}`, "'overflow' needs at least one handler"},
		{`connection_limit 1 {
					priority high
				}`, "'priority': 'high' is not an integer"},
		{`connection_limit 1 {
					fair_share
				}`, "'fair_share' needs a value"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					fair_share {l4.tls.server_name}
				}`, "duplicate option 'fair_share'"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					key {l4.conn.remote_ip}
				}`, "options 'fair_share' and 'key' cannot be used together"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight
				}`, "'weight' needs a tenant value and a weight"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight 10.0.0.1
				}`, "'weight' needs a value"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight 10.0.0.1 0
				}`, "'weight' must be at least 1, got 0"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight 10.0.0.1 heavy
				}`, "'weight': 'heavy' is not an integer"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight 10.0.0.1 2 3
				}`, "option 'weight': unexpected argument '3'"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					weight 10.0.0.1 2
					weight 10.0.0.1 3
				}`, "'weight': tenant '10.0.0.1' is given twice"},
		{`connection_limit 1 {
					weight 10.0.0.1 2
				}`, "'weight' needs fair_share"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					fair_max 0
				}`, "'fair_max' must be at least 1, got 0"},
		{`connection_limit 1 {
					fair_share {l4.conn.remote_ip}
					fair_max
				}`, "'fair_max' needs a value"},
		{`connection_limit 1 {
					fair_max 3
				}`, "'fair_max' needs fair_share"},
	} {
		_, err := adaptCaddyfile(t, caddyfileFor("", "127.0.0.1:5000", tc.route))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "Caddyfile:") {
			t.Errorf("%s:\n got error %v\nwant one containing %q and the file:line", tc.route, err, tc.want)
		}
	}
}

// The same limit configured by Caddyfile and by JSON posted to the admin
// API behaves the same: two let through, one waits, the next rejected and
// handed to overflow.
func TestCaddyfileAndJSONBehaveTheSame(t *testing.T) {
	be := newBackend(t, true)
	spill := newBackend(t, false)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	caddyfile := caddyfileFor(admin, listen, fmt.Sprintf(`connection_limit 2 {
					max_waiting 1
					zone same
					overflow {
						proxy %s
					}
				}
				proxy %s`, spill.addr(), be.addr()))
	adapted, err := adaptCaddyfile(t, caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	jsonCfg := l4Config(admin, listen,
		limit(obj{"max_connections": 2, "max_waiting": 1, "zone": "same", "overflow": []obj{proxyTo(spill.addr())}}),
		proxyTo(be.addr()))
	jsonRaw, _ := json.Marshal(jsonCfg)

	loadConfig(t, l4Config(admin, fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))))
	defer stopCaddy(t)
	for round, load := range []struct {
		contentType string
		body        []byte
	}{
		{"application/json", jsonRaw},
		{"text/caddyfile", []byte(caddyfile)},
		{"application/json", adapted},
	} {
		code, body := adminDo(t, http.MethodPost, "http://"+admin+"/load", load.contentType, load.body)
		if code != http.StatusOK {
			t.Fatalf("round %d: load %s: %d %s", round, load.contentType, code, body)
		}
		var cs []*client
		for i := range 3 {
			c := dial(t, listen, fmt.Sprintf("r%dc%d", round, i))
			c.hello("")
			cs = append(cs, c)
			if i == 1 {
				be.waitArrivals(2, 5*time.Second)
			}
		}
		waitCounts(t, "same", 2, 1)
		over := dial(t, listen, fmt.Sprintf("r%dover", round))
		over.hello("")
		over.expectLine("ok "+over.id, 5*time.Second)
		finish(be, cs[0])
		be.waitArrivals(1, 5*time.Second)
		finish(be, cs[1])
		finish(be, cs[2])
		waitCounts(t, "same", 0, 0)
	}
	if _, peak, total, _ := be.stats(); peak != 2 || total != 9 {
		t.Fatalf("backend peak %d total %d, want 2 and 9", peak, total)
	}
	if _, _, total, _ := spill.stats(); total != 3 {
		t.Fatalf("overflow saw %d, want 3", total)
	}
}

// order and release are read by one parser each, whether they come from a
// Caddyfile or from JSON: the same values pass, in any case, and the same
// ones fail, naming the field.
func TestEnumsParseAlikeInCaddyfileAndJSON(t *testing.T) {
	for _, tc := range []struct {
		option, value string
		ok            bool
	}{
		{"order", "fifo", true}, {"order", "FIFO", true}, {"order", "Lifo", true}, {"order", "random", false},
		{"release", "return", true}, {"release", "CLOSE_WRITE", true}, {"release", "early", false},
	} {
		route := fmt.Sprintf("connection_limit 1 {\n\t%s %s\n}", tc.option, tc.value)
		_, cfErr := adaptCaddyfile(t, caddyfileFor("", "127.0.0.1:5000", route))
		h := &Handler{MaxConnections: 1}
		if tc.option == "order" {
			h.Order = tc.value
		} else {
			h.Release = tc.value
		}
		_, jsonErr := h.limits()
		if tc.ok {
			if cfErr != nil || jsonErr != nil {
				t.Errorf("%s %s: Caddyfile error %v, JSON error %v; want both accepted", tc.option, tc.value, cfErr, jsonErr)
			}
			continue
		}
		if cfErr == nil || !strings.Contains(cfErr.Error(), "'"+tc.option+"'") {
			t.Errorf("%s %s: Caddyfile error %v, want one naming '%s'", tc.option, tc.value, cfErr, tc.option)
		}
		if jsonErr == nil || !strings.HasPrefix(jsonErr.Error(), tc.option+" ") {
			t.Errorf("%s %s: JSON error %v, want one naming %s", tc.option, tc.value, jsonErr, tc.option)
		}
	}
}
