// Package forwarder is natbox's mapping table and flow engine: it matches
// flows to mappings, applies policy and admission budgets, dials targets,
// splices TCP with half-close and runs its own endpoint-independent UDP
// session table. It sees flows (addresses, conns, datagrams), never packets,
// so it is tested with loopback sockets alone.
package forwarder

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

const defaultDialTimeout = 5 * time.Second

// Ingress is where a flow came in; cmd adapts a netstack.Stack to it.
// Implementations must be comparable (pointers): a UDP session compares the
// ingress of each datagram with the one its replies go to.
type Ingress interface {
	Name() string                                           // conf.IngressTUN or conf.IngressUplink
	WriteUDP(src, dst netip.AddrPort, payload []byte) error // reply datagram toward a client
}

// Dialer opens the host-side leg of a TCP flow.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// Clock tells the time for expiry, review dates and UDP idleness; tests
// inject a fake one.
type Clock interface{ Now() time.Time }

type wallClock struct{}

func (wallClock) Now() time.Time { return time.Now() }

// Options are the engine's dependencies and knobs; the zero value is usable.
type Options struct {
	// Dialer opens TCP legs to targets. Nil: a net.Dialer with TCP keepalive;
	// the dial timeout always comes from limits.dial_timeout.
	Dialer Dialer
	// Clock defaults to the wall clock.
	Clock Clock
	// ConnLog, when set, receives one info line per closed session while the
	// config's log.connections is true (audits, fail2ban). Nil: none.
	ConnLog *zap.Logger
	// SweepInterval is how often mapping expiry and review dates are
	// checked. Zero: one second.
	SweepInterval time.Duration
	// IdleCheckInterval caps how long an idle check may sleep; the idle
	// decision itself always uses Clock. Zero: sleep until the idle timeout
	// could next fire. Tests with a fake clock set it small.
	IdleCheckInterval time.Duration
	// Egress, when set, originates every flow through it from the client's
	// own address instead of dialing from the host (the relay's tunnel).
	Egress Egress
	// QuietRules logs loaded mappings and reloads at debug, not info: the
	// relay re-derives its rules whenever a peer's ports change.
	QuietRules bool
	// UDPQueueLen is how many datagrams a UDP session buffers toward its
	// target (including while it dials) before dropping. Zero: 2048.
	UDPQueueLen int
	// BufferBudget bounds, in bytes, the buffers that grow with traffic:
	// the large splice buffers of bulk transfers and queued UDP datagrams
	// (see bufBudget). Zero: unlimited.
	BufferBudget int
	// NoUDPProbation admits a new UDP source by eviction on its first
	// datagram (see probation): for tests of the eviction order itself.
	NoUDPProbation bool

	// Test seams, so a test can wait for a check instead of sleeping:
	// onSweep runs after each expiry sweep, onIdleCheck after each idle
	// check of a session (on the goroutine that reads it). Neither may block.
	onSweep     func()
	onIdleCheck func(expired bool)
	// keepAliveDelay replaces defaultKeepAliveDelay; onKeepAlive runs after
	// a target socket's keepalive was set.
	keepAliveDelay time.Duration
	onKeepAlive    func(c net.Conn, err error)
}

// Engine forwards flows according to the current RuleSet. It is safe for
// concurrent use; HandleTCP and HandleUDP may be called from any goroutine.
type Engine struct {
	log     *zap.Logger
	connLog *zap.Logger
	dialer  Dialer
	clock   Clock
	opts    Options

	rules     atomic.Pointer[RuleSet]
	unmatched *mappingState // refusals of flows that matched no mapping
	budget    budgets
	slots     atomic.Int64 // session slots reserved across all mappings
	tcpSlots  atomic.Int64 // ... of them TCP, against limits.max_tcp_sessions
	udpSlots  atomic.Int64 // ... of them UDP, against limits.max_udp_sessions
	sources   sourceTable  // per-source session counts and rate buckets
	active    atomic.Int64 // registered sessions
	nextID    atomic.Uint64
	closing   atomic.Bool
	udp       udpTable
	probation *probation // UDP sources that need an eviction to get a session
	bufs      *bufBudget // nil: unlimited

	ctx    context.Context // cancelled when the engine stops: aborts dials
	cancel context.CancelFunc

	reloadMu sync.Mutex // serialises Reload and the expiry sweep's closing

	mu sync.Mutex // mu guards the following fields
	// flows counts handler calls and session goroutines; Add only under mu
	// while !stopping, so Shutdown's Wait never races an Add from zero.
	flows    sync.WaitGroup
	stopping bool
	forced   bool // Shutdown's grace ended: new registrations close at once
	states   map[string]*mappingState
	groups   map[string]*groupState
	sessions map[uint64]*session

	running     bool          // guarded by mu: Run started the sweep
	stopSweep   chan struct{} // closed by Shutdown: ends Run
	sweepDone   chan struct{} // closed when Run's sweep returns
	stoppedOnce sync.Once     // the "stopped" line is logged once, however often Shutdown runs
	stopOnce    sync.Once

	beforeUDPSend func(mapping string) // test seam: a slow target; set before traffic

	// lazyKeepAlive: the default dialer dials without keepalive and
	// armKeepAlive sets it on sessions that live long enough.
	lazyKeepAlive bool
}

// New compiles cfg and builds the engine; it starts no goroutine. The
// engine forwards the flows handed to it from then on; Run runs its expiry
// sweep. Stop it with Shutdown or Close.
func New(cfg *conf.Config, opts Options, log *zap.Logger) (*Engine, error) {
	rs, err := Compile(cfg)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	if opts.Clock == nil {
		opts.Clock = wallClock{}
	}
	lazyKeepAlive := opts.Dialer == nil
	if lazyKeepAlive {
		// Keepalive comes later (armKeepAlive), once a session outlives
		// keepAliveDelay: most connections end sooner.
		opts.Dialer = &net.Dialer{KeepAlive: -1}
	}
	if opts.keepAliveDelay <= 0 {
		opts.keepAliveDelay = defaultKeepAliveDelay
	}
	if opts.SweepInterval <= 0 {
		opts.SweepInterval = time.Second
	}
	if opts.UDPQueueLen <= 0 {
		// The relay hands over bursts of up to 128 datagrams, and a sender
		// waiting for a CPU falls milliseconds behind a fast client; the
		// queue only takes memory while it holds datagrams.
		opts.UDPQueueLen = 2048
	}
	e := &Engine{
		log:       log,
		connLog:   opts.ConnLog,
		dialer:    opts.Dialer,
		clock:     opts.Clock,
		opts:      opts,
		unmatched: &mappingState{},
		states:    make(map[string]*mappingState),
		groups:    make(map[string]*groupState),
		sessions:  make(map[uint64]*session),
		udp:       udpTable{m: make(map[udpKey]*udpSession), replies: make(map[replyKey]*udpSession)},
		stopSweep: make(chan struct{}),
		sweepDone: make(chan struct{}),
	}
	e.lazyKeepAlive = lazyKeepAlive
	e.budget.init()
	e.bufs = newBufBudget(opts.BufferBudget, log)
	e.sources.init()
	e.probation = newProbation(e.clock.Now())
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.bindStates(rs)
	e.rules.Store(rs)
	for _, r := range rs.rules {
		e.log.Info("mapping loaded", ruleFields(r)...)
	}
	e.log.Info("forwarder started", zap.Int("count", len(rs.rules)))
	return e, nil
}

// ErrStopped is returned by Run on an engine that Shutdown or Close
// stopped, and by a second Run.
var ErrStopped = errors.New("forwarder: engine stopped")

// Run runs the expiry sweep (mapping expires and review_by dates, idle
// per-source state) until ctx is done or the engine stops. When ctx ends
// it closes the engine (Close: no grace; call Shutdown first to drain). It
// starts no goroutine: the sweep runs on the caller's, and flows' own
// goroutines belong to the engine, which Shutdown waits for.
func (e *Engine) Run(ctx context.Context) error {
	e.mu.Lock()
	if e.stopping || e.running {
		e.mu.Unlock()
		return ErrStopped
	}
	e.running = true
	e.mu.Unlock()
	e.runSweep(ctx)
	if ctx.Err() != nil {
		return e.Close()
	}
	return nil
}

func ruleFields(r *Rule) []zap.Field {
	m := &r.Mapping
	return []zap.Field{
		zap.String("rule", r.Name), zap.String("proto", m.Protocol.String()), zap.String("listen", m.Listen.String()),
		zap.String("target", m.Target.String()), zap.Bool("enabled", r.enabled),
	}
}

// bindStates attaches each rule to its name's persistent counters, creating
// them for new names, and drops the states of names no longer configured.
func (e *Engine) bindStates(rs *RuleSet) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range rs.rules {
		st := e.states[r.Name]
		if st == nil {
			st = &mappingState{name: r.Name}
			e.states[r.Name] = st
		}
		r.state = st
		if r.groupName != "" {
			g := e.groups[r.groupName]
			if g == nil {
				g = &groupState{}
				e.groups[r.groupName] = g
			}
			r.group = g
		}
	}
	for name := range e.states {
		if _, ok := rs.byName[name]; !ok {
			delete(e.states, name)
		}
	}
	inUse := make(map[*groupState]bool, len(e.groups))
	for _, r := range rs.rules {
		inUse[r.group] = true
	}
	for name, g := range e.groups {
		if !inUse[g] {
			delete(e.groups, name)
		}
	}
}

// track registers a flow goroutine; false once shutting down.
func (e *Engine) track() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopping {
		return false
	}
	e.flows.Add(1)
	return true
}

// admit counts a flow that matched r and applies r's address policy.
func (e *Engine) admit(r *Rule, src netip.Addr, now time.Time) refusal {
	r.state.hits.Add(1)
	r.state.lastUsed.Store(now.UnixNano())
	why := r.admits(src)
	if why != refusalNone {
		r.state.refuse(why)
	}
	return why
}

func (e *Engine) debugRefusal(r *Rule, proto conf.Proto, src, dst netip.AddrPort, why refusal, err error) {
	if ce := e.log.Check(zap.DebugLevel, "flow refused"); ce != nil {
		name := ""
		if r != nil {
			name = r.Name
		}
		fields := []zap.Field{zap.String("rule", name), zap.String("proto", proto.String()), zap.Stringer("src", src),
			zap.Stringer("dst", dst), zap.Stringer("reason", why)}
		if err != nil {
			fields = append(fields, zap.Error(err))
		}
		ce.Write(fields...)
	}
}

// session is one live TCP or UDP flow in the registry.
type session struct {
	id      uint64
	proto   conf.Proto // conf.TCP or conf.UDP
	ingress string
	client  netip.AddrPort
	public  netip.AddrPort
	target  string
	start   time.Time
	state   *mappingState
	slot    slot                 // its claim on the session budgets
	freed   atomic.Bool          // slot released (by finish, or early by a UDP eviction)
	rule    atomic.Pointer[Rule] // the current rule: Reload swaps it for survivors
	in, out atomic.Uint64        // bytes client->target, target->client
	idle    idleTimer
	reason  atomic.Pointer[string]
	stop    func() // closes the session's conns; idempotent
}

func (e *Engine) newSession(proto conf.Proto, in Ingress, r *Rule, src, dst netip.AddrPort, target string, sl slot) *session {
	s := &session{
		id: e.nextID.Add(1), proto: proto, ingress: in.Name(), client: src, public: dst, target: target,
		start: e.clock.Now(), state: r.state, slot: sl,
	}
	s.rule.Store(r)
	s.idle.clock = e.clock
	s.idle.checked = e.opts.onIdleCheck
	s.idle.maxSleep = e.opts.IdleCheckInterval
	s.idle.setIdle(r.idleFor(proto))
	s.idle.touch()
	return s
}

func (r *Rule) idleFor(p conf.Proto) time.Duration {
	if p == conf.UDP {
		return r.idleUDP
	}
	return r.idleTCP
}

// close ends the session; the first reason given wins.
func (s *session) close(reason string) {
	s.reason.CompareAndSwap(nil, &reason)
	s.stop()
}

func (s *session) info() SessionInfo {
	return SessionInfo{
		ID: s.id, Mapping: s.state.name, Protocol: s.proto.String(), Ingress: s.ingress,
		Client: s.client, Public: s.public, Target: s.target, Start: s.start,
		BytesIn: s.in.Load(), BytesOut: s.out.Load(), LastActivity: time.Unix(0, s.idle.last.Load()),
	}
}

// register adds a session admitted under rs to the registry; s.stop must be
// set. A session registered after Shutdown's grace ended closes at once. A
// Reload that swapped rules meanwhile either sees the session in the
// registry or is seen here, so no session escapes its verdict.
func (e *Engine) register(s *session, rs *RuleSet) {
	e.mu.Lock()
	forced := e.forced
	e.sessions[s.id] = s
	e.mu.Unlock()
	s.state.opened.Add(1)
	s.state.active.Add(1)
	e.active.Add(1)
	if ce := e.log.Check(zap.DebugLevel, "session opened"); ce != nil {
		ce.Write(zap.Uint64("session", s.id), zap.String("rule", s.state.name), zap.String("proto", s.proto.String()),
			zap.Stringer("src", s.client), zap.Stringer("dst", s.public), zap.String("target", s.target))
	}
	if forced {
		s.close("shutdown")
		return
	}
	if cur := e.rules.Load(); cur != rs {
		if reason := reloadVerdict(s, cur, e.clock.Now()); reason != "" {
			s.close(reason)
		}
	}
}

// finish removes a registered session, releases its slot and logs it.
func (e *Engine) finish(s *session, defaultReason string, err error) {
	e.mu.Lock()
	delete(e.sessions, s.id)
	e.mu.Unlock()
	s.state.active.Add(-1)
	e.active.Add(-1)
	e.freeSlot(s)
	reason := defaultReason
	if p := s.reason.Load(); p != nil {
		reason = *p
	}
	fields := []zap.Field{
		zap.Uint64("session", s.id), zap.String("rule", s.state.name), zap.String("proto", s.proto.String()),
		zap.Stringer("src", s.client), zap.Stringer("dst", s.public), zap.String("target", s.target),
		zap.Uint64("bytes_rx", s.in.Load()), zap.Uint64("bytes_tx", s.out.Load()),
		zap.Duration("duration", e.clock.Now().Sub(s.start)), zap.String("reason", reason),
	}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	if ce := e.log.Check(zap.DebugLevel, "session closed"); ce != nil {
		ce.Write(fields...)
	}
	if e.connLog != nil && e.rules.Load().connLog {
		e.connLog.Info("connection", fields...)
	}
}

// freeSlot releases s's session slot once.
func (e *Engine) freeSlot(s *session) {
	if s.freed.CompareAndSwap(false, true) {
		e.releaseSlot(s.slot)
	}
}

// liveSessions returns the registered sessions matching keep.
func (e *Engine) liveSessions(keep func(*session) bool) []*session {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []*session
	for _, s := range e.sessions {
		if keep(s) {
			out = append(out, s)
		}
	}
	return out
}

// Sessions lists every live session.
func (e *Engine) Sessions() []SessionInfo {
	live := e.liveSessions(func(*session) bool { return true })
	out := make([]SessionInfo, len(live))
	for i, s := range live {
		out[i] = s.info()
	}
	return out
}

// Snapshot returns the current counters of every configured mapping.
func (e *Engine) Snapshot() Status {
	rs := e.rules.Load()
	now := e.clock.Now()
	st := Status{
		Unmatched:      e.unmatched.refusalMap(),
		ActiveSessions: e.active.Load(),
		InflightDials:  e.budget.inflight(),
		ShuttingDown:   e.closing.Load(),
		TCPSessions:    e.tcpSlots.Load(),
		UDPSessions:    e.udpSlots.Load(),
		TrackedSources: e.sources.tracked(),
	}
	e.bufs.fill(&st)
	for _, r := range rs.rules {
		ms := r.state.snapshot()
		m := &r.Mapping
		ms.Protocol, ms.Listen, ms.Target = m.Protocol.String(), m.Listen.String(), m.Target.String()
		ms.Enabled, ms.Expired, ms.ReviewOverdue = r.enabled, r.expiredAt(now), reviewOverdue(r, now)
		ms.Expires, ms.ReviewBy = m.Expires, m.ReviewBy
		st.Mappings = append(st.Mappings, ms)
	}
	return st
}

// Shutdown stops admitting flows (they are refused as shutting_down), waits
// for live sessions to end until ctx is done, then closes the rest and
// waits for every goroutine the engine started. It is idempotent.
func (e *Engine) Shutdown(ctx context.Context) error {
	e.mu.Lock()
	e.stopping = true
	running := e.running
	e.mu.Unlock()
	e.closing.Store(true)
	e.stopOnce.Do(func() { close(e.stopSweep) })

	drained := make(chan struct{})
	go func() {
		e.flows.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-ctx.Done():
		e.mu.Lock()
		e.forced = true
		e.mu.Unlock()
		e.cancel()
		live := e.liveSessions(func(*session) bool { return true })
		for _, s := range live {
			s.close("shutdown")
		}
		if len(live) > 0 {
			e.log.Info("closed sessions at shutdown", zap.Int("count", len(live)))
		}
		<-drained
	}
	e.cancel()
	if running {
		<-e.sweepDone
	}
	e.stoppedOnce.Do(func() { e.log.Info("forwarder stopped") })
	return nil
}

// Close stops the engine at once: Shutdown with no grace.
func (e *Engine) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return e.Shutdown(ctx)
}

// budgets are the in-flight dial budgets: total, per source (a sourceKey:
// an IPv4 address or an IPv6 /64) and per target. They bound what dead or
// slow targets can tie up.
type budgets struct {
	mu        sync.Mutex // mu guards the following fields
	total     int
	perSource map[netip.Addr]int
	perTarget map[string]int
}

func (b *budgets) init() {
	b.perSource = make(map[netip.Addr]int)
	b.perTarget = make(map[string]int)
}

func (b *budgets) acquire(l conf.Limits, src netip.Addr, target string) refusal {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case l.MaxInflight > 0 && b.total >= l.MaxInflight:
		return refusedInflight
	case l.MaxInflightPerSource > 0 && b.perSource[src] >= l.MaxInflightPerSource:
		return refusedInflightSource
	case l.MaxInflightPerTarget > 0 && b.perTarget[target] >= l.MaxInflightPerTarget:
		return refusedInflightTarget
	}
	b.total++
	b.perSource[src]++
	b.perTarget[target]++
	return refusalNone
}

func (b *budgets) release(src netip.Addr, target string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.total--
	if b.perSource[src]--; b.perSource[src] <= 0 {
		delete(b.perSource, src)
	}
	if b.perTarget[target]--; b.perTarget[target] <= 0 {
		delete(b.perTarget, target)
	}
}

func (b *budgets) inflight() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.total
}

// dialTimeout is limits.dial_timeout, or the default when unset.
func (rs *RuleSet) dialTimeout() time.Duration {
	if d := rs.limits.DialTimeout.D(); d > 0 {
		return d
	}
	return defaultDialTimeout
}

// isExpectedClose reports whether err is the normal end of a conn we or the
// peer closed, which is not worth more than debug.
func isExpectedClose(err error) bool {
	return err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, context.Canceled)
}
