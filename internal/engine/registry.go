package engine

import (
	"fmt"
	"sort"
	"sync"

	"github.com/l4-connlimit/connlimit/store"
)

// Registry holds every zone of the process: the named ones, shared by all
// handlers that name them across routes, servers and config reloads, and
// the private zone of each handler that names none. It is the only state
// that outlives a config. Like the rest of the engine, it knows nothing of
// Caddy: an owner is any comparable value that identifies one loaded
// config (the handler uses its config's context).
//
// Settings: a config that is loaded while another one is running is first
// provisioned and only then started, and a config that fails to start (or
// is only validated) is provisioned and cleaned up without ever serving.
// So a new user's settings do not take hold when it registers while users
// from other configs are registered: they take hold once all older users
// are gone (the old config was cleaned up after the new one started), and
// a user that is released unused leaves the settings as they were. The
// settings in force are always those of the newest confirmed user.
type Registry struct {
	mu      sync.Mutex
	gen     uint64
	named   map[string]*zoneEntry
	private []*zoneEntry
	newObs  func(zone string) Observer
}

type zoneEntry struct {
	zone  *Zone
	users []*zoneUser // oldest first
}

type zoneUser struct {
	owner     any
	gen       uint64
	limits    Limits
	fair      Fair
	fleet     *Fleet // nil: the zone counts in this process alone
	refs      int
	confirmed bool
}

// NewRegistry returns an empty registry; newObs (may be nil) makes the
// Observer of each new zone.
func NewRegistry(newObs func(zone string) Observer) *Registry {
	return &Registry{named: make(map[string]*zoneEntry), newObs: newObs}
}

func (r *Registry) observer(name string) Observer {
	if r.newObs == nil {
		return nil
	}
	return r.newObs(name)
}

// Use registers one handler of config owner that uses the zone name (""
// for a private zone of its own) with limits l, and, if fleet is not nil,
// shares it with other processes through fleet's store. It returns the
// zone and the function with which the handler leaves it (when it is
// cleaned up; later calls change nothing). Two handlers of one config
// that name the same zone with different limits or stores are an error.
func (r *Registry) Use(name string, owner any, l Limits, fleet *Fleet) (*Zone, func(), error) {
	return r.UseFair(name, owner, l, Fair{}, fleet)
}

// UseFair is Use for a zone that may share its slots fairly between
// tenants (fair; zero: not). Handlers of one config that name the same
// zone must give the same fair share too.
func (r *Registry) UseFair(name string, owner any, l Limits, fair Fair, fleet *Fleet) (*Zone, func(), error) {
	if err := l.Validate(); err != nil {
		return nil, nil, err
	}
	if err := fair.Validate(); err != nil {
		return nil, nil, err
	}
	if fleet != nil && name == "" {
		return nil, nil, fmt.Errorf("store: needs a zone: its name names the fleet's shared state")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sweep()
	r.gen++
	if name == "" {
		e := &zoneEntry{zone: NewZone("", l, r.observer(""))}
		e.zone.SetFair(fair)
		u := &zoneUser{owner: owner, gen: r.gen, limits: l, fair: fair, refs: 1, confirmed: true}
		e.users = append(e.users, u)
		r.private = append(r.private, e)
		return e.zone, r.leaver(e, u), nil
	}
	e := r.named[name]
	if e == nil {
		e = &zoneEntry{zone: NewZone(name, l, r.observer(name))}
		r.named[name] = e
	}
	for _, u := range e.users {
		if u.owner != owner {
			continue
		}
		if u.limits != l {
			return nil, nil, fmt.Errorf("zone %q is configured twice in one config with different settings (%s); %s",
				name, limitsDiff(u.limits, l), sameSettings)
		}
		if d := u.fair.Differs(fair); d != "" {
			return nil, nil, fmt.Errorf("zone %q is configured twice in one config with different settings (%s); %s",
				name, d, sameSettings)
		}
		if d := fleetDiff(u.fleet, fleet); d != "" {
			return nil, nil, fmt.Errorf("zone %q is configured twice in one config with different store settings (%s); every handler of a zone must give the same store",
				name, d)
		}
		u.refs++
		return e.zone, r.leaver(e, u), nil
	}
	u := &zoneUser{owner: owner, gen: r.gen, limits: l, fair: fair, fleet: fleet, refs: 1, confirmed: len(e.users) == 0}
	if u.confirmed {
		if err := e.zone.settle(fleet, fair); err != nil {
			r.sweep()
			return nil, nil, err
		}
		e.zone.SetLimits(l)
	}
	e.users = append(e.users, u)
	return e.zone, r.leaver(e, u), nil
}

// sameSettings ends the error of a zone configured twice in one config.
const sameSettings = "every handler of a zone must have the same max_connections, max_waiting, wait_timeout, order, fair_share, weights and fair_max"

// settle puts a config's fleet and fair share in force: a fair share is
// turned off before the zone joins a fleet, and on after it left one.
func (z *Zone) settle(fleet *Fleet, fair Fair) error {
	if !fair.On() {
		z.SetFair(fair)
	}
	if err := z.setFleet(fleet); err != nil {
		return err
	}
	if fair.On() {
		z.SetFair(fair)
	}
	return nil
}

func limitsDiff(a, b Limits) string {
	switch {
	case a.MaxConnections != b.MaxConnections:
		return fmt.Sprintf("max_connections %d and %d", a.MaxConnections, b.MaxConnections)
	case a.MaxWaiting != b.MaxWaiting:
		return fmt.Sprintf("max_waiting %d and %d", a.MaxWaiting, b.MaxWaiting)
	case a.WaitTimeout != b.WaitTimeout:
		return fmt.Sprintf("wait_timeout %s and %s", a.WaitTimeout, b.WaitTimeout)
	default:
		return fmt.Sprintf("order %s and %s", a.Order, b.Order)
	}
}

// fleetDiff names the first store setting in which two handlers differ.
func fleetDiff(a, b *Fleet) string {
	switch {
	case a == nil && b == nil:
		return ""
	case a == nil || b == nil:
		return "store given by one and not the other"
	}
	if d := a.Differs(b); d != "" {
		return "store " + d
	}
	return ""
}

func (r *Registry) leaver(e *zoneEntry, u *zoneUser) func() {
	var once sync.Once
	return func() { once.Do(func() { r.leave(e, u) }) }
}

func (r *Registry) leave(e *zoneEntry, u *zoneUser) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if u.refs--; u.refs > 0 {
		return
	}
	for i, v := range e.users {
		if v == u {
			e.users = append(e.users[:i], e.users[i+1:]...)
			break
		}
	}
	if len(e.users) == 0 {
		// Nobody configures the zone any more: its connections drain
		// under the last settings, and a pause must not strand them
		// (a fleet's pause is the fleet's: it stays).
		if !e.zone.shared.Load() {
			e.zone.SetPaused(false)
		}
		r.sweep()
		if r.named[e.zone.name] == e {
			e.zone.drainFleet() // its waiters leave the fleet's line
		}
		return
	}
	if !u.confirmed {
		// A config that never ran (it failed, or was only validated):
		// the settings in force stay as they were.
		return
	}
	// A running config went away after the next one started: whatever
	// remains is running, and the newest settings take hold.
	var newest *zoneUser
	for _, v := range e.users {
		v.confirmed = true
		if newest == nil || v.gen > newest.gen {
			newest = v
		}
	}
	if err := e.zone.settle(newest.fleet, newest.fair); err != nil {
		// Its store was provisioned with its config, and opens without
		// I/O: should it fail, the zone counts here alone, and says why.
		if fo, ok := e.zone.obs.(FleetObserver); ok {
			fo.StoreReached(store.State{}, err)
		}
	}
	e.zone.SetLimits(newest.limits)
}

// sweep forgets zones that no config uses and that hold no connection.
// Lock held.
func (r *Registry) sweep() {
	drained := func(e *zoneEntry) bool {
		if len(e.users) > 0 {
			return false
		}
		a, w := e.zone.Counts()
		if a != 0 || w != 0 {
			return false
		}
		e.zone.leaveFleet()
		return true
	}
	for name, e := range r.named {
		if drained(e) {
			delete(r.named, name)
		}
	}
	kept := r.private[:0]
	for _, e := range r.private {
		if !drained(e) {
			kept = append(kept, e)
		}
	}
	clear(r.private[len(kept):])
	r.private = kept
}

// Zone returns the named zone, if it is known.
func (r *Registry) Zone(name string) (*Zone, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sweep()
	e, ok := r.named[name]
	if !ok {
		return nil, false
	}
	return e.zone, true
}

// Zones returns the named zones sorted by name, then the private zones in
// the order they were made. Zones that no config uses any more are listed
// until their connections are gone.
func (r *Registry) Zones() []*Zone {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sweep()
	zs := make([]*Zone, 0, len(r.named)+len(r.private))
	for _, e := range r.named {
		zs = append(zs, e.zone)
	}
	sort.Slice(zs, func(i, j int) bool { return zs[i].name < zs[j].name })
	for _, e := range r.private {
		zs = append(zs, e.zone)
	}
	return zs
}
