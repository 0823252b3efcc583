package connlimit

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// `caddy connection-limit --watch` from a real caddy binary in a real
// terminal: tmux, on a server of the test's own, against the in-process
// Caddy.

const (
	paneWidth, paneHeight = 110, 24
	watchEvery            = 300 * time.Millisecond
)

// tmuxServer is a tmux server of the test's own (its own socket), with
// panes that stay after their command exits, and no status line.
type tmuxServer struct {
	t    *testing.T
	bin  string
	sock string
	conf string
}

func newTmux(t *testing.T, bin, dir string) *tmuxServer {
	t.Helper()
	s := &tmuxServer{t: t, bin: bin, sock: filepath.Join(dir, "tmux.sock"), conf: filepath.Join(dir, "tmux.conf")}
	if err := os.WriteFile(s.conf, []byte("set -g remain-on-exit on\nset -g status off\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = s.try("kill-server") })
	return s
}

func (s *tmuxServer) try(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, append([]string{"-S", s.sock, "-f", s.conf}, args...)...)
	if os.Getenv("TERM") == "" {
		cmd.Env = append(os.Environ(), "TERM=xterm")
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *tmuxServer) run(args ...string) string {
	s.t.Helper()
	out, err := s.try(args...)
	if err != nil {
		s.t.Fatalf("tmux %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// capture is what the pane shows (with -S -, its history too).
func (s *tmuxServer) capture(history bool) string {
	s.t.Helper()
	args := []string{"capture-pane", "-p", "-t", "watch"}
	if history {
		args = append(args, "-S", "-", "-E", "-")
	}
	return s.run(args...)
}

// waitPane polls the pane until cond holds of it, for at most 10 s.
func (s *tmuxServer) waitPane(what string, cond func(pane string) bool) string {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		pane := s.capture(false)
		if cond(pane) {
			return pane
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("the pane never showed %s; it shows:\n%s", what, pane)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// drawnViews splits what the command wrote to the terminal into the views
// it drew, as text.
func drawnViews(raw []byte) []string {
	parts := strings.Split(string(raw), "\x1b[H")
	views := make([]string, 0, len(parts))
	for _, p := range parts[1:] {
		views = append(views, strings.NewReplacer("\x1b[K", "", "\x1b[J", "", "\r", "").Replace(p))
	}
	return views
}

var columnHeader = regexp.MustCompile(`ZONE +ACTIVE +WAITING +OLDEST WAIT`)

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func TestCommandWatchInTmux(t *testing.T) {
	tmuxBin, err := exec.LookPath("tmux")
	if err != nil {
		t.Skip("tmux is not installed, so --watch is not tested in a terminal (apt-get install tmux; .ci/run installs it)")
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatalf("bash: %v", err)
	}
	dir := t.TempDir()
	caddyBin := caddyBinary(t)

	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	zone := fmt.Sprintf("watch%d", time.Now().UnixNano())
	loadConfig(t, l4Config(admin, listen, limit(obj{"zone": zone, "max_connections": 1}), proxyTo(be.addr())))
	defer stopCaddy(t)
	h1 := takeSlot(t, be, listen, "h1")

	// bash runs the command and writes down how it exited; tmux keeps the
	// pane when it has (remain-on-exit), to be looked at. It starts once
	// Enter is pressed, so that everything it writes to the terminal is
	// recorded (pipe-pane) from its first byte.
	exitFile, rawFile := filepath.Join(dir, "exit"), filepath.Join(dir, "raw")
	script := fmt.Sprintf(`read -r _; "$0" "$@"; echo "exit status $?" > %s`, shellQuote(exitFile))
	tm := newTmux(t, tmuxBin, dir)
	tm.run("new-session", "-d", "-s", "watch", "-x", fmt.Sprint(paneWidth), "-y", fmt.Sprint(paneHeight),
		bash, "-c", script, caddyBin, "connection-limit", "--watch", watchEvery.String(), "--address", admin)
	tm.run("pipe-pane", "-t", "watch", "-o", "cat >> "+shellQuote(rawFile))
	tm.run("send-keys", "-t", "watch", "Enter")

	row := func(pane string) map[string]string {
		r, _ := rowByColumn(pane, zone)
		return r
	}
	tm.waitPane(fmt.Sprintf("zone %s with 1/1 active, nobody waiting, at 0.0 admitted/s", zone), func(pane string) bool {
		r := row(pane)
		return r != nil && r["ACTIVE"] == "1/1" && r["WAITING"] == "0" && r["OLDEST WAIT"] == "-" && r["ADMITTED/S"] == "0.0"
	})

	// A waiter arrives: the figures change in place.
	w1 := dial(t, listen, "w1")
	w1.hello("")
	waitCounts(t, zone, 1, 1)
	tm.waitPane("one waiter", func(pane string) bool {
		r := row(pane)
		return r != nil && r["WAITING"] == "1" && r["OLDEST WAIT"] != "-"
	})

	// The holder leaves, the waiter is admitted: admitted/s shows it for
	// the one interval it happened in (looked for in every view drawn, as
	// one view may be on the screen for too short a time to catch).
	finish(be, h1)
	if id := be.waitArrivals(1, 5*time.Second)[0]; id != "w1" {
		t.Fatalf("%s admitted, want w1", id)
	}
	deadline := time.Now().Add(10 * time.Second)
	for seen := false; !seen; {
		raw, _ := os.ReadFile(rawFile)
		for _, v := range drawnViews(raw) {
			r := row(v)
			seen = seen || (r != nil && r["WAITING"] == "0" && r["ADMITTED/S"] != "0.0" && r["ADMITTED/S"] != "-")
		}
		if !seen && time.Now().After(deadline) {
			t.Fatalf("no view showed the waiter admitted at more than 0 admitted/s; the pane shows:\n%s", tm.capture(false))
		}
		time.Sleep(50 * time.Millisecond)
	}
	tm.waitPane("admitted/s back at 0.0", func(pane string) bool {
		r := row(pane)
		return r != nil && r["ADMITTED/S"] == "0.0"
	})

	// After all those redraws, one view on the screen and nothing in the
	// history: it redraws in place, nothing scrolled.
	time.Sleep(3 * watchEvery)
	for _, history := range []bool{false, true} {
		pane := tm.capture(history)
		lines := strings.Split(strings.TrimRight(pane, "\n"), "\n")
		if n := strings.Count(pane, "caddy connection-limit: "+admin+", every "+watchEvery.String()); n != 1 {
			t.Errorf("title %d times (history %v):\n%s", n, history, pane)
		}
		if n := len(columnHeader.FindAllString(pane, -1)); n != 1 {
			t.Errorf("column header %d times (history %v):\n%s", n, history, pane)
		}
		if n := strings.Count(pane, "\n"+zone+" "); n != 1 {
			t.Errorf("zone line %d times (history %v):\n%s", n, history, pane)
		}
		if len(lines) > paneHeight {
			t.Errorf("%d lines in a pane of %d (history %v):\n%s", len(lines), paneHeight, history, pane)
		}
	}

	// Ctrl-C: it exits 0 and gives the terminal back as it was: the main
	// screen, with nothing of the view left on it, and the cursor shown.
	tm.run("send-keys", "-t", "watch", "C-c")
	deadline = time.Now().Add(10 * time.Second)
	var status []byte
	for {
		if status, err = os.ReadFile(exitFile); err == nil && len(status) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still running 10 s after Ctrl-C; the pane shows:\n%s", tm.capture(false))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := strings.TrimSpace(string(status)); got != "exit status 0" {
		t.Errorf("after Ctrl-C: %s, want exit status 0", got)
	}
	tm.waitPane("the command gone", func(string) bool {
		return strings.TrimSpace(tm.run("display-message", "-p", "-t", "watch", "#{pane_dead}")) == "1"
	})
	if got := strings.TrimSpace(tm.run("display-message", "-p", "-t", "watch", "#{alternate_on}")); got != "0" {
		t.Errorf("after Ctrl-C: alternate_on %s, want 0 (the main screen)", got)
	}
	// What it wrote: the alternate screen and a hidden cursor first, each
	// view from the top left corner and never a line more than the pane
	// has (no line feed could scroll), the cursor shown and the main
	// screen back last.
	raw, err := os.ReadFile(rawFile)
	if err != nil {
		t.Fatal(err)
	}
	const enter, leave = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
	before, _, _ := strings.Cut(string(raw), "\x1b[H")
	views := drawnViews(raw)
	if !strings.HasSuffix(before, enter) || !strings.HasSuffix(string(raw), leave) || len(views) < 5 {
		t.Errorf("raw output does not take the alternate screen, draw %d views and give it back: %q", len(views), raw)
	}
	for _, v := range views {
		if n := strings.Count(v, "\n"); n > paneHeight-1 {
			t.Errorf("a view with %d line feeds in a pane of %d lines: %q", n, paneHeight, v)
		}
	}
	pane := tm.capture(true)
	for _, bad := range []string{"panic", "goroutine ", "Error", "ZONE", zone, "\x1b"} {
		if strings.Contains(pane, bad) {
			t.Errorf("after Ctrl-C the pane shows %q:\n%s", bad, pane)
		}
	}

	finish(be, w1)
	waitCounts(t, zone, 0, 0)
}
