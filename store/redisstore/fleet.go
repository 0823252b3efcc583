package redisstore

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/l4-connlimit/connlimit/store"
)

// This file is store.Store in Redis 7.0 or later (or any server that speaks
// its protocol and runs Redis Functions in Lua: Valkey). Every operation is
// one function of one library (lua/), called with FCALL, so each is atomic
// and one round trip; the library is loaded (FUNCTION LOAD) by the first
// call that finds the server without it. Unlike a script run with EVALSHA,
// it is not defined anew on every call: lib.lua's functions cost Redis
// nothing per call. Times
// (leases, when limits were set) are Redis' own clock (TIME), never a
// node's. The key layout and what each operation does are in lua/.
//
// Redis Cluster: every key of a zone is "<prefix>:{<zone>}:<what>", so they
// share the hash tag {<zone>} and one zone lives in one slot. A function is
// given the zone's base key "<prefix>:{<zone>}" as its one key (the client
// routes it by that key's slot) and derives the others from it, per node
// and per key value, which it cannot know beforehand; they are in the same
// slot by their hash tag. Zone names and the prefix may not contain '{' or
// '}', which would move the tag. With Options.Cluster the client is a
// Cluster client that routes each call (and the BRPOPLPUSH of a node's
// grants) to the shard of the zone's slot; the library is loaded on every
// master.

//go:embed lua/*.lua
var fleetRedisLua embed.FS

// fleetOps are the operations of lua/, each a function of the library.
var fleetOps = []string{"take", "give", "leave", "renew", "register", "register_tickets", "register_sweep",
	"set_limits", "set_paused", "status", "deregister", "grants"}

// fleetLibrary is the store's Redis Functions library: lib.lua, then each
// operation's file as the body of a function. Its name and its functions'
// names carry a hash of its code, so that nodes of different builds each
// load their own and never replace another's.
type fleetLibrary struct {
	name string
	code string            // FUNCTION LOAD's argument
	fn   map[string]string // operation -> function name
}

var fleetLib = buildFleetLibrary()

func buildFleetLibrary() fleetLibrary {
	lib, err := fleetRedisLua.ReadFile("lua/lib.lua")
	if err != nil {
		panic(err)
	}
	var body strings.Builder
	body.Write(lib)
	for _, op := range fleetOps {
		src, err := fleetRedisLua.ReadFile("lua/" + op + ".lua")
		if err != nil {
			panic(err)
		}
		// the operation's file runs as it would as a script of its own,
		// with KEYS and ARGV
		// and then settle() does what it left to do (a fair share's grants)
		fmt.Fprintf(&body, "\nredis.register_function('%%s_%s', function(KEYS, ARGV)\nzone(KEYS[1])\nDIRTY, FORCE = {}, false\nlocal r = (function()\n%s\nend)()\nsettle()\nreturn r\nend)\n", op, src)
	}
	sum := sha1.Sum([]byte(body.String()))
	name := "connlimit_" + hex.EncodeToString(sum[:6])
	l := fleetLibrary{name: name, fn: map[string]string{},
		code: "#!lua name=" + name + "\n" + strings.ReplaceAll(body.String(), "'%s_", "'"+name+"_")}
	for _, op := range fleetOps {
		l.fn[op] = name + "_" + op
	}
	return l
}

// Options say how to reach Redis and how to keep a fleet zone there.
type Options struct {
	// Address is host:port.
	Address string
	// Username and Password authenticate (AUTH); both optional.
	Username, Password string
	// DB is the database number (SELECT).
	DB int
	// TLS, if not nil, is used for the connection.
	TLS *tls.Config
	// Cluster: Address is a node of a Redis Cluster, from which the
	// client learns the others; DB must be 0.
	Cluster bool
	// KeyPrefix starts every key; default "connlimit". It may not contain
	// '{' or '}'.
	KeyPrefix string
	// Lease is how long the store keeps a node registered without a
	// renewal: at least a second; default 5 s.
	Lease time.Duration

	// timeout bounds each dial, read and write (default 1 s): a store that
	// does not answer gives an error within about that long.
	timeout time.Duration
	// retryPause is the pause before the one retry of an idempotent
	// operation (default 50 ms).
	retryPause time.Duration
}

const (
	// DefaultKeyPrefix starts every key of a fleet zone in Redis.
	DefaultKeyPrefix = "connlimit"

	fleetReapLimit = 16 // expired nodes reaped by one renewal at most
)

type redisFleet struct {
	zone, node string
	keys       []string // {base}: every call's keys
	kGrants    string
	kInflight  string
	lease      time.Duration
	timeout    time.Duration
	retryPause time.Duration
	c          redis.UniversalClient

	// seen is the highest sequence of the store's state a reply showed:
	// every call sends it, so that a store that went back in time (an
	// older snapshot, a lagging replica) says so before it grants.
	seen atomic.Uint64

	// loads counts the library's loads by this store; loadMu makes them
	// one at a time.
	loadMu sync.Mutex
	loads  atomic.Uint64

	// the calls in flight, those that wait for one to end, and when they
	// go anyway (fcall)
	bmu        sync.Mutex
	inflight   int
	pending    []*fcallReq
	flushTimer *time.Timer

	pumpOnce  sync.Once
	evictOnce sync.Once
	evictWarn func(policy string) // says that Redis may evict the zone's keys
	grants    chan grantResult
	// delivered holds the grants NextGrant returned that no successful
	// Renew acknowledged yet: they are still in the in-flight list, and a
	// re-read of it after an error must not deliver them twice.
	dmu       sync.Mutex
	delivered map[string]bool
	rearm     chan struct{} // a Register succeeded: end the pump's pause
	pumpDone  chan struct{}
	closeOnce sync.Once
	closed    chan struct{}
}

type grantResult struct {
	t   store.Ticket
	err error
}

// New returns zone's shared state in the Redis at opts.Address,
// as seen by the node nodeID (a random id if empty; it must be unique in
// the fleet and should stay the same across config reloads). It does not
// connect: Redis need not be up.
func New(opts Options, zone, nodeID string) (store.Store, error) {
	if opts.Address == "" {
		return nil, errors.New("connlimit: fleet store: no Redis address")
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = DefaultKeyPrefix
	}
	if err := store.CheckName("key_prefix", opts.KeyPrefix); err != nil {
		return nil, fmt.Errorf("connlimit: fleet store: %v", err)
	}
	if err := store.CheckName("zone", zone); err != nil {
		return nil, fmt.Errorf("connlimit: fleet store: %v", err)
	}
	if opts.Lease == 0 {
		opts.Lease = store.DefaultLease
	}
	if opts.Lease < store.MinLease {
		return nil, fmt.Errorf("connlimit: fleet store: lease must be at least %s, got %s", store.MinLease, opts.Lease)
	}
	if opts.DB < 0 || (opts.Cluster && opts.DB != 0) {
		return nil, fmt.Errorf("connlimit: fleet store: db must be 0 with a Cluster, and never negative, got %d", opts.DB)
	}
	if opts.timeout <= 0 {
		opts.timeout = time.Second
	}
	if opts.retryPause <= 0 {
		opts.retryPause = 50 * time.Millisecond
	}
	if nodeID == "" {
		nodeID = store.DefaultNodeID()
	}
	base := opts.KeyPrefix + ":{" + zone + "}"
	// RESP2, no CLIENT SETINFO, no maintenance notifications: a
	// connection costs AUTH/SELECT at most, and any Redis >= 7.0 (or
	// Valkey) serves it. Take, Give and Leave must not run twice:
	// no automatic retry (nor redirect: a Cluster client would resend on
	// a connection error while following one); run retries itself where
	// that is safe.
	noMaint := &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	var c redis.UniversalClient
	if opts.Cluster {
		c = redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:     []string{opts.Address},
			Username:  opts.Username,
			Password:  opts.Password,
			TLSConfig: opts.TLS,

			Protocol:                 2,
			DisableIdentity:          true,
			MaintNotificationsConfig: noMaint,
			MaxRetries:               -1,
			MaxRedirects:             -1,
			DialTimeout:              opts.timeout,
			DialerRetries:            1,
			ReadTimeout:              opts.timeout,
			WriteTimeout:             opts.timeout,
			PoolTimeout:              opts.timeout,
			ContextTimeoutEnabled:    true,
		})
	} else {
		c = redis.NewClient(&redis.Options{
			Addr:      opts.Address,
			Username:  opts.Username,
			Password:  opts.Password,
			DB:        opts.DB,
			TLSConfig: opts.TLS,

			Protocol:                 2,
			DisableIdentity:          true,
			MaintNotificationsConfig: noMaint,
			MaxRetries:               -1,
			DialTimeout:              opts.timeout,
			DialerRetries:            1,
			ReadTimeout:              opts.timeout,
			WriteTimeout:             opts.timeout,
			PoolTimeout:              opts.timeout,
			ContextTimeoutEnabled:    true,
		})
	}
	return &redisFleet{
		zone:       zone,
		node:       nodeID,
		keys:       []string{base},
		kGrants:    base + ":grants:" + nodeID,
		kInflight:  base + ":inflight:" + nodeID,
		delivered:  map[string]bool{},
		lease:      opts.Lease,
		timeout:    opts.timeout,
		retryPause: opts.retryPause,
		c:          c,
		grants:     make(chan grantResult),
		rearm:      make(chan struct{}, 1),
		pumpDone:   make(chan struct{}),
		closed:     make(chan struct{}),
	}, nil
}

func (s *redisFleet) NodeID() string       { return s.node }
func (s *redisFleet) Lease() time.Duration { return s.lease }

// fail wraps an error that is certain: the store answered (an error reply,
// a refusal, a reply that makes no sense) or was not asked.
func (s *redisFleet) fail(op string, err error) error {
	return &store.Error{Zone: s.zone, Op: op, Err: err}
}

// failCall wraps an error of the client: uncertain unless it is an error
// reply, or the client was closed.
func (s *redisFleet) failCall(op string, err error) error {
	var rerr redis.Error
	uncertain := !errors.As(err, &rerr) && !errors.Is(err, redis.ErrClosed)
	return &store.Error{Zone: s.zone, Op: op, Err: err, Uncertain: uncertain}
}

func (s *redisFleet) isClosed() bool {
	select {
	case <-s.closed:
		return true
	default:
		return false
	}
}

// run runs one operation's function. It is tried once more after a
// Cluster's redirect or refusal (it did not run), after loading the library
// if the server did not have it (it did not run either: a server that
// restarted or failed over without it, a FUNCTION FLUSH), and an idempotent
// one also after a connection error.
func (s *redisFleet) run(ctx context.Context, op string, idempotent bool, args ...any) (any, error) {
	return s.runFn(ctx, op, op, idempotent, args...)
}

// runFn is run of the function of operation fnOp, as a step of op.
func (s *redisFleet) runFn(ctx context.Context, op, fnOp string, idempotent bool, args ...any) (any, error) {
	if s.isClosed() {
		return nil, s.fail(op, store.ErrClosed)
	}
	fn := fleetLib.fn[fnOp]
	// once, and again after loading the library if the server lacked it
	call := func() (any, error) {
		loads := s.loads.Load()
		v, err := s.fcall(ctx, fn, args)
		if err != nil && notLoaded(err) && ctx.Err() == nil {
			if err = s.load(ctx, loads); err == nil {
				v, err = s.fcall(ctx, fn, args)
			}
		}
		return v, err
	}
	v, err := call()
	if err != nil && (notRun(err) || idempotent && retryable(err)) && ctx.Err() == nil {
		t := time.NewTimer(s.retryPause)
		select {
		case <-t.C:
			v, err = call()
		case <-ctx.Done():
			t.Stop()
		case <-s.closed:
			t.Stop()
		}
	}
	if err != nil {
		if redis.HasErrorPrefix(err, "unknown command") {
			err = fmt.Errorf("%w (Redis 7.0 or later is needed: Redis Functions)", err)
		}
		return nil, s.failCall(op, err)
	}
	return v, nil
}

// fleetPipelines is how many of a store's calls are in flight before
// others wait: the calls that come meanwhile go together as one pipeline
// when one of those ends, or after fleetPipelineWait at the latest (a
// store far away must not make them wait a round trip).
const (
	fleetPipelines    = 2
	fleetPipelineWait = 200 * time.Microsecond
)

// fcallReq is a call waiting for a pipeline.
type fcallReq struct {
	ctx  context.Context
	fn   string
	args []any
	v    any
	err  error
	done chan struct{}
}

// fcall calls function fn once. A call that finds fewer than
// fleetPipelines calls in flight goes at once, alone, as it would without
// this; the others queue and go as one pipeline (when one in flight ends,
// within fleetPipelineWait), so that under load Redis reads and answers
// many calls with one system call each way (most of its CPU per call
// otherwise). Each call's round trip stays one.
func (s *redisFleet) fcall(ctx context.Context, fn string, args []any) (any, error) {
	s.bmu.Lock()
	if s.inflight < fleetPipelines {
		s.inflight++
		s.bmu.Unlock()
		v, err := s.c.FCall(ctx, fn, s.keys, args...).Result()
		s.next()
		return v, err
	}
	r := &fcallReq{ctx: ctx, fn: fn, args: args, done: make(chan struct{})}
	if len(s.pending) == 0 {
		if s.flushTimer == nil {
			s.flushTimer = time.AfterFunc(fleetPipelineWait, s.flush)
		} else {
			s.flushTimer.Reset(fleetPipelineWait)
		}
	}
	s.pending = append(s.pending, r)
	s.bmu.Unlock()
	select {
	case <-r.done:
		return r.v, r.err
	case <-ctx.Done():
		// the call may still go (uncertain, as any call its ctx ended)
		return nil, ctx.Err()
	}
}

// next ends a call or pipeline in flight: the calls that queued meanwhile
// go next, as one pipeline, in its place.
func (s *redisFleet) next() {
	s.bmu.Lock()
	if len(s.pending) == 0 {
		s.inflight--
		s.bmu.Unlock()
		return
	}
	batch := s.pending
	s.pending = nil
	s.flushTimer.Stop()
	s.bmu.Unlock()
	go s.pipeline(batch)
}

// flush sends the calls that waited fleetPipelineWait for one in flight
// to end as one pipeline of their own, one more in flight.
func (s *redisFleet) flush() {
	s.bmu.Lock()
	if len(s.pending) == 0 {
		s.bmu.Unlock()
		return
	}
	batch := s.pending
	s.pending = nil
	s.inflight++
	s.bmu.Unlock()
	go s.pipeline(batch)
}

// pipeline sends the calls of batch whose callers still wait, in one
// pipeline, and hands each its reply.
func (s *redisFleet) pipeline(batch []*fcallReq) {
	defer s.next()
	live := batch[:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil { // its caller is gone: not sent
			r.err = err
			close(r.done)
			continue
		}
		live = append(live, r)
	}
	if len(live) == 0 {
		return
	}
	// each caller waits for its own ctx; the pipeline is bounded by the
	// client's read and write timeouts
	ctx := context.Background()
	if len(live) == 1 {
		r := live[0]
		r.v, r.err = s.c.FCall(ctx, r.fn, s.keys, r.args...).Result()
		close(r.done)
		return
	}
	p := s.c.Pipeline()
	cmds := make([]*redis.Cmd, len(live))
	for i, r := range live {
		cmds[i] = p.FCall(ctx, r.fn, s.keys, r.args...)
	}
	_, _ = p.Exec(ctx)
	for i, r := range live {
		r.v, r.err = cmds[i].Result()
		close(r.done)
	}
}

// notLoaded: the server does not have this build's library.
func notLoaded(err error) bool {
	return redis.HasErrorPrefix(err, "Function not found")
}

// load loads the library (on every master of a Cluster: the zone's may
// have changed), unless another call did so since it saw loads: calls
// that all found it missing load it once.
func (s *redisFleet) load(ctx context.Context, loads uint64) error {
	s.loadMu.Lock()
	defer s.loadMu.Unlock()
	if s.loads.Load() != loads {
		return nil
	}
	var err error
	if cc, ok := s.c.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			return c.FunctionLoadReplace(ctx, fleetLib.code).Err()
		})
	} else {
		err = s.c.FunctionLoadReplace(ctx, fleetLib.code).Err()
	}
	if err == nil {
		s.loads.Add(1)
	}
	return err
}

// notRun: a Cluster's reply that the call did not run there (the slot
// moved, is moving, or the cluster is down).
func notRun(err error) bool {
	for _, p := range []string{"MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN"} {
		if redis.HasErrorPrefix(err, p) {
			return true
		}
	}
	return false
}

// retryable: a connection error that a second try may not meet (a pooled
// connection that the server closed, a refused dial), not a timeout (the
// server is slow or gone: a second try would only double the wait) nor an
// error reply.
func retryable(err error) bool {
	var rerr redis.Error
	var nerr net.Error
	return !errors.As(err, &rerr) && !errors.Is(err, redis.ErrClosed) &&
		!errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) &&
		!(errors.As(err, &nerr) && nerr.Timeout())
}

// seenArgs are what a call says of the store's state it saw: the highest
// sequence, and the lease (ms) the store learns for if it went back.
func (s *redisFleet) seenArgs() (string, string) {
	return strconv.FormatUint(s.seen.Load(), 10), strconv.FormatInt(s.lease.Milliseconds(), 10)
}

// saw notes the sequence a reply showed.
func (s *redisFleet) saw(seq uint64) {
	for {
		old := s.seen.Load()
		if seq <= old || s.seen.CompareAndSwap(old, seq) {
			return
		}
	}
}

func (s *redisFleet) Take(ctx context.Context, t store.Ticket) (store.Outcome, store.Reason, error) {
	seen, lease := s.seenArgs()
	v, err := s.run(ctx, "take", false,
		s.node, strconv.FormatUint(t.ID, 10), strconv.Itoa(t.Priority), t.Key, seen, lease)
	if err != nil {
		return store.Rejected, store.ReasonNone, err
	}
	r, ok := v.([]any)
	if !ok {
		r = []any{v} // a bare status: a table costs the function more
	}
	if len(r) == 0 {
		return store.Rejected, store.ReasonNone, s.fail("take", fmt.Errorf("unexpected reply %v", v))
	}
	switch r[0] {
	case "admitted":
		return store.Admitted, store.ReasonNone, nil
	case "queued":
		return store.Queued, store.ReasonNone, nil
	case "lapsed":
		return store.Rejected, store.ReasonNone, s.fail("take", store.ErrLapsed)
	case "nolimits":
		return store.Rejected, store.ReasonNone, s.fail("take", store.ErrNoLimits)
	case "rejected":
		if len(r) == 2 {
			switch r[1] {
			case "queue_full":
				return store.Rejected, store.ReasonQueueFull, nil
			case "no_waiting":
				return store.Rejected, store.ReasonNoWaiting, nil
			}
		}
	}
	return store.Rejected, store.ReasonNone, s.fail("take", fmt.Errorf("unexpected reply %v", v))
}

func (s *redisFleet) Give(ctx context.Context, key string) error {
	seen, lease := s.seenArgs()
	v, err := s.run(ctx, "give", false, s.node, key, seen, lease)
	if err == nil && v == int64(-1) {
		return s.fail("give", store.ErrLapsed)
	}
	return err
}

func (s *redisFleet) Leave(ctx context.Context, t store.Ticket) (bool, error) {
	seen, lease := s.seenArgs()
	v, err := s.run(ctx, "leave", false,
		s.node, strconv.FormatUint(t.ID, 10), strconv.Itoa(t.Priority), t.Key, seen, lease)
	if err != nil {
		return false, err
	}
	if v == int64(-1) {
		return false, s.fail("leave", store.ErrLapsed)
	}
	return v == int64(1), nil
}

func (s *redisFleet) Renew(ctx context.Context, counts store.NodeState) (store.State, error) {
	check := 0
	if counts.Check {
		check = 1
	}
	args := []any{s.node, s.lease.Milliseconds(), counts.Active, counts.Waiters, fleetReapLimit,
		fmt.Sprintf("%d %d %d %d %d", counts.Epoch, check, counts.HeldTotal, counts.Tickets, s.seen.Load())}
	for _, t := range counts.Acks {
		args = append(args, grantString(t))
	}
	v, err := s.run(ctx, "renew", true, args...)
	if err != nil {
		return store.State{}, err
	}
	if len(counts.Acks) > 0 {
		s.dmu.Lock()
		for _, t := range counts.Acks {
			delete(s.delivered, grantString(t))
		}
		s.dmu.Unlock()
	}
	st, seq, err := parseFleetState(v)
	if err != nil {
		return store.State{}, s.fail("renew", err)
	}
	s.saw(seq)
	return st, nil
}

// fairArg is a fair share as the functions take it: JSON ("" when off),
// the same for the same settings (its map's keys sorted), so that the store
// can tell a config's unchanged word.
func fairArg(f store.FairShare) string {
	if !f.On {
		return ""
	}
	b, err := json.Marshal(struct {
		On      int            `json:"on"`
		Max     int            `json:"max"`
		Weights map[string]int `json:"weights,omitempty"`
	}{1, f.Max, f.Weights})
	if err != nil {
		panic(err) // a map of strings to ints always marshals
	}
	return string(b)
}

// registerChunk is how many tickets one call of a registration names (or
// sweeps): a node with tens of thousands of waiters registers in several
// calls, each of which keeps Redis busy for a few ms, so that other nodes
// and zones are not held up behind it.
const registerChunk = 250

// appendTickets appends each ticket's id, priority and key value to args.
func appendTickets(args []any, ts []store.Ticket) []any {
	for _, t := range ts {
		args = append(args, strconv.FormatUint(t.ID, 10), strconv.Itoa(t.Priority), t.Key)
	}
	return args
}

func (s *redisFleet) Register(ctx context.Context, st store.NodeState) (store.State, error) {
	args := make([]any, 0, 12+2*len(st.Held)+3*min(len(st.Waiting), registerChunk))
	args = append(args, s.node, s.lease.Milliseconds(), st.Active, st.Waiters, fleetReapLimit)
	if st.Limits.MaxConnections != 0 {
		if err := st.Limits.Validate(); err != nil {
			return store.State{}, s.fail("register", err)
		}
		l, c := st.Limits, st.Config
		if c.MaxConnections == 0 {
			c = l
		}
		if err := c.Validate(); err != nil {
			return store.State{}, s.fail("register", err)
		}
		paused := 0
		if st.Paused {
			paused = 1
		}
		args = append(args, 1, l.MaxConnections, l.MaxWaiting, l.WaitTimeout.Milliseconds(), l.Order.String(),
			fmt.Sprintf("%d %d %d %s %d", c.MaxConnections, c.MaxWaiting, c.WaitTimeout.Milliseconds(), c.Order, paused))
	} else {
		args = append(args, 0, 0, 0, 0, "fifo", "")
	}
	args = append(args, st.Gen, fairArg(st.Fair))
	n := 0
	for _, c := range st.Held {
		if c > 0 {
			n++
		}
	}
	args = append(args, n)
	for k, c := range st.Held {
		if c > 0 {
			args = append(args, k, c)
		}
	}
	first := st.Waiting[:min(len(st.Waiting), registerChunk)]
	more := 0
	if len(first) < len(st.Waiting) {
		more = 1
	}
	args = appendTickets(append(args, more), first)
	v, err := s.run(ctx, "register", true, args...)
	if err != nil {
		return store.State{}, err
	}
	r, ok := v.([]any)
	if !ok || len(r) != 17 {
		return store.State{}, s.fail("register", fmt.Errorf("unexpected reply %v", v))
	}
	fs, seq, err := parseFleetState(r[:16])
	if err != nil {
		return store.State{}, s.fail("register", err)
	}
	// The tickets the store had for this node and no call named leave:
	// the sweep runs only if some may be left.
	stale, _ := replyInt(r[16])
	epoch := strconv.FormatUint(fs.Epoch, 10)
	for rest := st.Waiting[len(first):]; len(rest) > 0; {
		chunk := rest[:min(len(rest), registerChunk)]
		rest = rest[len(chunk):]
		last := ""
		if len(rest) == 0 {
			last = strconv.FormatInt(stale, 10)
		}
		v, err := s.runFn(ctx, "register", "register_tickets", true, appendTickets([]any{s.node, epoch, last}, chunk)...)
		if err != nil {
			return store.State{}, err
		}
		found, ok := replyInt(v)
		if !ok {
			return store.State{}, s.fail("register", fmt.Errorf("unexpected reply %v", v))
		}
		stale -= found
	}
	for cursor := "0"; stale > 0; {
		v, err := s.runFn(ctx, "register", "register_sweep", true, s.node, epoch, cursor, registerChunk)
		if err != nil {
			return store.State{}, err
		}
		if cursor, ok = v.(string); !ok {
			return store.State{}, s.fail("register", fmt.Errorf("unexpected reply %v", v))
		}
		if cursor == "0" {
			break
		}
	}
	s.saw(seq)
	s.dmu.Lock() // the in-flight list is gone with the grants it held
	clear(s.delivered)
	s.dmu.Unlock()
	s.evictOnce.Do(func() { go s.checkEviction() })
	select { // the store answers again: read the grants at once
	case s.rearm <- struct{}{}:
	default:
	}
	return fs, nil
}

func (s *redisFleet) SetLimits(ctx context.Context, st store.Settings) error {
	l, c := st.Limits, st.Config
	if c.MaxConnections == 0 {
		c = l
	}
	if err := l.Validate(); err != nil {
		return s.fail("set_limits", err)
	}
	if err := c.Validate(); err != nil {
		return s.fail("set_limits", err)
	}
	from := 0
	if st.FromConfig {
		from = 1
	}
	_, err := s.run(ctx, "set_limits", true, from,
		l.MaxConnections, l.MaxWaiting, l.WaitTimeout.Milliseconds(), l.Order.String(),
		c.MaxConnections, c.MaxWaiting, c.WaitTimeout.Milliseconds(), c.Order.String(), fairArg(st.Fair))
	return err
}

func (s *redisFleet) SetPaused(ctx context.Context, paused bool) error {
	p := 0
	if paused {
		p = 1
	}
	_, err := s.run(ctx, "set_paused", true, p)
	return err
}

func (s *redisFleet) Status(ctx context.Context) (store.Status, error) {
	v, err := s.run(ctx, "status", true, s.node)
	if err != nil {
		return store.Status{}, err
	}
	st, err := parseFleetStatus(v)
	if err != nil {
		return store.Status{}, s.fail("status", err)
	}
	return st, nil
}

func (s *redisFleet) Deregister(ctx context.Context) error {
	_, err := s.run(ctx, "deregister", true, s.node)
	return err
}

func (s *redisFleet) NextGrant(ctx context.Context) (store.Ticket, error) {
	if s.isClosed() {
		return store.Ticket{}, s.fail("grant", store.ErrClosed)
	}
	s.pumpOnce.Do(func() { go s.pump() })
	select {
	case r := <-s.grants:
		return r.t, r.err
	case <-ctx.Done():
		return store.Ticket{}, ctx.Err()
	case <-s.closed:
		return store.Ticket{}, s.fail("grant", store.ErrClosed)
	}
}

// pump keeps one BRPOPLPUSH armed, which moves this node's oldest grant
// into its in-flight list, with a timeout of one lease (an idle node
// re-arms it once a lease), and hands what it moves to NextGrant. When
// grants come faster than one round trip each (the BRPOPLPUSH found one
// waiting), it moves those queued meanwhile in one call (the grants
// function) until none is left, then blocks again. A grant stays in the
// in-flight list until a Renew acknowledges it (NodeState.Acks), so a
// reply lost on the way loses nothing: after an error the pump reads the
// list again and hands on what it had not delivered. Being a goroutine of
// its own, it never loses a grant when a NextGrant's ctx ends. A server
// that does not answer within the lease and the timeout is an error; it
// backs off after errors (up to a second), until a Register succeeds: the
// store is back then, and the grants that Register made must not wait out
// the pause.
func (s *redisFleet) pump() {
	defer close(s.pumpDone)
	pause := time.Duration(0)
	reread, busy := false, false
	var last time.Time // when the latest BRPOPLPUSH answered with a grant
	for !s.isClosed() {
		var batch []grantResult
		var err error
		if reread {
			batch, err = s.rereadInflight()
			reread = err != nil
		}
		if err == nil && len(batch) == 0 && busy {
			batch, err = s.moveGrants()
			busy = err == nil && len(batch) > 0
			reread = err != nil
		}
		if err == nil && len(batch) == 0 {
			ctx, cancel := context.WithTimeout(context.Background(), s.lease+s.timeout)
			armed := time.Now()
			var v string
			v, err = s.c.BRPopLPush(ctx, s.kGrants, s.kInflight, s.lease).Result()
			cancel()
			switch {
			case errors.Is(err, redis.Nil):
				continue // timed out: re-arm
			case err == nil:
				batch = append(batch, s.parseDelivered(v))
				// it did not wait for this one, or grants come often (a
				// loaded Redis answers slower than fleetGrantsBusy): more
				// may be queued
				now := time.Now()
				busy = now.Sub(armed) < fleetGrantsBusy || now.Sub(last) < fleetGrantsOften
				last = now
			default:
				reread = true // the move may have happened, its reply lost
			}
		}
		if err != nil {
			if s.isClosed() {
				return
			}
			busy = false
			var se *store.Error
			if !errors.As(err, &se) { // the grants function's is one already
				err = s.failCall("grant", err)
			}
			batch = append(batch, grantResult{err: err})
			pause = min(max(2*pause, 100*time.Millisecond), time.Second)
			select { // only a Register from now on ends the pause
			case <-s.rearm:
			default:
			}
		} else {
			pause = 0
		}
		for _, r := range batch {
			select {
			case s.grants <- r:
			case <-s.closed:
				return
			}
		}
		if pause > 0 {
			t := time.NewTimer(pause)
			select {
			case <-t.C:
			case <-s.rearm:
				t.Stop()
			case <-s.closed:
				t.Stop()
				return
			}
		}
	}
}

const (
	// fleetGrantsBusy: a BRPOPLPUSH that answered sooner found its grant
	// waiting, rather than waited for it (a round trip takes well under).
	fleetGrantsBusy = time.Millisecond
	// fleetGrantsOften: grants that come closer than this to one another
	// queue behind a round trip each, even if the BRPOPLPUSH waited.
	fleetGrantsOften = 5 * time.Millisecond
	// fleetGrantsBatch is how many grants one call of the grants function
	// moves at most.
	fleetGrantsBatch = 64
)

// moveGrants moves the grants queued for this node to its in-flight list
// in one call, oldest first, and returns them delivered.
func (s *redisFleet) moveGrants() ([]grantResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	v, err := s.runFn(ctx, "grant", "grants", false, s.node, fleetGrantsBatch)
	if err != nil {
		return nil, err
	}
	vs, ok := v.([]any)
	if !ok {
		return nil, s.fail("grant", fmt.Errorf("unexpected reply %v", v))
	}
	out := make([]grantResult, 0, len(vs))
	for _, e := range vs {
		g, _ := e.(string)
		out = append(out, s.parseDelivered(g))
	}
	return out, nil
}

// parseDelivered reads one grant moved to the in-flight list and notes it
// delivered.
func (s *redisFleet) parseDelivered(v string) grantResult {
	t, err := parseGrant(v)
	if err != nil {
		return grantResult{err: s.fail("grant", err)}
	}
	s.dmu.Lock()
	s.delivered[v] = true
	s.dmu.Unlock()
	return grantResult{t: t}
}

// rereadInflight returns the grants of the in-flight list that were never
// delivered (their move's reply was lost), oldest first.
func (s *redisFleet) rereadInflight() ([]grantResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	vs, err := s.c.LRange(ctx, s.kInflight, 0, -1).Result()
	if err != nil {
		return nil, err
	}
	var out []grantResult
	for i := len(vs) - 1; i >= 0; i-- { // LPUSHed: the oldest is last
		s.dmu.Lock()
		seen := s.delivered[vs[i]]
		s.dmu.Unlock()
		if !seen {
			out = append(out, s.parseDelivered(vs[i]))
		}
	}
	return out, nil
}

func (s *redisFleet) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.closed)
		err = s.c.Close()
		started := true
		s.pumpOnce.Do(func() { started = false })
		if started {
			<-s.pumpDone
		}
	})
	return err
}

// checkEviction asks Redis, once it answered a Register, for its
// maxmemory-policy: an allkeys-* policy may evict a zone's keys (none has
// a TTL, so volatile-* policies never do), which loses slots and waiters
// as a restart would. A server that does not let it ask (CONFIG renamed or
// denied, as managed services do) says nothing.
func (s *redisFleet) checkEviction() {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	v, err := s.c.ConfigGet(ctx, "maxmemory-policy").Result()
	if err != nil {
		return
	}
	if p := v["maxmemory-policy"]; strings.HasPrefix(p, "allkeys-") && s.evictWarn != nil {
		s.evictWarn(p)
	}
}

// grantString is a grant as the store lists it.
func grantString(t store.Ticket) string {
	return strconv.FormatUint(t.Epoch, 10) + "\n" + strconv.FormatUint(t.ID, 10) + "\n" + strconv.Itoa(t.Priority) + "\n" + t.Key
}

// parseGrant reads "<epoch>\n<ticket id>\n<priority>\n<key value>".
func parseGrant(g string) (store.Ticket, error) {
	f := strings.SplitN(g, "\n", 4)
	if len(f) == 4 {
		ep, err1 := strconv.ParseUint(f[0], 10, 64)
		id, err2 := strconv.ParseUint(f[1], 10, 64)
		prio, err3 := strconv.Atoi(f[2])
		if err1 == nil && err2 == nil && err3 == nil {
			return store.Ticket{ID: id, Key: f[3], Priority: prio, Epoch: ep}, nil
		}
	}
	return store.Ticket{}, fmt.Errorf("garbled grant %q", truncate(g, 60))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// replyInt reads an integer reply element.
func replyInt(v any) (int64, bool) {
	n, ok := v.(int64)
	return n, ok
}

// parseFleetState reads the reply of state() in lib.lua:
// {lapsed, max, maxw, wait_ms, order, set_at, paused, active, waiting,
// nodes, epoch, now, gen, learning, repair, seq}, and the sequence.
func parseFleetState(v any) (store.State, uint64, error) {
	r, ok := v.([]any)
	if !ok || len(r) != 16 {
		return store.State{}, 0, fmt.Errorf("unexpected reply %v", v)
	}
	var n [16]int64
	for i, e := range r {
		if i == 4 || i == 12 {
			continue
		}
		if n[i], ok = replyInt(e); !ok {
			return store.State{}, 0, fmt.Errorf("unexpected reply %v", v)
		}
	}
	st := store.State{
		Lapsed:    n[0] == 1,
		Paused:    n[6] == 1,
		Active:    int(n[7]),
		Waiting:   int(n[8]),
		NodeCount: int(n[9]),
		Epoch:     uint64(n[10]),
		Learning:  n[13] == 1,
		Repair:    n[14] == 1,
	}
	st.Gen, _ = r[12].(string)
	if n[1] > 0 {
		st.Limits = store.Limits{
			MaxConnections: int(n[1]),
			MaxWaiting:     int(n[2]),
			WaitTimeout:    time.Duration(n[3]) * time.Millisecond,
		}
		if r[4] == "lifo" {
			st.Limits.Order = store.LIFO
		}
		if n[5] > 0 {
			st.LimitsSet = time.UnixMilli(n[5])
		}
	}
	return st, uint64(n[15]), nil
}

// parseFleetStatus reads the reply of status.lua: {state, {id, expiry,
// info, ...}}.
func parseFleetStatus(v any) (store.Status, error) {
	r, ok := v.([]any)
	if !ok || len(r) != 2 {
		return store.Status{}, fmt.Errorf("unexpected reply %v", v)
	}
	st, _, err := parseFleetState(r[0])
	if err != nil {
		return store.Status{}, err
	}
	now, _ := replyInt(r[0].([]any)[11])
	ns, ok := r[1].([]any)
	if !ok || len(ns)%3 != 0 {
		return store.Status{}, fmt.Errorf("unexpected reply %v", v)
	}
	fs := store.Status{State: st}
	for i := 0; i < len(ns); i += 3 {
		id, _ := ns[i].(string)
		exps, _ := ns[i+1].(string)
		info, _ := ns[i+2].(string)
		exp, err := strconv.ParseFloat(exps, 64)
		if err != nil {
			return store.Status{}, fmt.Errorf("garbled lease of node %q: %q", id, truncate(exps, 60))
		}
		ni := store.NodeInfo{ID: id, Expires: time.Duration(int64(exp)-now) * time.Millisecond}
		if f := strings.Fields(info); len(f) == 3 {
			a, err1 := strconv.Atoi(f[0])
			w, err2 := strconv.Atoi(f[1])
			at, err3 := strconv.ParseInt(f[2], 10, 64)
			if err1 != nil || err2 != nil || err3 != nil {
				return store.Status{}, fmt.Errorf("garbled info of node %q: %q", id, truncate(info, 60))
			}
			ni.Active, ni.Waiting = a, w
			ni.Renewed = time.Duration(now-at) * time.Millisecond
		} else if info != "" {
			return store.Status{}, fmt.Errorf("garbled info of node %q: %q", id, truncate(info, 60))
		}
		fs.Nodes = append(fs.Nodes, ni)
	}
	return fs, nil
}
