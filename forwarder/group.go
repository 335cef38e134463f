package forwarder

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/natbox/natbox/conf"
)

// Quota is a budget several mappings share: on the relay, everything one
// peer's ports may take, so one peer cannot exhaust the relay for the
// others. Zero fields are unlimited. Its refusals are counted on the
// mapping that was refused, as over_limit_peer_*.
type Quota struct {
	MaxSessions    int // TCP and UDP sessions together
	MaxUDPSessions int
	MaxInflight    int // TCP dials in progress
	RatePerSecond  int // new sessions per second, all sources together
	Burst          int // the rate's bucket; 0: twice the rate
}

// Groups put mappings under shared quotas.
type Groups struct {
	Quotas map[string]Quota  // by group name
	Of     map[string]string // mapping name -> group name; absent: no group
}

// groupState is a group's live counts; it outlives reloads while its name
// is in use. A nil *groupState (a mapping in no group) admits everything.
type groupState struct {
	sessions, udp, inflight atomic.Int64

	// unassured lists the group's UDP sessions with no reply yet, oldest
	// first, which a full quota evicts first; guarded by udpTable.mu.
	unassured udpList

	mu     sync.Mutex // mu guards the rate bucket
	tokens float64
	last   int64 // unix nanos of the last refill; 0: full
}

func (g *groupState) reserve(q Quota, proto conf.Proto) refusal {
	if g == nil {
		return refusalNone
	}
	if n := g.sessions.Add(1); q.MaxSessions > 0 && n > int64(q.MaxSessions) {
		g.sessions.Add(-1)
		return refusedGroupSessions
	}
	if proto == conf.UDP {
		if n := g.udp.Add(1); q.MaxUDPSessions > 0 && n > int64(q.MaxUDPSessions) {
			g.udp.Add(-1)
			g.sessions.Add(-1)
			return refusedGroupUDPSessions
		}
	}
	return refusalNone
}

func (g *groupState) release(proto conf.Proto) {
	if g == nil {
		return
	}
	g.sessions.Add(-1)
	if proto == conf.UDP {
		g.udp.Add(-1)
	}
}

// allow takes a new-session token at now.
func (g *groupState) allow(q Quota, now time.Time) bool {
	if g == nil || q.RatePerSecond <= 0 {
		return true
	}
	burst := float64(q.Burst)
	if burst <= 0 {
		burst = 2 * float64(q.RatePerSecond)
	}
	ts := now.UnixNano()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.last == 0 {
		g.tokens = burst
	} else if elapsed := ts - g.last; elapsed > 0 {
		g.tokens = min(burst, g.tokens+float64(elapsed)*float64(q.RatePerSecond)/float64(time.Second))
	}
	if ts > g.last {
		g.last = ts
	}
	if g.tokens < 1 {
		return false
	}
	g.tokens--
	return true
}

// acquireDial takes the in-flight dial budgets: the group's, then the
// engine's (total, per source, per target).
func (e *Engine) acquireDial(rs *RuleSet, r *Rule, src netip.Addr, target string) refusal {
	if g := r.group; g != nil {
		if n := g.inflight.Add(1); r.quota.MaxInflight > 0 && n > int64(r.quota.MaxInflight) {
			g.inflight.Add(-1)
			return refusedGroupInflight
		}
	}
	why := e.budget.acquire(rs.limits, src, target)
	if why != refusalNone && r.group != nil {
		r.group.inflight.Add(-1)
	}
	return why
}

func (e *Engine) releaseDial(r *Rule, src netip.Addr, target string) {
	e.budget.release(src, target)
	if r.group != nil {
		r.group.inflight.Add(-1)
	}
}
