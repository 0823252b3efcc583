package connlimit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// This file is the `caddy connection-limit` subcommand: a client of the
// admin API in admin.go, in the running Caddy. It decodes that API's JSON
// into its own types, so it depends only on the API, never on the types
// the server side uses to write it.

func init() {
	caddycmd.RegisterCommand(commandSpec)
}

const (
	// sampleWindow is how far apart the one-shot view takes its two
	// samples: admitted/s and rejected/s are counted over it.
	sampleWindow = time.Second
	// defaultWatch is the --watch interval when none is given.
	defaultWatch = time.Second
	// minWatch is the shortest --watch interval accepted.
	minWatch = 100 * time.Millisecond
	// requestTimeout bounds each admin API request.
	requestTimeout = 5 * time.Second
)

var commandSpec = caddycmd.Command{
	Name:  "connection-limit",
	Usage: "[status [<zone>] | pause <zone> | resume <zone>] [--watch[=<interval>]] [--json] [--address <interface>] [--config <path> [--adapter <name>]]",
	Short: "Shows the connection_limit zones of the running Caddy; pauses and resumes them",
	Long: `
Asks the running Caddy's admin API (/connection_limit/) how its
connection_limit zones are doing.

  caddy connection-limit [status]      one line per zone
  caddy connection-limit status <zone> the zone, its settings and its
                                       longest waiters (with fair_share,
                                       its tenants too)
  caddy connection-limit pause <zone>  admit nobody new to the zone: new
                                       and waiting connections wait
  caddy connection-limit resume <zone> admit again, at once

A zone's line shows active/max_connections, waiting (/max_waiting when the
list is bounded), how long the oldest waiter has waited, admitted/s and
rejected/s, rejections since Caddy started (in total, then by reason), waiters
whose client left (abandoned), and whether the zone is paused. In a zone
with a key the limits apply to each key value, so the counts, which are
the zone's, can be above them (marked *). Handlers without a zone are shown
as "(no zone)"; they cannot be named in status, pause or resume.

Rates need two samples: the one-shot view takes them one second apart (so
it takes a second), and --watch counts them over each interval (its first
screen shows "-" until there is a second sample).

--watch[=<interval>] redraws the view every interval (default 1s; --watch 2s
works too) in place, like top, until Ctrl-C, which exits with status 0.
When standard output is not a terminal, each view is printed after the
previous one instead.

--json prints the admin API's JSON as it came (with --watch, one document
per line per interval).

The admin address is found as 'caddy stop' and 'caddy reload' find it:
--address if given; else the admin "listen" of the config file given with
--config (adapted with --adapter); else the default, localhost:2019 or the
CADDY_ADMIN environment variable.
`,
	CobraFunc: func(cmd *cobra.Command) {
		pf := cmd.PersistentFlags()
		pf.StringP("address", "", "", "The address of Caddy's admin API, if not the default")
		pf.StringP("config", "c", "", "Configuration file to find the admin address in, if --address is not used")
		pf.StringP("adapter", "a", "", "Name of config adapter to apply (when --config is used)")
		pf.BoolP("json", "", false, "Print the admin API's JSON")
		statusFlags := func(c *cobra.Command) {
			c.Flags().VarPF(&watchFlag{}, "watch", "w", "Redraw every interval (default 1s) until Ctrl-C").NoOptDefVal = defaultWatch.String()
			c.Flags().IntP("waiters", "", 10, "How many of a zone's longest waiters to show")
		}
		statusFlags(cmd)
		cmd.Args = cobra.MaximumNArgs(2) // [<zone>] [<interval>] (see zoneAndInterval)
		cmd.RunE = func(c *cobra.Command, args []string) error { return runStatus(c, args) }

		status := &cobra.Command{
			Use:   "status [<zone>] [--watch[=<interval>]] [--json] [--waiters <n>]",
			Short: "Shows every zone, or one zone and its longest waiters",
			Args:  cobra.MaximumNArgs(2),
			RunE:  func(c *cobra.Command, args []string) error { return runStatus(c, args) },
		}
		statusFlags(status)
		cmd.AddCommand(status)

		for _, action := range []string{"pause", "resume"} {
			short := "Admits nobody new to a zone: new and waiting connections wait"
			if action == "resume" {
				short = "Admits again to a paused zone"
			}
			cmd.AddCommand(&cobra.Command{
				Use:   action + " <zone>",
				Short: short,
				Args:  cobra.ExactArgs(1),
				RunE:  func(c *cobra.Command, args []string) error { return runPause(c, action, args[0]) },
			})
		}
	},
}

// watchFlag is --watch's value: off, or on with an interval.
type watchFlag struct {
	on       bool
	interval time.Duration
}

func (w *watchFlag) String() string {
	if !w.on {
		return ""
	}
	return w.interval.String()
}

func (w *watchFlag) Set(s string) error {
	d, err := caddy.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("interval %q: %v", s, err)
	}
	if d < minWatch {
		return fmt.Errorf("interval %s: at least %s", d, minWatch)
	}
	w.on, w.interval = true, d
	return nil
}

func (w *watchFlag) Type() string { return "interval" }

// zoneAndInterval splits status's arguments into the zone and, with a bare
// --watch, an interval written as a word of its own ("--watch 2s"): an
// argument that reads as a duration is the interval.
func zoneAndInterval(args []string, w *watchFlag) (string, error) {
	var zone string
	for _, a := range args {
		if w.on {
			if d, err := time.ParseDuration(a); err == nil {
				if err := w.Set(d.String()); err != nil {
					return "", err
				}
				continue
			}
		}
		if zone != "" {
			return "", fmt.Errorf("one zone at a time: %q and %q", zone, a)
		}
		zone = a
	}
	return zone, nil
}

// contextOf is the command's context (cobra gives one when executed).
func contextOf(cmd *cobra.Command) context.Context {
	if ctx := cmd.Context(); ctx != nil {
		return ctx
	}
	return context.Background()
}

func clientFor(cmd *cobra.Command) (*adminClient, error) {
	fl := caddycmd.Flags{FlagSet: cmd.Flags()}
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
	if err != nil {
		return nil, fmt.Errorf("couldn't determine admin API address: %v", err)
	}
	return newAdminClient(addr)
}

func runStatus(cmd *cobra.Command, args []string) error {
	w := cmd.Flags().Lookup("watch").Value.(*watchFlag)
	zone, err := zoneAndInterval(args, w)
	if err != nil {
		return err
	}
	jsonOut, _ := cmd.Flags().GetBool("json")
	maxWaiters, _ := cmd.Flags().GetInt("waiters")
	c, err := clientFor(cmd)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	v := &view{client: c, zone: zone, maxWaiters: maxWaiters}

	if !w.on {
		ctx := contextOf(cmd)
		first, err := v.fetch(ctx)
		if err != nil {
			return err
		}
		if jsonOut {
			_, err := out.Write(first.raw)
			return err
		}
		select {
		case <-time.After(sampleWindow):
		case <-ctx.Done():
			return ctx.Err()
		}
		second, err := v.fetch(ctx)
		if err != nil {
			return err
		}
		_, err = io.WriteString(out, strings.Join(v.render(first, second), "\n")+"\n")
		return err
	}

	// --watch: until Ctrl-C (or SIGTERM), which ends it cleanly.
	ctx, stop := signal.NotifyContext(contextOf(cmd), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return v.watch(ctx, out, w.interval, jsonOut)
}

func runPause(cmd *cobra.Command, action, zone string) error {
	c, err := clientFor(cmd)
	if err != nil {
		return err
	}
	raw, err := c.zoneRequest(contextOf(cmd), http.MethodPost, zone, action)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if jsonOut, _ := cmd.Flags().GetBool("json"); jsonOut {
		_, err := out.Write(raw)
		return err
	}
	var z zoneInfo
	if err := json.Unmarshal(raw, &z); err != nil {
		return fmt.Errorf("reading the answer of %s: %v", c.addr, err)
	}
	msg := fmt.Sprintf("zone %s %sd: %s active, %s waiting", z.Zone, action, z.activeCell(), z.waitingCell())
	if z.Paused {
		msg += fmt.Sprintf("; nobody new is admitted until 'caddy connection-limit resume %s'", z.Zone)
	}
	_, err = fmt.Fprintln(out, msg)
	return err
}

// The admin API's JSON (admin.go), as this command reads it.
type (
	zoneInfo   = zoneDetailJSON
	waiterInfo = waiterJSON
)

// sample is one answer of the admin API and when it came.
type sample struct {
	at    time.Time
	raw   []byte
	zones []zoneInfo
}

// view fetches and draws the zone list, or one zone.
type view struct {
	client     *adminClient
	zone       string // "": every zone
	maxWaiters int
}

func (v *view) fetch(ctx context.Context) (*sample, error) {
	if v.zone == "" {
		raw, err := v.client.get(ctx, adminPathPrefix)
		if err != nil {
			if isStatus(err, http.StatusNotFound) {
				return nil, v.client.noAPIError()
			}
			return nil, err
		}
		var list struct {
			Zones []zoneInfo `json:"zones"`
		}
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, fmt.Errorf("reading the zone list from %s: %v", v.client.addr, err)
		}
		return &sample{at: time.Now(), raw: raw, zones: list.Zones}, nil
	}
	raw, err := v.client.zoneRequest(ctx, http.MethodGet, v.zone, "")
	if err != nil {
		return nil, err
	}
	var z zoneInfo
	if err := json.Unmarshal(raw, &z); err != nil {
		return nil, fmt.Errorf("reading zone %q from %s: %v", v.zone, v.client.addr, err)
	}
	return &sample{at: time.Now(), raw: raw, zones: []zoneInfo{z}}, nil
}

// watch redraws the view every interval until ctx ends. On a terminal it
// draws on the alternate screen, from its top left corner, so nothing
// scrolls and the shell's screen comes back as it was.
func (v *view) watch(ctx context.Context, out io.Writer, interval time.Duration, jsonOut bool) error {
	cur, err := v.fetch(ctx)
	if err != nil {
		return err // not even once: say so and stop, before taking the screen
	}
	var prev *sample
	fd, tty := terminalOf(out)
	if jsonOut {
		tty = false
	}
	if tty {
		// Alternate screen, cursor hidden; both given back on the way out.
		if _, err := io.WriteString(out, "\x1b[?1049h\x1b[?25l"); err != nil {
			return err
		}
		defer io.WriteString(out, "\x1b[?25h\x1b[?1049l")
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var fetchErr error
	for frame := 0; ; frame++ {
		switch {
		case jsonOut:
			if fetchErr == nil {
				if _, err := out.Write(append(bytes.TrimRight(cur.raw, "\n"), '\n')); err != nil {
					return err
				}
			}
		default:
			title := fmt.Sprintf("caddy connection-limit: %s, every %s, %s (Ctrl-C to quit)",
				v.client.addr, interval, time.Now().Format("15:04:05"))
			lines := append([]string{title, ""}, v.render(prev, cur)...)
			if fetchErr != nil {
				lines = append(lines, "", fmt.Sprintf("%s: %v (figures above are from %s; trying again every %s)",
					time.Now().Format("15:04:05"), fetchErr, cur.at.Format("15:04:05"), interval))
			}
			if tty {
				err = drawScreen(out, fd, lines)
			} else {
				if frame > 0 {
					lines = append([]string{""}, lines...)
				}
				_, err = io.WriteString(out, strings.Join(lines, "\n")+"\n")
			}
			if err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		next, err := v.fetch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if fetchErr = err; err == nil {
			prev, cur = cur, next
		}
	}
}

// drawScreen draws lines from the top left corner of the terminal fd,
// clearing what was there, cut to the terminal's size so that nothing
// wraps or scrolls.
func drawScreen(out io.Writer, fd int, lines []string) error {
	width, height, err := term.GetSize(fd)
	if err != nil || width <= 0 || height <= 0 {
		width, height = 80, 24
	}
	if len(lines) > height {
		more := len(lines) - height + 1
		lines = append(lines[:height-1:height-1], fmt.Sprintf("... %d more lines: make the terminal taller", more))
	}
	var b strings.Builder
	b.WriteString("\x1b[H")
	for i, l := range lines {
		if r := []rune(l); len(r) >= width {
			l = string(r[:width-1]) // the last column would wrap on some terminals
		}
		b.WriteString(l)
		b.WriteString("\x1b[K") // clear the rest of the line
		if i < len(lines)-1 {
			b.WriteString("\r\n") // never after the last line: that could scroll
		}
	}
	b.WriteString("\x1b[J") // clear below
	_, err = io.WriteString(out, b.String())
	return err
}

func terminalOf(w io.Writer) (int, bool) {
	f, ok := w.(*os.File)
	if !ok {
		return 0, false
	}
	fd := int(f.Fd())
	return fd, term.IsTerminal(fd)
}

// render draws cur, with rates since prev (nil: no rates yet).
func (v *view) render(prev, cur *sample) []string {
	if v.zone != "" {
		return renderZone(prev, cur, v.maxWaiters)
	}
	if len(cur.zones) == 0 {
		return []string{fmt.Sprintf("no connection_limit handlers in the Caddy at %s", v.client.addr)}
	}
	return zoneTable(prev, cur, cur.zones)
}

var tableHeader = []string{"ZONE", "ACTIVE", "WAITING", "OLDEST WAIT", "ADMITTED/S", "REJECTED/S", "REJECTED", "ABANDONED", "PAUSED"}

// zoneTable is the header and one line per zone of cur (plus a line for a
// zone's fleet totals, if it has them).
func zoneTable(prev, cur *sample, zones []zoneInfo) []string {
	before := map[string]*zoneInfo{}
	if prev != nil {
		for k, z := range keyed(prev.zones) {
			before[k] = z
		}
	}
	var dt float64
	if prev != nil {
		dt = cur.at.Sub(prev.at).Seconds()
	}
	rows := [][]string{tableHeader}
	var fleet []string // per row; "" for none
	perKey := false    // a zone holds more than its limit: it has a key
	fleet = append(fleet, "")
	for i := range zones {
		z := &zones[i]
		admitted, rejected := "-", "-"
		if p := before[keyOf(zones, i)]; p != nil && dt > 0 && z.Admitted >= p.Admitted && z.Rejected >= p.Rejected {
			admitted = fmt.Sprintf("%.1f", float64(z.Admitted-p.Admitted)/dt)
			rejected = fmt.Sprintf("%.1f", float64(z.Rejected-p.Rejected)/dt)
		}
		active, waiting := z.activeCell(), z.waitingCell()
		if z.Active > z.MaxConnections {
			active += "*"
			perKey = true
		}
		if z.MaxWaiting > 0 && z.Waiting > z.MaxWaiting {
			waiting += "*"
			perKey = true
		}
		rows = append(rows, []string{
			z.nameCell(zones, i), active, waiting, formatWait(z.OldestWait),
			admitted, rejected, z.rejectedCell(), strconv.FormatUint(z.Abandoned, 10), yesNo(z.Paused),
		})
		fleet = append(fleet, z.fleetLine())
	}
	var lines []string
	for i, l := range alignColumns(rows) {
		lines = append(lines, l)
		if fleet[i] != "" {
			lines = append(lines, "  "+fleet[i])
		}
	}
	if perKey {
		lines = append(lines, "* more than the limit: the zone has a key, and its limits apply to each key value")
	}
	return lines
}

// keyed maps each zone to a key that is the same in the next sample: its
// name, or for zones without one their place among them (only while their
// number stays the same: otherwise nobody can tell them apart).
func keyed(zones []zoneInfo) map[string]*zoneInfo {
	m := make(map[string]*zoneInfo, len(zones))
	for i := range zones {
		m[keyOf(zones, i)] = &zones[i]
	}
	return m
}

func keyOf(zones []zoneInfo, i int) string {
	if zones[i].Zone != "" {
		return zones[i].Zone
	}
	n, nth := 0, 0
	for j := range zones {
		if zones[j].Zone == "" {
			n++
			if j < i {
				nth++
			}
		}
	}
	return fmt.Sprintf("\x00%d of %d", nth, n)
}

func renderZone(prev, cur *sample, maxWaiters int) []string {
	z := cur.zones[0]
	lines := []string{
		fmt.Sprintf("zone %s: max_connections %d, max_waiting %s, wait_timeout %s, order %s",
			z.Zone, z.MaxConnections, maxWaitingText(z.MaxWaiting), waitTimeoutText(z.WaitTimeout), z.Order),
		"",
	}
	if f := z.Fair; f != nil {
		lines = append(lines[:1], fairLine(f), "")
	}
	lines = append(lines, zoneTable(prev, cur, cur.zones)...)
	lines = append(lines, "")
	if z.Fair != nil {
		lines = append(lines, tenantLines(&z)...)
		lines = append(lines, "")
	}
	if z.Waiting == 0 {
		return append(lines, "nobody is waiting")
	}
	ws := append([]waiterInfo(nil), z.Waiters...)
	sort.SliceStable(ws, func(i, j int) bool { return ws[i].Waited > ws[j].Waited })
	if maxWaiters >= 0 && len(ws) > maxWaiters {
		ws = ws[:maxWaiters]
	}
	lines = append(lines, fmt.Sprintf("longest waiters (%d of %d waiting):", len(ws), z.Waiting))
	rows := [][]string{{"WAITED", "REMOTE ADDRESS", "KEY", "PRIORITY"}}
	if z.Fair != nil {
		rows[0][2] = "TENANT"
	}
	for _, w := range ws {
		key := w.Key
		if z.Fair != nil {
			key = tenantText(w.Tenant)
		} else if key == "" {
			key = "-"
		}
		rows = append(rows, []string{formatWait(w.Waited), w.RemoteAddr, key, strconv.Itoa(w.Priority)})
	}
	lines = append(lines, alignColumns(rows)...)
	if z.WaitersTruncated {
		lines = append(lines, fmt.Sprintf("(the admin API lists the first %d waiters in admission order; longer waiters may be beyond them)", z.WaitersShownMax))
	}
	return lines
}

// fairLine is a zone's fair share settings and its tenants' fairness.
func fairLine(f *fairJSON) string {
	line := "fair_share " + f.FairShare
	if len(f.Weights) > 0 {
		ts := make([]string, 0, len(f.Weights))
		for t := range f.Weights {
			ts = append(ts, t)
		}
		sort.Strings(ts)
		ws := make([]string, len(ts))
		for i, t := range ts {
			ws[i] = fmt.Sprintf("%s=%d", tenantText(t), f.Weights[t])
		}
		line += ", weights " + strings.Join(ws, " ")
	}
	if f.FairMax > 0 {
		line += fmt.Sprintf(", fair_max %d", f.FairMax)
	}
	return line + fmt.Sprintf("; %d tenants waiting, fairness index %.2f", f.TenantsWaiting, f.FairnessIndex)
}

// tenantLines is the table of a zone's tenants, those that hold the most
// slots first.
func tenantLines(z *zoneInfo) []string {
	if z.Fair.Tenants == 0 {
		return []string{"no tenant holds a slot or waits"}
	}
	lines := []string{fmt.Sprintf("tenants (%d of %d, by slots held):", len(z.TenantList), z.Fair.Tenants)}
	rows := [][]string{{"TENANT", "ACTIVE", "WAITING", "WEIGHT", "OLDEST WAIT"}}
	for _, t := range z.TenantList {
		oldest := "-"
		if t.Waiting > 0 {
			oldest = formatWait(t.OldestWait)
		}
		rows = append(rows, []string{tenantText(t.Tenant), strconv.Itoa(t.Active), strconv.Itoa(t.Waiting), strconv.Itoa(t.Weight), oldest})
	}
	lines = append(lines, alignColumns(rows)...)
	if z.TenantsTruncated {
		lines = append(lines, fmt.Sprintf("(the admin API lists the %d tenants that hold the most slots)", z.TenantsShownMax))
	}
	return lines
}

// tenantText shows the empty tenant value as "(empty)".
func tenantText(t string) string {
	if t == "" {
		return "(empty)"
	}
	return t
}

func (z *zoneInfo) nameCell(zones []zoneInfo, i int) string {
	if z.Zone != "" {
		return z.Zone
	}
	n, nth := 0, 0
	for j := range zones {
		if zones[j].Zone == "" {
			n++
			if j <= i {
				nth++
			}
		}
	}
	if n == 1 {
		return "(no zone)"
	}
	return fmt.Sprintf("(no zone) #%d", nth)
}

func (z *zoneInfo) activeCell() string {
	return fmt.Sprintf("%d/%d", z.Active, z.MaxConnections)
}

func (z *zoneInfo) waitingCell() string {
	switch {
	case z.MaxWaiting > 0:
		return fmt.Sprintf("%d/%d", z.Waiting, z.MaxWaiting)
	case z.MaxWaiting < 0:
		return fmt.Sprintf("%d/0", z.Waiting)
	}
	return strconv.Itoa(z.Waiting)
}

// rejectedCell is the rejections in total, then by reason (those not zero).
func (z *zoneInfo) rejectedCell() string {
	if z.Rejected == 0 {
		return "0"
	}
	reasons := make([]string, 0, len(z.RejectedByReason))
	for r, n := range z.RejectedByReason {
		if n > 0 {
			reasons = append(reasons, r)
		}
	}
	sort.Strings(reasons)
	parts := make([]string, len(reasons))
	for i, r := range reasons {
		parts[i] = fmt.Sprintf("%s %d", r, z.RejectedByReason[r])
	}
	return fmt.Sprintf("%d (%s)", z.Rejected, strings.Join(parts, ", "))
}

// fleetLine is a fleet zone's totals, as the node last learned them, and
// its store's state; "" for a zone of one process.
func (z *zoneInfo) fleetLine() string {
	f := z.Fleet
	if f == nil {
		return ""
	}
	line := fmt.Sprintf("fleet: %d active, %d waiting on %d nodes; store %s", f.Active, f.Waiting, f.NodeCount, f.Store)
	if f.StoreError != "" {
		line += " (" + f.StoreError + ")"
	}
	return line
}

func maxWaitingText(n int) string {
	switch {
	case n == 0:
		return "unbounded"
	case n < 0:
		return "none (nobody waits)"
	}
	return strconv.Itoa(n)
}

func waitTimeoutText(s string) string {
	if s == "" || s == "0s" {
		return "none"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// formatWait is a wait in seconds, shortly: "-" for none.
func formatWait(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d <= 0:
		return "-"
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
}

// alignColumns pads every cell but the last of each row to its column's
// width, with two spaces between columns.
func alignColumns(rows [][]string) []string {
	var width []int
	for _, r := range rows {
		for i, c := range r {
			if i >= len(width) {
				width = append(width, 0)
			}
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	lines := make([]string, len(rows))
	for n, r := range rows {
		var b strings.Builder
		for i, c := range r {
			b.WriteString(c)
			if i < len(r)-1 {
				b.WriteString(strings.Repeat(" ", width[i]-len([]rune(c))+2))
			}
		}
		lines[n] = b.String()
	}
	return lines
}

// The admin API client.

const adminPathPrefix = "/connection_limit/"

// adminClient sends requests to Caddy's admin API as Caddy's own commands
// do (caddycmd.AdminAPIRequest): over the admin address's network, with
// an Origin header that names that address, which the admin API checks.
type adminClient struct {
	addr    string // as given or found, for messages
	network string
	dial    string
	origin  string // "http://host:port"; the base URL too
	http    *http.Client
}

func newAdminClient(addr string) (*adminClient, error) {
	na, err := caddy.ParseNetworkAddress(addr)
	if err != nil {
		return nil, fmt.Errorf("invalid admin address %s: %v", addr, err)
	}
	if na.PortRangeSize() > 1 {
		return nil, fmt.Errorf("invalid admin address %s: a port range", addr)
	}
	c := &adminClient{addr: addr, network: na.Network, origin: "http://" + na.JoinHostPort(0)}
	switch {
	case na.IsUnixNetwork():
		path, _, _ := strings.Cut(na.Host, "|") // drop the socket's permission bits
		c.dial, c.origin = path, "http://127.0.0.1"
	case na.IsFdNetwork():
		return nil, fmt.Errorf("admin address %s: this command can't reach an admin API on a file descriptor; give its address with --address", addr)
	default:
		c.dial = na.JoinHostPort(0)
	}
	c.http = &http.Client{
		Timeout: requestTimeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, c.network, c.dial)
			},
		},
	}
	return c, nil
}

// statusError is an answer of the admin API that is not a success.
type statusError struct {
	code int
	msg  string // the admin API's error message
	req  string // "GET /connection_limit/db"
}

func (e *statusError) Error() string {
	return fmt.Sprintf("%s: HTTP %d: %s", e.req, e.code, e.msg)
}

func isStatus(err error, code int) bool {
	var se *statusError
	return errors.As(err, &se) && se.code == code
}

// do sends one request and returns the body of a 2xx answer. A request
// that got no answer is sent once more on a new connection: every config
// load replaces Caddy's admin server, which can close a kept-alive one.
func (c *adminClient) do(ctx context.Context, method, path string) ([]byte, error) {
	var lastErr error
	for attempt := range 2 {
		if attempt > 0 {
			c.http.CloseIdleConnections()
		}
		body, err := c.once(ctx, method, path)
		var se *statusError
		if err == nil || errors.As(err, &se) || ctx.Err() != nil {
			return body, err
		}
		lastErr = err
	}
	return nil, c.unreachable(lastErr)
}

func (c *adminClient) once(ctx context.Context, method, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.origin+path, nil)
	if err != nil {
		return nil, err
	}
	if c.network != "unix" && c.network != "unixgram" && c.network != "unixpacket" {
		req.Header.Set("Origin", c.origin)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		se := &statusError{code: resp.StatusCode, req: method + " " + path}
		var apiErr struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &apiErr) == nil && apiErr.Error != "" {
			se.msg = apiErr.Error
		} else {
			se.msg = strings.TrimSpace(string(body))
		}
		if resp.StatusCode == http.StatusForbidden {
			return nil, c.rejectedError(se)
		}
		return nil, se
	}
	return body, nil
}

func (c *adminClient) unreachable(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // the URL is not what was tried; the address is
	}
	return fmt.Errorf("cannot reach Caddy's admin API at %s (%s %s): %v\n"+
		"Is Caddy running, with its admin API on that address? Name the address with --address, or give the config Caddy runs with --config",
		c.addr, c.network, c.dial, err)
}

// rejectedError explains a 403: the admin API checks the Host and Origin
// of every request against its listen address or its "origins".
func (c *adminClient) rejectedError(se *statusError) error {
	sent := "Host " + strings.TrimPrefix(c.origin, "http://") + " and Origin " + c.origin
	return fmt.Errorf("the admin API at %s rejected the request: %s (%s).\n"+
		"It answers only requests whose Host and Origin match its admin \"listen\" address, or its admin \"origins\" when set; this command sent %s.\n"+
		"Use --address with the exact address of Caddy's admin \"listen\", or add %s to its admin \"origins\"",
		c.addr, se.msg, se.req, sent, c.origin)
}

func (c *adminClient) get(ctx context.Context, path string) ([]byte, error) {
	return c.do(ctx, http.MethodGet, path)
}

// zoneRequest sends method to the zone's endpoint (action "": the zone
// itself), and explains a zone that is not there.
func (c *adminClient) zoneRequest(ctx context.Context, method, zone, action string) ([]byte, error) {
	if zone == "" {
		return nil, errors.New("a zone name is needed; handlers without a zone cannot be named")
	}
	path := adminPathPrefix + url.PathEscape(zone)
	if action != "" {
		path += "/" + action
	}
	body, err := c.do(ctx, method, path)
	if isStatus(err, http.StatusNotFound) {
		return nil, c.noZoneError(ctx, zone)
	}
	return body, err
}

// noZoneError says that zone is not there, and which zones are.
func (c *adminClient) noZoneError(ctx context.Context, zone string) error {
	raw, err := c.get(ctx, adminPathPrefix)
	if isStatus(err, http.StatusNotFound) {
		return c.noAPIError()
	}
	if err != nil {
		return fmt.Errorf("no zone %q in the Caddy at %s (and listing its zones failed: %v)", zone, c.addr, err)
	}
	var list struct {
		Zones []zoneInfo `json:"zones"`
	}
	_ = json.Unmarshal(raw, &list)
	var names []string
	unnamed := 0
	for _, z := range list.Zones {
		if z.Zone == "" {
			unnamed++
		} else {
			names = append(names, z.Zone)
		}
	}
	msg := fmt.Sprintf("no zone %q in the Caddy at %s; ", zone, c.addr)
	if len(names) == 0 {
		msg += "it has no named zones"
	} else {
		msg += "its zones: " + strings.Join(names, ", ")
	}
	if unnamed > 0 {
		msg += fmt.Sprintf(" (and %d handler(s) without a zone, which cannot be named)", unnamed)
	}
	return errors.New(msg)
}

func (c *adminClient) noAPIError() error {
	return fmt.Errorf("the Caddy at %s has no %s admin endpoint: is it built with github.com/l4-connlimit/connlimit? ('caddy list-modules | grep connection_limit' shows it)",
		c.addr, adminPathPrefix)
}
