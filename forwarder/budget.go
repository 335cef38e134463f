package forwarder

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"time"

	"github.com/natbox/natbox/conf"
)

// sourceKey is the address a source's budgets are counted under: an IPv4
// address, or the /64 of an IPv6 address (one subscriber's usual
// allocation, so hopping across its addresses buys nothing). IPv4-mapped
// IPv6 addresses count as the IPv4 address.
func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is4() {
		return a
	}
	p, err := a.WithZone("").Prefix(64)
	if err != nil {
		return a
	}
	return p.Addr()
}

// sourceShards spreads the per-source tables over independent locks, so
// admissions from different sources rarely wait for each other.
const sourceShards = 16

// sourceTable holds the per-source budgets of every mapping: how many
// sessions each source has open per protocol, and its new-session token
// bucket. Session counts exist only while sessions do, so the session pools
// bound them; buckets are bounded by maxTracked (see allow).
type sourceTable struct {
	shards [sourceShards]sourceShard
}

type sourceShard struct {
	mu sync.Mutex // mu guards the following fields
	// sessions counts open sessions per mapping, protocol and source, for
	// the flows admitted under a per-source cap.
	sessions map[sourceSessionKey]int32
	buckets  map[bucketKey]*bucket
	lru      bucket // sentinel: lru.next is the least recently used bucket
	_        [64]byte
}

type sourceSessionKey struct {
	st    *mappingState
	proto conf.Proto
	src   netip.Addr // a sourceKey
}

type bucketKey struct {
	st  *mappingState
	src netip.Addr // a sourceKey
}

// bucket is one source's new-session token bucket on one mapping, linked
// into its shard's LRU ring.
type bucket struct {
	key        bucketKey
	tokens     float64
	last       int64 // unix nanos of the last refill
	fullAt     int64 // unix nanos from which it would be full again: forgetting it changes nothing
	prev, next *bucket
}

func (t *sourceTable) init() {
	for i := range t.shards {
		s := &t.shards[i]
		s.sessions = make(map[sourceSessionKey]int32)
		s.buckets = make(map[bucketKey]*bucket)
		s.lru.prev, s.lru.next = &s.lru, &s.lru
	}
}

func (t *sourceTable) shard(src netip.Addr) *sourceShard {
	b := src.As16()
	h := binary.LittleEndian.Uint64(b[:8]) ^ binary.LittleEndian.Uint64(b[8:])
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return &t.shards[h%sourceShards]
}

// acquireSession counts a new session of src (a sourceKey) on st unless it
// already has limit of them; limit must be positive.
func (t *sourceTable) acquireSession(k sourceSessionKey, limit int) bool {
	s := t.shard(k.src)
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.sessions[k]
	if int(n) >= limit {
		return false
	}
	s.sessions[k] = n + 1
	return true
}

func (t *sourceTable) releaseSession(k sourceSessionKey) {
	s := t.shard(k.src)
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.sessions[k] - 1; n > 0 {
		s.sessions[k] = n
	} else {
		delete(s.sessions, k)
	}
}

// allow takes a token from the bucket of k (rate per second, burst at
// most) at now and reports whether there was one. A shard keeps at most
// maxPerShard buckets: a new source past that replaces the least recently
// seen one, counted on that bucket's mapping (rateEvicted), and the
// forgotten source starts over with a full burst when it comes back. So a
// flood from more sources than are tracked costs memory up to the bound and
// no more; its price is a weaker rate cap for sources pushed out of the
// table, while the session pools and per-source caps still hold.
func (t *sourceTable) allow(k bucketKey, now time.Time, rate, burst float64, maxPerShard int) bool {
	s := t.shard(k.src)
	ts := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buckets[k]
	switch {
	case b != nil:
		s.unlinkLocked(b)
		if elapsed := ts - b.last; elapsed > 0 {
			b.tokens = min(burst, b.tokens+float64(elapsed)*rate/float64(time.Second))
			b.last = ts
		}
	case len(s.buckets) >= maxPerShard && s.lru.next != &s.lru:
		b = s.lru.next
		s.unlinkLocked(b)
		delete(s.buckets, b.key)
		b.key.st.rateEvicted.Add(1)
		*b = bucket{key: k, tokens: burst, last: ts}
		s.buckets[k] = b
	default:
		b = &bucket{key: k, tokens: burst, last: ts}
		s.buckets[k] = b
	}
	ok := b.tokens >= 1
	if ok {
		b.tokens--
	}
	b.fullAt = ts + int64((burst-b.tokens)/rate*float64(time.Second))
	// Link as most recently used.
	b.prev, b.next = s.lru.prev, &s.lru
	s.lru.prev.next = b
	s.lru.prev = b
	return ok
}

func (s *sourceShard) unlinkLocked(b *bucket) {
	b.prev.next = b.next
	b.next.prev = b.prev
	b.prev, b.next = nil, nil
}

// sweep forgets buckets that have refilled (a source that comes back gets
// a fresh full one, the same thing), so memory shrinks after a flood. It
// walks each shard from its least recently used bucket and stops at the
// first that is not full yet.
func (t *sourceTable) sweep(now time.Time) {
	ts := now.UnixNano()
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for b := s.lru.next; b != &s.lru && b.fullAt <= ts; b = s.lru.next {
			s.unlinkLocked(b)
			delete(s.buckets, b.key)
		}
		s.mu.Unlock()
	}
}

// tracked returns how many rate buckets are kept.
func (t *sourceTable) tracked() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.buckets)
		s.mu.Unlock()
	}
	return n
}

// slot is one admitted session's claim on the session budgets: its
// mapping's max_sessions, its protocol's pool, max_sessions, and (when
// perSource) its source's cap on the mapping.
type slot struct {
	src       sourceSessionKey
	perSource bool
	group     *groupState // nil: in no group
}

// reserveSlot takes a session slot for a src (a sourceKey) flow of proto
// (conf.TCP or conf.UDP) on r, checking in order the mapping's
// max_sessions, max_sessions, the protocol's pool (0: unlimited) and the
// source's cap on the mapping. max_sessions goes before the pools so a
// config written before they existed refuses for the same reason as then.
func (e *Engine) reserveSlot(rs *RuleSet, r *Rule, proto conf.Proto, src netip.Addr) (slot, refusal) {
	st := r.state
	sl := slot{src: sourceSessionKey{st: st, proto: proto, src: src}}
	if why := r.group.reserve(r.quota, proto); why != refusalNone {
		return sl, why
	}
	sl.group = r.group
	if why := e.reserveShared(rs, r, proto, src, &sl); why != refusalNone {
		sl.group.release(proto)
		return sl, why
	}
	return sl, refusalNone
}

// reserveShared is reserveSlot past the group's quota.
func (e *Engine) reserveShared(rs *RuleSet, r *Rule, proto conf.Proto, src netip.Addr, sl *slot) refusal {
	st := r.state
	if n := st.slots.Add(1); r.Mapping.MaxSessions > 0 && n > int64(r.Mapping.MaxSessions) {
		st.slots.Add(-1)
		return refusedMappingSessions
	}
	if n := e.slots.Add(1); rs.limits.MaxSessions > 0 && n > int64(rs.limits.MaxSessions) {
		e.slots.Add(-1)
		st.slots.Add(-1)
		return refusedSessions
	}
	pool, limit, why, perSource := &e.tcpSlots, rs.tcpPool, refusedTCPSessions, r.budget.MaxTCPSessions
	if proto == conf.UDP {
		pool, limit, why, perSource = &e.udpSlots, rs.udpPool, refusedUDPSessions, r.budget.MaxUDPSessions
	}
	if n := pool.Add(1); limit > 0 && n > int64(limit) {
		pool.Add(-1)
		e.slots.Add(-1)
		st.slots.Add(-1)
		return why
	}
	if perSource > 0 {
		if !e.sources.acquireSession(sl.src, perSource) {
			pool.Add(-1)
			e.slots.Add(-1)
			st.slots.Add(-1)
			return refusedSourceSessions
		}
		sl.perSource = true
	}
	return refusalNone
}

func (e *Engine) releaseSlot(sl slot) {
	sl.src.st.slots.Add(-1)
	if sl.src.proto == conf.UDP {
		e.udpSlots.Add(-1)
	} else {
		e.tcpSlots.Add(-1)
	}
	e.slots.Add(-1)
	if sl.perSource {
		e.sources.releaseSession(sl.src)
	}
	sl.group.release(sl.src.proto)
}

// allowNew applies r's new-session rate to src (a sourceKey) at now, then
// its group's: a source over its own rate does not spend the group's tokens.
func (e *Engine) allowNew(rs *RuleSet, r *Rule, src netip.Addr, now time.Time) refusal {
	if r.budget.RatePerSecond > 0 &&
		!e.sources.allow(bucketKey{st: r.state, src: src}, now, float64(r.budget.RatePerSecond), float64(r.budget.Burst), rs.trackedPerShard) {
		return refusedSourceRate
	}
	if !r.group.allow(r.quota, now) {
		return refusedGroupRate
	}
	return refusalNone
}
