package testkit

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The fleet's tests run against a real redis-server that each test starts
// on a free loopback port (never a system-wide one), with no persistence,
// and stops at cleanup. It can be killed (SIGKILL) and started again,
// empty, on the same port, or from a snapshot of its data taken earlier. The tests' own reads and writes go through Do,
// a RESP client of a few lines: only the Redis store imports go-redis.

// RedisConfig says how to start a test's redis-server.
type RedisConfig struct {
	// Password sets requirepass; User and UserPassword add an ACL user.
	Password, User, UserPassword string
	// TLS: the server listens with TLS only, with a certificate for
	// 127.0.0.1 and localhost from a CA made for the test.
	TLS bool
	// Cluster: the server is a Redis Cluster of one node, which serves
	// every slot.
	Cluster bool
	// Args are more redis-server arguments ("--maxmemory-policy", ...).
	Args []string
}

// Redis is one test's redis-server.
type Redis struct {
	t    testing.TB
	Cfg  RedisConfig
	port int
	dir  string

	// With TLS: the CA's certificate file, and a client config trusting it.
	CAFile    string
	ClientTLS *tls.Config

	mu        sync.Mutex
	cmd       *exec.Cmd
	done      chan struct{}
	snapshots int // Snapshot's files so far

	amu   sync.Mutex // the admin connection of Do
	admin *respConn
}

// redisServerPath finds redis-server; a test without it is skipped, except
// in CI (where .ci/run installs it) where it fails.
func redisServerPath(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server not found: .ci/run installs it (apt-get install -y redis-server)")
		}
		t.Skip("redis-server not found (apt-get install -y redis-server)")
	}
	return p
}

// StartRedis starts a redis-server for t, stopped at t's cleanup.
func StartRedis(t testing.TB, cfg RedisConfig) *Redis {
	t.Helper()
	redisServerPath(t)
	r := &Redis{t: t, Cfg: cfg, dir: t.TempDir()}
	if cfg.TLS {
		r.makeCerts()
	}
	t.Cleanup(r.stop)
	var err error
	for range 5 { // another process may take the free port first
		r.port = FreePort(t)
		if err = r.start(); err == nil {
			return r
		}
	}
	t.Fatalf("starting redis-server: %v", err)
	return nil
}

// FreePort is a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Addr is the server's host:port.
func (r *Redis) Addr() string { return fmt.Sprintf("127.0.0.1:%d", r.port) }

func (r *Redis) args() []string {
	a := []string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", r.dir, "--logfile", filepath.Join(r.dir, "redis.log")}
	if r.Cfg.TLS {
		a = append(a, "--port", "0", "--tls-port", strconv.Itoa(r.port),
			"--tls-cert-file", filepath.Join(r.dir, "server.crt"),
			"--tls-key-file", filepath.Join(r.dir, "server.key"),
			"--tls-ca-cert-file", r.CAFile,
			"--tls-auth-clients", "no")
	} else {
		a = append(a, "--port", strconv.Itoa(r.port))
	}
	if r.Cfg.Password != "" {
		a = append(a, "--requirepass", r.Cfg.Password)
	}
	if r.Cfg.Cluster {
		a = append(a, "--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(r.dir, fmt.Sprintf("nodes-%d.conf", r.port)))
	}
	if r.Cfg.User != "" {
		a = append(a, "--user", r.Cfg.User, "on", ">"+r.Cfg.UserPassword, "~*", "&*", "+@all")
	}
	return append(a, r.Cfg.Args...)
}

// start starts the server on r.port and waits until it answers.
func (r *Redis) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	cmd := exec.Command(redisServerPath(r.t), r.args()...)
	cmd.Dir = r.dir
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	r.cmd, r.done = cmd, done
	deadline := time.Now().Add(5 * time.Second)
	for {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(r.dir, "redis.log"))
			return fmt.Errorf("redis-server exited: %s", Tail(string(log), 400))
		default:
		}
		_, err := r.Do("PING")
		if err == nil && r.Cfg.Cluster {
			err = r.clusterUp()
		}
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("redis-server on port %d does not answer: %v", r.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// clusterUp gives the one node every slot (unless it has them) and says
// whether the cluster is up.
func (r *Redis) clusterUp() error {
	info, err := r.Str("CLUSTER", "INFO")
	if err != nil {
		return err
	}
	if strings.Contains(info, "cluster_slots_assigned:0") {
		if _, err := r.Do("CLUSTER", "ADDSLOTSRANGE", 0, 16383); err != nil {
			return err
		}
	}
	if !strings.Contains(info, "cluster_state:ok") {
		return fmt.Errorf("cluster not up yet")
	}
	return nil
}

// Tail is the last n bytes of s.
func Tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// Kill kills the server with SIGKILL and waits until it is gone.
func (r *Redis) Kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// Signal sends sig to the running server (SIGSTOP, SIGCONT).
func (r *Redis) Signal(sig os.Signal) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return fmt.Errorf("redis-server is not running")
	}
	return r.cmd.Process.Signal(sig)
}

// Restart starts the (killed) server again on the same port, empty.
func (r *Redis) Restart() {
	r.t.Helper()
	var err error
	for range 20 { // the port is free at once after a kill; bounded anyway
		if err = r.start(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("restarting redis-server: %v", err)
}

// Snapshot saves the server's data (SAVE) to an RDB file of its own in
// the server's directory and returns its path. It leaves no dump.rdb
// behind, so a Restart still starts empty; RestartFrom starts from it.
func (r *Redis) Snapshot() (string, error) {
	if _, err := r.Do("SAVE"); err != nil {
		return "", err
	}
	r.mu.Lock()
	r.snapshots++
	path := filepath.Join(r.dir, fmt.Sprintf("snapshot-%d.rdb", r.snapshots))
	r.mu.Unlock()
	if err := os.Rename(filepath.Join(r.dir, "dump.rdb"), path); err != nil {
		return "", err
	}
	return path, nil
}

// RestartFrom starts the (killed) server again on the same port with the
// data of a Snapshot, as a Redis restored from a backup, or a replica
// that lagged behind, would come back. Later Restarts start empty again.
func (r *Redis) RestartFrom(snapshot string) {
	r.t.Helper()
	data, err := os.ReadFile(snapshot)
	if err != nil {
		r.t.Fatalf("restarting redis-server from %s: %v", snapshot, err)
	}
	dump := filepath.Join(r.dir, "dump.rdb")
	if err := os.WriteFile(dump, data, 0o600); err != nil {
		r.t.Fatalf("restarting redis-server from %s: %v", snapshot, err)
	}
	r.Restart() // loads dump.rdb before it answers PING
	if err := os.Remove(dump); err != nil {
		r.t.Fatalf("restarting redis-server from %s: %v", snapshot, err)
	}
}

func (r *Redis) stop() {
	r.Kill()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropAdmin()
}

// ResetStats resets INFO commandstats.
func (r *Redis) ResetStats() {
	r.t.Helper()
	if _, err := r.Do("CONFIG", "RESETSTAT"); err != nil {
		r.t.Fatal(err)
	}
}

// CommandStats returns the calls of each command since the last
// ResetStats (lower case names, "fcall", "blpop", ...), not counting
// the INFO and CONFIG commands of the harness itself.
func (r *Redis) CommandStats() map[string]int64 {
	r.t.Helper()
	calls := make(map[string]int64)
	for name, s := range r.CommandTimes() {
		calls[name] = s.Calls
	}
	return calls
}

// CommandTime is a command's line of INFO commandstats.
type CommandTime struct {
	Calls int64
	Usec  int64 // the server's time in the command (for FCALL, with what the function ran)
}

// CommandTimes is CommandStats with the time each command took.
func (r *Redis) CommandTimes() map[string]CommandTime {
	r.t.Helper()
	s, err := r.Str("INFO", "commandstats")
	if err != nil {
		r.t.Fatal(err)
	}
	out := make(map[string]CommandTime)
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		name, rest, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(name, "cmdstat_") {
			continue
		}
		name = strings.TrimPrefix(name, "cmdstat_")
		if name == "info" || strings.HasPrefix(name, "config") {
			continue
		}
		var ct CommandTime
		for _, f := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				ct.Calls, _ = strconv.ParseInt(v, 10, 64)
			} else if v, ok := strings.CutPrefix(f, "usec="); ok {
				ct.Usec, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		out[name] = ct
	}
	return out
}

// CPU is the CPU time that the running server's threads used so far, in
// ns (/proc/<pid>/task/*/schedstat; Linux only: 0 elsewhere): utime and
// stime come in ticks of 10 ms, too coarse for a short benchmark.
func (r *Redis) CPU() time.Duration {
	r.mu.Lock()
	cmd := r.cmd
	r.mu.Unlock()
	if cmd == nil {
		return 0
	}
	files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", cmd.Process.Pid))
	var t time.Duration
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if fs := strings.Fields(string(b)); len(fs) > 0 {
			ns, _ := strconv.ParseInt(fs[0], 10, 64)
			t += time.Duration(ns)
		}
	}
	return t
}

// makeCerts writes a CA and a server certificate (127.0.0.1, localhost)
// signed by it into r.dir, and sets r.ClientTLS to trust the CA.
func (r *Redis) makeCerts() {
	t := r.t
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "connlimit test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srv := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKeyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) {
		b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
		if err := os.WriteFile(filepath.Join(r.dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca.crt", "CERTIFICATE", caDER)
	write("server.crt", "CERTIFICATE", srvDER)
	write("server.key", "EC PRIVATE KEY", srvKeyDER)
	r.CAFile = filepath.Join(r.dir, "ca.crt")
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	r.ClientTLS = &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
}
