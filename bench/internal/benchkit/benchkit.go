// Package benchkit holds what the end-to-end benchmarks (bench/e2e and
// bench/fleet) share: a client dialer for many short loopback
// connections, the hand-off gaps at a backend, and a process's CPU time.
package benchkit

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Dialer spreads client connections over several 127.0.0.x source
// addresses, so that tens of thousands of connections to one proxy port
// do not run out of ephemeral ports (IP_BIND_ADDRESS_NO_PORT lets the
// kernel pick the port per 4-tuple at connect time).
type Dialer struct {
	srcs []net.IP
	n    atomic.Uint64
}

// NewDialer returns a Dialer over the source addresses 127.0.0.1 to
// 127.0.0.nsrc.
func NewDialer(nsrc int) *Dialer {
	d := &Dialer{}
	for i := range nsrc {
		d.srcs = append(d.srcs, net.IPv4(127, 0, 0, byte(1+i)))
	}
	return d
}

func bindNoPort(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}

// Sources is how many source addresses d uses.
func (d *Dialer) Sources() int { return len(d.srcs) }

// Dial connects to addr from the next source address in turn.
func (d *Dialer) Dial(addr string, deadline time.Time) (net.Conn, error) {
	i := d.n.Add(1)
	nd := net.Dialer{
		Deadline:  deadline,
		LocalAddr: &net.TCPAddr{IP: d.srcs[int(i%uint64(len(d.srcs)))]},
		Control:   bindNoPort,
	}
	return nd.Dial("tcp4", addr)
}

// HandoffGaps pairs, for a limit of limit concurrent connections at the
// backend, the k-th close (in time order) with the (k+limit)-th accept,
// which fills the slot that close freed, and returns the gaps between
// them, sorted. Only closes inside [from, to) count. Times are ns from a
// common base.
func HandoffGaps(accepts, closes []int64, limit int, from, to int64) []int64 {
	a := slices.Clone(accepts)
	c := slices.Clone(closes)
	slices.Sort(a)
	slices.Sort(c)
	var gaps []int64
	for k, t := range c {
		if t < from || t >= to || k+limit >= len(a) {
			continue
		}
		gaps = append(gaps, a[k+limit]-t)
	}
	slices.Sort(gaps)
	return gaps
}

// clkTck is the unit of utime and stime in /proc/PID/stat.
var clkTck = func() float64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && v > 0 {
			return float64(v)
		}
	}
	return 100
}()

// ProcCPU is the CPU time (utime+stime, all threads, including exited
// ones) of process pid, from /proc/PID/stat.
func ProcCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("bad stat for %d", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("short stat for %d", pid)
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("bad utime/stime for %d", pid)
	}
	return time.Duration(float64(u+s) / clkTck * float64(time.Second)), nil
}

// Get fetches url with c; a status other than 200 is an error, with the
// body returned.
func Get(c *http.Client, url string) ([]byte, error) {
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return b, nil
}

// DialFrom connects to addr from the source address ip (127.0.0.x), the
// kernel picking the port at connect time: a client of one tenant, when
// the proxy tells tenants apart by address.
func DialFrom(ip net.IP, addr string, deadline time.Time) (net.Conn, error) {
	nd := net.Dialer{Deadline: deadline, LocalAddr: &net.TCPAddr{IP: ip}, Control: bindNoPort}
	return nd.Dial("tcp4", addr)
}

// HAProxyTCP is an HAProxy configuration in TCP mode in front of one
// server that takes at most ServerMaxConn connections at once: the others
// wait in HAProxy's queue (FIFO), without a queue timeout to speak of.
type HAProxyTCP struct {
	Listen, Server string
	MaxConn        int // global and frontend maxconn
	ServerMaxConn  int
	NbThread       int    // 0: HAProxy's default
	StatsSocket    string // "" for none
}

// Config is the configuration file's text.
func (h HAProxyTCP) Config() string {
	var b strings.Builder
	fmt.Fprintf(&b, "global\n    maxconn %d\n", h.MaxConn)
	if h.NbThread > 0 {
		fmt.Fprintf(&b, "    nbthread %d\n", h.NbThread)
	}
	if h.StatsSocket != "" {
		fmt.Fprintf(&b, "    stats socket %s level admin\n", h.StatsSocket)
	}
	b.WriteString(`defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue 600s
`)
	fmt.Fprintf(&b, "frontend fe\n    bind %s\n    maxconn %d\n    default_backend be\n", h.Listen, h.MaxConn)
	fmt.Fprintf(&b, "backend be\n    server s1 %s maxconn %d\n", h.Server, h.ServerMaxConn)
	return b.String()
}

// CPUTotals reads the aggregate "cpu" line of /proc/stat: idle (idle +
// iowait) and total jiffies.
func CPUTotals() (idle, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, s := range f[1:] {
		v, _ := strconv.ParseUint(s, 10, 64)
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		total += v
		if i == 3 || i == 4 {
			idle += v
		}
	}
	return idle, total
}

// Listening reports whether a TCP socket listens on 127.0.0.1:port.
func Listening(port int) bool {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return false
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == want && f[3] == "0A" {
			return true
		}
	}
	return false
}
