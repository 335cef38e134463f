package tunnel

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/gostack"
)

// The relay's public flows run through a forwarder.Engine: admission,
// budgets, the session registry, UDP sessions and idle, connection logs.
// The relay hands it one mapping per held (protocol, port), named
// "peer/proto/port", whose target is the peer's tunnel address and the same
// port, and an egress that originates each flow inside the tunnel from the
// client's own address.

// relayIngress is the name of the relay's public side as the engine sees it.
const relayIngress = "relay"

// neverIdle stands for "no idle timeout" in a mapping, which cannot say
// zero (zero means the default).
const neverIdle = conf.Duration(100 * 365 * 24 * time.Hour)

// ruleName names the mapping of holding k of peer.
func ruleName(peer string, k portKey) string { return peer + "/" + k.String() }

// newEngine builds the relay's engine with no rules yet.
func (r *Relay) newEngine() (*forwarder.Engine, error) {
	cfg, _ := r.engineConfigLocked() // no holdings yet: no groups
	bufs, _ := conf.BufferShares(r.cfg.Relay.BufferMemory, 1)
	return forwarder.New(cfg, forwarder.Options{
		BufferBudget: bufs,
		Egress:       relayEgress{r},
		ConnLog:      r.log.Named("conn"),
		QuietRules:   true,
	}, r.log.Named("forwarder"))
}

// engineConfigLocked is the engine's config for the relay as it is now:
// the [relay] limits, one mapping per holding with its peer's per-source
// budgets, and one group per peer with its quotas.
func (r *Relay) engineConfigLocked() (*conf.Config, forwarder.Groups) {
	g := forwarder.Groups{Quotas: make(map[string]forwarder.Quota), Of: make(map[string]string)}
	lim := r.limits.Load()
	c := &conf.Config{
		Log: conf.Log{Connections: r.cfg.Log.Connections},
		Limits: conf.Limits{
			DialTimeout: conf.Duration(lim.dialTimeout),
			MaxSessions: int(lim.maxSessions),
			// One pool for both protocols, as relay.max_sessions always was.
			MaxTCPSessions: int(lim.maxSessions),
			MaxUDPSessions: int(lim.maxSessions),
		},
	}
	names := make([]string, 0, len(r.peers))
	for name := range r.peers {
		names = append(names, name)
	}
	sort.Strings(names)
	tcpIdle := conf.Duration(r.opts.tcpIdleTimeout)
	if tcpIdle <= 0 {
		tcpIdle = neverIdle // the appliance's mapping owns TCP idleness
	}
	for _, name := range names {
		p := r.peers[name]
		pl := r.cfg.Relay.PeerLimits(&p.cfg)
		g.Quotas[p.name] = forwarder.Quota{
			MaxSessions: pl.MaxSessions, MaxUDPSessions: pl.MaxUDPSessions, MaxInflight: pl.MaxInflight,
			RatePerSecond: pl.NewSessionsPerSecond, Burst: pl.NewSessionsBurst,
		}
		keys := keysOf(p.holdings)
		compressKeys(keys) // sorts
		for _, k := range keys {
			h := p.holdings[k]
			ports := conf.PortRange{Lo: k.port, Hi: k.port}
			m := conf.Mapping{
				Name:        ruleName(p.name, k),
				Protocol:    k.proto,
				Listen:      conf.Listen{Ports: ports},
				Target:      conf.Target{Host: p.addr4.String(), Ports: ports},
				IdleTimeout: tcpIdle,

				MaxTCPSessionsPerSource:       pl.MaxSessionsPerSource,
				MaxUDPSessionsPerSource:       pl.MaxSessionsPerSource,
				NewSessionsPerSourcePerSecond: pl.NewSessionsPerSourcePerSecond,
				NewSessionsPerSourceBurst:     pl.NewSessionsPerSourceBurst,
			}
			if k.proto == conf.UDP {
				m.IdleTimeout = conf.Duration(h.udpIdle)
			}
			c.Mappings = append(c.Mappings, m)
			g.Of[m.Name] = p.name
		}
	}
	return c, g
}

// syncRulesLocked hands the engine the rules for the current holdings and
// limits, if they changed, then starts serving holdings opened since: a
// public flow never arrives before its rule. Flows of released holdings
// are closed by the engine's reload (their mapping is gone).
func (r *Relay) syncRulesLocked() {
	if !r.rulesDirty || r.eng == nil {
		return
	}
	r.rulesDirty = false
	before := r.eng.Snapshot()
	cfg, groups := r.engineConfigLocked()
	if _, err := r.eng.ReloadGroups(cfg, groups); err != nil {
		// The rules are built from validated holdings; this is a bug.
		r.log.Error("relay rules refused by the forwarder", zap.Error(err))
		return
	}
	kept := make(map[string]bool, len(cfg.Mappings))
	for _, m := range cfg.Mappings {
		kept[m.Name] = true
	}
	// A released holding's counters stay with its peer.
	for _, ms := range before.Mappings {
		if kept[ms.Name] {
			continue
		}
		if p := r.rulePeer[ms.Name]; p != nil && r.peers[p.name] == p {
			p.retired.add(ms)
		}
		delete(r.rulePeer, ms.Name)
	}
	for _, p := range r.peers {
		for k, h := range p.holdings {
			r.rulePeer[ruleName(p.name, k)] = p
			if !h.serving {
				h.serving = true
				r.serveLocked(h)
			}
		}
	}
}

// serveLocked starts the goroutines reading h's sockets.
func (r *Relay) serveLocked(h *holding) {
	for _, ln := range h.lns {
		r.wg.Add(1)
		go r.acceptLoop(h, ln)
	}
	for _, pc := range h.pcs {
		r.wg.Add(1)
		go r.udpLoop(h, pc)
	}
}

// Name and WriteUDP make a holding the engine's ingress for its flows.
func (h *holding) Name() string { return relayIngress }

// WriteUDP sends a reply to a public client from the socket of h that the
// client's family (and src's address, when bound to several) reaches. It
// runs on the session's goroutine, never on the tunnel's packet path.
func (h *holding) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	pick := -1
	for i, pc := range h.pcs {
		a := pc.LocalAddr().(*net.UDPAddr).AddrPort().Addr()
		if a.Is4() != dst.Addr().Unmap().Is4() {
			continue
		}
		if pick < 0 || a == src.Addr() {
			pick = i
		}
	}
	if pick < 0 {
		return fmt.Errorf("no public socket for %s", dst)
	}
	return h.pws[pick].WriteTo(payload, dst)
}

// relayEgress originates the engine's flows inside the tunnel. Targets are
// a peer's IPv4 tunnel address; an IPv6 client is originated toward the
// peer's IPv6 tunnel address, as a flow cannot change family.
type relayEgress struct{ r *Relay }

// DialTCP sends a TCP flow on one of the peer's warm streams if it has one
// ready (warm.go), and otherwise opens a connection from the client's own
// address.
func (e relayEgress) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	r := e.r
	if a := src.Addr().Unmap(); a == r.addr4 || a == r.addr6 {
		// The peer would take it for a warm stream.
		return nil, fmt.Errorf("client %s has the relay's own tunnel address", src)
	}
	if ws := r.takeWarm(dst.Addr()); ws != nil {
		return startWarm(ctx, ws, src, dst.Port()), nil
	}
	return r.org.DialTCP(ctx, src, netip.AddrPortFrom(tunnelAddrFor(dst.Addr(), src.Addr()), dst.Port()))
}

// takeWarm takes a warm stream toward the peer at tunnel address peer, or
// returns nil.
func (r *Relay) takeWarm(peer netip.Addr) warmStream {
	r.mu.Lock()
	var pool *warmPool
	if p := r.byAddr[peer.Unmap()]; p != nil && p.session != nil {
		pool = p.session.warm
	}
	r.mu.Unlock()
	if pool == nil {
		return nil
	}
	return pool.take()
}

func (e relayEgress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	return e.r.org.WriteUDP(src, netip.AddrPortFrom(tunnelAddrFor(dst.Addr(), src.Addr()), dst.Port()), payload)
}

// tunnelAddr4 is the IPv4 tunnel address behind a (v4 or v6) tunnel address.
func tunnelAddr4(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() && ula6Prefix.Contains(a) {
		b := a.As16()
		return netip.AddrFrom4([4]byte(b[12:]))
	}
	return a
}

// publicAttempt is an accepted public TCP connection as the engine's
// connection attempt: the kernel completed the handshake already, so a
// refusal is an RST on the established connection.
type publicAttempt struct {
	c   net.Conn
	ctx context.Context
}

func (a publicAttempt) Accept() (net.Conn, error) { return a.c, nil }

func (a publicAttempt) Reject() {
	// A clean close reads as an empty answer; an RST says "refused".
	if tcp, ok := a.c.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
	a.c.Close()
}

func (a publicAttempt) Context() context.Context { return a.ctx }

// serveTCP hands one public TCP connection to the engine.
func (r *Relay) serveTCP(h *holding, c net.Conn) {
	defer r.wg.Done()
	gostack.Grow() // the dial, the splice into the stack and the close run deep in gVisor

	client := unmapPort(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	local := unmapPort(c.LocalAddr().(*net.TCPAddr).AddrPort())
	r.eng.HandleTCP(h, client, local, publicAttempt{c: c, ctx: h.ctx})
}

// peerTotals are the engine counters of a peer's released holdings.
type peerTotals struct {
	opened, dialFailed, bytesIn, bytesOut, udpDropped, udpEvicted uint64
	refusals                                                      map[string]uint64
}

func (t *peerTotals) add(ms forwarder.MappingStatus) {
	t.opened += ms.SessionsOpened
	t.dialFailed += ms.Refusals["dial_failed"]
	t.bytesIn += ms.BytesIn
	t.bytesOut += ms.BytesOut
	t.udpDropped += ms.UDPDropped
	t.udpEvicted += ms.UDPEvicted
	for why, n := range ms.Refusals {
		if n == 0 {
			continue
		}
		if t.refusals == nil {
			t.refusals = make(map[string]uint64)
		}
		t.refusals[why] += n
	}
}

// Sessions lists the relay's live public sessions (client, public port,
// the peer's mapping and target, bytes).
func (r *Relay) Sessions() []forwarder.SessionInfo { return r.eng.Sessions() }

// plus returns t with o's counters added (o may be nil).
func (t peerTotals) plus(o *peerTotals) peerTotals {
	out := t
	out.refusals = maps.Clone(t.refusals)
	if o == nil {
		return out
	}
	out.opened += o.opened
	out.dialFailed += o.dialFailed
	out.bytesIn += o.bytesIn
	out.bytesOut += o.bytesOut
	out.udpDropped += o.udpDropped
	out.udpEvicted += o.udpEvicted
	for why, n := range o.refusals {
		if out.refusals == nil {
			out.refusals = make(map[string]uint64)
		}
		out.refusals[why] += n
	}
	return out
}

// isOverLimit reports whether an engine refusal reason is relay.max_sessions.
func isOverLimit(why string) bool {
	switch why {
	case "over_limit_sessions", "over_limit_tcp_sessions", "over_limit_udp_sessions":
		return true
	}
	return false
}

// maxUDPIdle caps the UDP idle timeout a peer may ask for: its sessions
// hold slots of its quota that long after their last datagram.
const maxUDPIdle = 24 * time.Hour

// udpIdleOf returns a register's UDP idle timeouts by spec; invalid ones
// are left out (the default applies), long ones capped.
func udpIdleOf(m message) map[string]time.Duration {
	if len(m.UDPIdle) == 0 {
		return nil
	}
	listed := make(map[string]bool, len(m.Ports))
	for _, spec := range m.Ports {
		listed[spec] = true
	}
	out := make(map[string]time.Duration, len(m.UDPIdle))
	for spec, ms := range m.UDPIdle {
		if ms <= 0 || !listed[spec] {
			continue
		}
		out[spec] = time.Duration(min(ms, maxUDPIdle.Milliseconds())) * time.Millisecond
	}
	return out
}
