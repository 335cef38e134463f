package forwarder

import (
	"net/netip"
	"sync/atomic"
	"time"
)

// refusal is why a flow was not forwarded. The set is fixed, so it is a
// bounded metric label.
type refusal uint8

const (
	refusalNone refusal = iota
	refusedNoMatch
	refusedDenied
	refusedNotAllowed
	refusedInflight
	refusedInflightSource
	refusedInflightTarget
	refusedMappingSessions
	refusedSessions
	refusedTCPSessions
	refusedUDPSessions
	refusedSourceSessions
	refusedSourceRate
	refusedDialFailed
	refusedShuttingDown
	refusedHandshakeTimeout
	refusedGroupSessions
	refusedGroupUDPSessions
	refusedGroupInflight
	refusedGroupRate
	refusedProbation
	numRefusals
)

var refusalNames = [numRefusals]string{
	refusalNone:            "",
	refusedNoMatch:         "no_match",
	refusedDenied:          "denied",
	refusedNotAllowed:      "not_allowed",
	refusedInflight:        "over_limit_inflight",
	refusedInflightSource:  "over_limit_inflight_per_source",
	refusedInflightTarget:  "over_limit_inflight_per_target",
	refusedMappingSessions: "over_limit_mapping_sessions",
	refusedSessions:        "over_limit_sessions",
	refusedTCPSessions:     "over_limit_tcp_sessions",
	refusedUDPSessions:     "over_limit_udp_sessions",
	refusedSourceSessions:  "over_limit_sessions_per_source",
	refusedSourceRate:      "over_limit_rate_per_source",
	refusedDialFailed:      "dial_failed",
	refusedShuttingDown:    "shutting_down",
	// The target was dialed but the client never completed its handshake
	// (e.g. a spoofed SYN); the target connection was closed at once.
	refusedHandshakeTimeout: "handshake_timeout",
	// A group's Quota; the relay's groups are its peers.
	refusedGroupSessions:    "over_limit_peer_sessions",
	refusedGroupUDPSessions: "over_limit_peer_udp_sessions",
	refusedGroupInflight:    "over_limit_peer_inflight",
	refusedGroupRate:        "over_limit_peer_rate",
	// A new UDP source whose session needed an eviction sent its first
	// datagram: dropped, its second admitted (see probation).
	refusedProbation: "udp_probation",
}

func (r refusal) String() string { return refusalNames[r] }

// RefusalReasons lists every refusal reason label, for exporters that want
// every series present from the start.
func RefusalReasons() []string { return append([]string(nil), refusalNames[refusedNoMatch:]...) }

// DialLatencyBounds are the upper bounds of the dial latency histogram
// buckets; a final +Inf bucket is implied.
var dialLatencyBounds = [...]time.Duration{
	time.Millisecond, 5 * time.Millisecond, 25 * time.Millisecond, 100 * time.Millisecond,
	250 * time.Millisecond, time.Second, 2500 * time.Millisecond, 10 * time.Second,
}

// DialLatencyBounds returns the histogram bucket upper bounds.
func DialLatencyBounds() []time.Duration {
	return append([]time.Duration(nil), dialLatencyBounds[:]...)
}

// mappingState is what outlives a Rule across reloads for one mapping name:
// its counters and warning bookkeeping. Counters are atomics so the flow
// path never takes a lock to count.
type mappingState struct {
	name string

	opened, hits         atomic.Uint64
	active               atomic.Int64 // registered sessions
	slots                atomic.Int64 // reserved session slots (dialing + registered), for max_sessions
	bytesIn, bytesOut    atomic.Uint64
	lastUsed             atomic.Int64 // unix nanos
	refusals             [numRefusals]atomic.Uint64
	budgetHits           atomic.Uint64
	udpExpired, udpDrops atomic.Uint64
	tcpExpired           atomic.Uint64
	resetsToClient       atomic.Uint64
	resetsToTarget       atomic.Uint64
	udpEvicted           atomic.Uint64 // unassured UDP sessions evicted for a new one
	rateEvicted          atomic.Uint64 // rate buckets dropped past max_tracked_sources
	dialCount, dialNanos atomic.Uint64
	dialBuckets          [len(dialLatencyBounds) + 1]atomic.Uint64

	// unassured lists this mapping's UDP sessions that have had no reply
	// yet, oldest first; guarded by the engine's udpTable.mu.
	unassured udpList

	// targetDown: the last dial to the target failed (set by refuse,
	// cleared by observeDial), for the status page's dead-target warning.
	targetDown atomic.Bool

	// Touched only by the sweep goroutine.
	warnedExpiry   int64 // the expires (unix nanos) already warned about
	lastReviewWarn time.Time
}

func (m *mappingState) refuse(r refusal) {
	m.refusals[r].Add(1)
	switch r {
	case refusedInflight, refusedInflightSource, refusedInflightTarget:
		m.budgetHits.Add(1)
	case refusedDialFailed:
		m.targetDown.Store(true)
	}
}

func (m *mappingState) observeDial(d time.Duration) {
	m.targetDown.Store(false)
	m.dialCount.Add(1)
	m.dialNanos.Add(uint64(max(d, 0)))
	i := 0
	for i < len(dialLatencyBounds) && d > dialLatencyBounds[i] {
		i++
	}
	m.dialBuckets[i].Add(1)
}

// Status is a point-in-time copy of the engine's counters; it holds no
// references into the engine, so callers may keep and format it freely.
type Status struct {
	Mappings       []MappingStatus   // config order
	Unmatched      map[string]uint64 // refusals of flows no mapping took, by reason
	ActiveSessions int64
	InflightDials  int
	ShuttingDown   bool
	// TCPSessions and UDPSessions are the slots taken from each protocol's
	// pool (sessions open or being dialed); TrackedSources is how many
	// new-session rate buckets are kept.
	TCPSessions, UDPSessions int64
	TrackedSources           int
	// The buffer budget (Options.BufferBudget; 0: unlimited), the bytes
	// of it in use, and the buffers it refused: a splice read kept to its
	// small buffer, or a datagram dropped.
	BufferBudgetBytes int64
	BufferUsedBytes   int64
	BufferDenied      uint64
}

// MappingStatus is one mapping's configuration summary and counters.
// Counters are monotonic for the life of the mapping name, across reloads.
type MappingStatus struct {
	Name          string
	Protocol      string
	Listen        string
	Target        string
	Enabled       bool
	Expired       bool
	ReviewOverdue bool
	Expires       time.Time
	ReviewBy      time.Time

	Hits           uint64 // flows that matched (sessions opened or refused after matching)
	SessionsOpened uint64
	SessionsActive int64
	BytesIn        uint64 // client to target
	BytesOut       uint64 // target to client
	LastUsed       time.Time
	Refusals       map[string]uint64 // by reason, every reason present
	BudgetHits     uint64            // refusals by any in-flight budget
	UDPExpired     uint64            // UDP sessions closed by the idle timeout
	UDPDropped     uint64            // datagrams dropped: full queue, failed dial, stray replies
	TCPExpired     uint64            // TCP sessions reset by the idle timeout
	ResetsToClient uint64            // RSTs passed to the client: the target reset, or its leg failed
	ResetsToTarget uint64            // RSTs passed to the target: the client reset (also during its handshake), or its leg failed
	UDPEvicted     uint64            // UDP sessions with no reply yet, evicted to admit a new one when a pool was full
	DialLatency    Histogram

	// RateSourcesEvicted counts sources whose new-session rate bucket was
	// dropped because max_tracked_sources was reached (they start over
	// with a full burst).
	RateSourcesEvicted uint64

	// TargetDown reports whether the last dial to the target failed (a
	// refused, unreachable or silent target); the next good dial clears it.
	TargetDown bool
}

// Histogram is a latency histogram in Prometheus shape: Buckets[i] counts
// observations <= Bounds[i] (cumulative); Count includes the +Inf bucket.
type Histogram struct {
	Count   uint64
	Sum     time.Duration
	Bounds  []time.Duration
	Buckets []uint64
}

func (m *mappingState) snapshot() MappingStatus {
	s := MappingStatus{
		Name:           m.name,
		Hits:           m.hits.Load(),
		SessionsOpened: m.opened.Load(),
		SessionsActive: m.active.Load(),
		BytesIn:        m.bytesIn.Load(),
		BytesOut:       m.bytesOut.Load(),
		Refusals:       m.refusalMap(),
		BudgetHits:     m.budgetHits.Load(),
		UDPExpired:     m.udpExpired.Load(),
		UDPDropped:     m.udpDrops.Load(),
		TCPExpired:     m.tcpExpired.Load(),
		ResetsToClient: m.resetsToClient.Load(),
		ResetsToTarget: m.resetsToTarget.Load(),
		UDPEvicted:     m.udpEvicted.Load(),

		RateSourcesEvicted: m.rateEvicted.Load(),
		TargetDown:         m.targetDown.Load(),
	}
	if t := m.lastUsed.Load(); t != 0 {
		s.LastUsed = time.Unix(0, t)
	}
	h := Histogram{Count: m.dialCount.Load(), Sum: time.Duration(m.dialNanos.Load()), Bounds: DialLatencyBounds()}
	var cum uint64
	for i := range dialLatencyBounds {
		cum += m.dialBuckets[i].Load()
		h.Buckets = append(h.Buckets, cum)
	}
	s.DialLatency = h
	return s
}

func (m *mappingState) refusalMap() map[string]uint64 {
	out := make(map[string]uint64, numRefusals-1)
	for r := refusedNoMatch; r < numRefusals; r++ {
		out[r.String()] = m.refusals[r].Load()
	}
	return out
}

// SessionInfo describes one live session.
type SessionInfo struct {
	ID           uint64
	Mapping      string
	Protocol     string // "tcp" or "udp"
	Ingress      string
	Client       netip.AddrPort // the real client address
	Public       netip.AddrPort // the public address and port the client reached
	Target       string         // host:port dialed
	Start        time.Time
	BytesIn      uint64 // client to target
	BytesOut     uint64 // target to client
	LastActivity time.Time
}
