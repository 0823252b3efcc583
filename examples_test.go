package connlimit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/standard"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// Every config under examples/ loads as written (with the admin endpoint
// moved to a free port) and serves a client through its limit.
func TestExamplesRun(t *testing.T) {
	for _, tc := range []struct{ file, addr, want string }{
		{"Caddyfile", "127.0.0.1:5433", "hello from the backend"},
		{"overflow.json", "127.0.0.1:5434", "hello from the backend"},
		{"per-ip.Caddyfile", "127.0.0.1:5435", "hello from the backend"},
		{"fair.Caddyfile", "127.0.0.1:5436", "hello from the backend"},
		{"http-listener-wrapper.Caddyfile", "127.0.0.1:8080", "hello from Caddy's HTTP server"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("examples", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(tc.file, ".json") {
				if raw, err = adaptCaddyfile(t, string(raw)); err != nil {
					t.Fatal(err)
				}
			}
			var cfg map[string]any
			if err := json.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
			cfg["admin"] = obj{"listen": admin}
			cfg["logging"] = testLogging()
			loadConfig(t, cfg)
			defer stopCaddy(t)

			for i := range 3 { // more clients than some limits: all served
				got := httpOverTCP(t, tc.addr)
				if !strings.Contains(got, tc.want) {
					t.Fatalf("request %d: answer %q, want %q", i, got, tc.want)
				}
			}
			code, body := adminDo(t, http.MethodGet, "http://"+admin+"/connection_limit/", "", nil)
			if code != http.StatusOK || !strings.Contains(string(body), `"admitted":`) {
				t.Fatalf("admin: %d %s", code, body)
			}
		})
	}
}

// httpOverTCP sends one HTTP/1.0 request over a raw TCP connection (as a
// database client would send its first message) and returns the body.
func httpOverTCP(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%s: %v", addr, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// xcaddy.json, the build manifest, names the versions go.mod pins. It is
// read as .ci/run and the README read it, through .ci/xcaddy-args.go.
func TestXcaddyManifestMatchesGoMod(t *testing.T) {
	out, err := exec.Command("go", "run", ".ci/xcaddy-args.go").Output()
	if err != nil {
		t.Fatalf("go run .ci/xcaddy-args.go: %v", err)
	}
	args := strings.Fields(string(out)) // <caddy version> --with <module>@<version>[=<replace>] ...
	gomod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	required := map[string]string{}
	for _, line := range strings.Split(string(gomod), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "require "))
		if len(f) >= 2 && strings.Contains(f[0], ".") {
			required[f[0]] = f[1]
		}
	}
	if len(args) == 0 || args[0] != required["github.com/caddyserver/caddy/v2"] {
		t.Fatalf("xcaddy.json gives %q, go.mod requires caddy %s", out, required["github.com/caddyserver/caddy/v2"])
	}
	found := map[string]bool{}
	for i := 1; i < len(args); i += 2 {
		if args[i] != "--with" || i+1 == len(args) {
			t.Fatalf("xcaddy-args printed %q", out)
		}
		mod, rest, _ := strings.Cut(args[i+1], "@")
		version, replace, _ := strings.Cut(rest, "=")
		found[mod] = true
		switch {
		case mod == "github.com/l4-connlimit/connlimit":
			if replace != "." {
				t.Errorf("xcaddy.json must build this module from the checkout (replace \".\"), got %q", replace)
			}
		case required[mod] != version:
			t.Errorf("xcaddy.json %s %s, go.mod requires %q", mod, version, required[mod])
		}
	}
	if !found["github.com/mholt/caddy-l4"] || !found["github.com/l4-connlimit/connlimit"] {
		t.Errorf("xcaddy.json must list caddy-l4 and this module: %s", out)
	}
}

// The fleet example's nodes adapt, and give their zone the same store.
func TestFleetExampleAdapts(t *testing.T) {
	var stores []string
	for _, f := range []string{"node-a.Caddyfile", "node-b.Caddyfile"} {
		raw, err := os.ReadFile(filepath.Join("examples", "fleet", f))
		if err != nil {
			t.Fatal(err)
		}
		out, err := adaptCaddyfile(t, string(raw))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var h struct {
			Handler string          `json:"handler"`
			Zone    string          `json:"zone"`
			Store   json.RawMessage `json:"store"`
		}
		first := handlersOf(t, out)[0]
		if err := json.Unmarshal(first, &h); err != nil {
			t.Fatal(err)
		}
		if h.Handler != "connection_limit" || h.Zone != "db" || !strings.Contains(string(h.Store), `"backend":"redis"`) {
			t.Fatalf("%s: handler %s", f, first)
		}
		stores = append(stores, string(h.Store))
	}
	if len(stores) != 2 || stores[0] != stores[1] {
		t.Fatalf("the nodes give different stores: %v", stores)
	}
}
