package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/rawsock"
)

// Originator originates flows inside the relay's tunnel with any source
// address. *netstack.Stack implements it.
type Originator interface {
	// DialTCP connects from src (the public client's own address) to dst.
	DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)
	// WriteUDP sends one datagram from src to dst; it must not block long.
	WriteUDP(src, dst netip.AddrPort, payload []byte) error
}

// Relay is the public side of relay mode: a WireGuard listener for the
// configured peers, a control server inside the tunnel through which each
// peer registers the ports it wants, public listeners for the ports granted,
// and the data path that re-originates each public flow inside the tunnel
// from the client's own address.
//
// Isolation: a peer's WireGuard allowed IPs are its own tunnel addresses
// only, so its packets cannot claim another source; anything a peer sends
// that is neither a connection to the relay's control port nor a reply to a
// UDP session toward that same peer is rejected or dropped (TCP flows are
// originated by the relay, so their replies never reach the handlers).
type Relay struct {
	log   *zap.Logger
	org   Originator
	dev   *wgDevice
	gates gates // bound the data packets each direction of dev holds
	opts  options
	addr4 netip.Addr // the relay's tunnel addresses
	addr6 netip.Addr
	binds []netip.Addr // where public listeners open
	mtu   int          // of the tunnel: public datagrams larger than it cannot cross

	limits atomic.Pointer[relayLimits] // swapped by Reload
	// ipcSet configures the WireGuard device (a seam for tests that make it
	// fail part-way); guarded by mu.
	ipcSet func(uapi string) error
	// beforeOpen, if set, runs before a register's sockets are opened,
	// outside the lock (a seam for tests); guarded by mu.
	beforeOpen func(peer string)

	ctx       context.Context // cancelled by Close: ends every flow and control session
	cancel    context.CancelFunc
	wg        sync.WaitGroup // every goroutine the relay starts
	closeOnce sync.Once
	running   atomic.Bool // Run was called

	eng      *forwarder.Engine // admits and runs every public flow
	streams  *streamServer     // the TCP transport; nil when relay.tcp_listen is empty
	rejected atomic.Uint64     // tunnel flows refused by isolation

	// mu guards the following fields.
	mu     sync.Mutex
	cfg    *conf.RelayConfig
	closed bool
	peers  map[string]*relayPeer // by name
	byAddr map[netip.Addr]*relayPeer
	reg    *registry
	// rulesDirty: holdings or limits changed since the engine's rules were
	// last built (see syncRulesLocked).
	rulesDirty bool
	rulePeer   map[string]*relayPeer // engine mapping name -> peer
	udpSockets int                   // public UDP sockets open, all peers
}

// relayLimits are the [relay] settings a reload applies in place. Flows
// already admitted keep running when max_sessions is lowered; new ones are
// refused until the count is under it again.
type relayLimits struct {
	dialTimeout time.Duration
	maxSessions int64 // 0: unlimited
}

func limitsOf(s conf.RelaySection) *relayLimits {
	l := &relayLimits{dialTimeout: s.DialTimeout.D(), maxSessions: int64(s.MaxSessions)}
	if l.dialTimeout <= 0 {
		l.dialTimeout = defaultDialTimeout
	}
	return l
}

// relayPeer is one configured peer. name and addr4 never change (a peer
// whose address changes is replaced); the counters are atomic; the other
// fields are guarded by Relay.mu.
type relayPeer struct {
	name       string
	addr4      netip.Addr
	ctlRefused ctlCounters // control connections refused, by reason
	retired    peerTotals  // engine counters of holdings released
	// regCoalesced counts registers replaced by a newer one before they
	// were applied (a peer registering faster than the relay applies).
	regCoalesced atomic.Uint64
	portRefused  [numPortRefusals]atomic.Uint64 // specs refused by a cap, by reason
	udpSockets   int                            // public UDP sockets open; guarded by Relay.mu
	// reserved are the ports an apply is opening outside the lock, taken in
	// the registry and counted in udpSockets meanwhile; guarded by Relay.mu.
	reserved map[portKey]bool
	cfg      conf.Peer
	pending  *controlConn             // a control connection waiting for its hello
	session  *controlSession          // nil when not connected
	wanted   []string                 // the specs of the peer's last register
	udpIdle  map[string]time.Duration // ... and their UDP idle timeouts, where given
	results  map[string]message
	holdings map[portKey]*holding
	grace    *time.Timer // runs while the peer is disconnected and still holds ports
	warm     warmCounters
}

// holding is one (protocol, port) a peer holds: the public sockets on every
// bind address, served once the engine has its rule. Cancelling ctx stops
// its dials.
type holding struct {
	key     portKey
	peer    *relayPeer
	ctx     context.Context
	cancel  context.CancelFunc
	lns     []net.Listener
	pcs     []*net.UDPConn
	pws     []*rawsock.PacketWriter // pcs[i]'s replies: raw sendto, safe for every session at once
	udpIdle time.Duration           // idle timeout of its UDP sessions
	serving bool                    // guarded by Relay.mu
}

// NewRelay configures a WireGuard device on dev for cfg's peers, listening
// on relay.listen, and returns a Relay that serves them. It takes ownership
// of dev (closed by Close, or before returning an error). Public flows are
// originated through org; cmd routes the relay stack's inbound flows to
// HandleTCP and HandleUDP.
//
// NewRelay starts goroutines: device.NewDevice starts wireguard-go's
// routines, binding relay.listen here (so that a taken port is a start-up
// error and ListenPort answers before Run) starts its receivers, and with
// relay.tcp_listen the TLS listener's accept loop (relay_tcp.go) runs from
// here until Close. What they decrypt waits in dev until the stack on its
// other end runs.
func NewRelay(cfg *conf.RelayConfig, dev tun.Device, org Originator, log *zap.Logger, opts ...Option) (*Relay, error) {
	r, err := newRelay(cfg, dev, org, log, opts)
	if err != nil {
		if dev != nil {
			dev.Close()
		}
		return nil, err
	}
	return r, nil
}

func newRelay(cfg *conf.RelayConfig, dev tun.Device, org Originator, log *zap.Logger, opts []Option) (*Relay, error) {
	switch {
	case cfg == nil:
		return nil, errors.New("new relay: no config")
	case dev == nil:
		return nil, errors.New("new relay: no tunnel device")
	case org == nil:
		return nil, errors.New("new relay: no originator")
	case log == nil:
		return nil, errors.New("new relay: no logger")
	case cfg.Relay.PrivateKey.IsZero():
		return nil, errors.New("new relay: relay.private_key is not set; create one with natbox genkey")
	case !cfg.Relay.Address.Unmap().Is4():
		return nil, fmt.Errorf("new relay: relay.address %q is not an IPv4 address", cfg.Relay.Address)
	}
	port, host, err := listenPort(cfg.Relay.Listen)
	if err != nil {
		return nil, err
	}
	if a, err := netip.ParseAddr(host); host != "" && (err != nil || !a.IsUnspecified()) {
		log.Warn("wireguard listens on every address; the host part of relay.listen is not applied",
			zap.String("listen", cfg.Relay.Listen))
	}
	// The device and the stack take relay.max_mtu (peers whose path probe
	// passed send that much: tunnel/pathmtu.go); public datagrams must fit
	// relay.mtu, which every peer has.
	mtu := cfg.Relay.MTU
	if devMTU, err := dev.MTU(); err == nil && cfg.Relay.MaxMTU != 0 && devMTU != cfg.Relay.MaxMTU {
		log.Warn("tunnel device mtu differs from relay.max_mtu", zap.Int("device_mtu", devMTU), zap.Int("max_mtu", cfg.Relay.MaxMTU))
	}
	if mtu <= 0 {
		mtu = defaultMTU
	}

	o := buildOptions(opts)
	ctx, cancel := context.WithCancel(context.Background())
	r := &Relay{
		log:    log,
		org:    org,
		opts:   o,
		addr4:  cfg.Relay.Address.Unmap(),
		addr6:  TunnelAddr6(cfg.Relay.Address),
		binds:  cfg.Relay.PublicBind,
		mtu:    mtu,
		ctx:    ctx,
		cancel: cancel,
		cfg:    cfg,
		peers:  make(map[string]*relayPeer),
		byAddr: make(map[netip.Addr]*relayPeer),
		reg:    newRegistry(),

		rulePeer: make(map[string]*relayPeer),
	}
	if len(r.binds) == 0 {
		r.binds = []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}
	}
	r.limits.Store(limitsOf(cfg.Relay))

	var uapi string
	for _, p := range cfg.Peers {
		uapi += peerUAPI(p.PublicKey, netip.AddrPort{}, 0, TunnelPrefixes(p.Address))
	}
	bind := newStreamBind(newUDPBind())
	d, g, err := newDevice(dev, bind, cfg.Relay.PrivateKey, port, gateSize(int(cfg.Relay.BufferMemory)), log)
	if err != nil {
		cancel()
		return nil, err // newDevice closed dev
	}
	if err := d.IpcSet(uapi); err != nil {
		d.Close()
		cancel()
		return nil, fmt.Errorf("configure relay peers: %w", err)
	}
	r.dev, r.gates = d, g
	r.ipcSet = d.IpcSet
	for i := range cfg.Peers {
		r.addPeerLocked(cfg.Peers[i])
	}
	if r.eng, err = r.newEngine(); err != nil {
		d.Close()
		cancel()
		return nil, fmt.Errorf("relay forwarder: %w", err)
	}
	if cfg.Relay.TCPListen != "" {
		r.streams, err = listenStreams(cfg.Relay.TCPListen, cfg.Relay.TCPCongestion, bind, cfg.Relay.PrivateKey, r.peerByKey, o, log)
		if err != nil {
			r.eng.Close()
			d.Close()
			cancel()
			return nil, err
		}
	}
	log.Info("relay up", zap.String("listen", cfg.Relay.Listen), zap.Stringer("address", r.addr4),
		zap.Int("count", len(cfg.Peers)))
	return r, nil
}

// ErrClosed is returned by Run on a closed Relay or Uplink, and by a
// second Run.
var ErrClosed = errors.New("tunnel: closed")

// Run runs the relay's engine (its expiry sweep) and serves until ctx is
// done or Close is called, then closes the relay and returns once the
// engine's Run has returned too. The relay serves peers from New on, as
// wireguard-go allows (see NewRelay), but its flows reach it only through
// the relay stack, which delivers nothing before its own Run.
func (r *Relay) Run(ctx context.Context) error {
	if r.ctx.Err() != nil || !r.running.CompareAndSwap(false, true) {
		return ErrClosed
	}
	engDone := make(chan error, 1)
	go func() { engDone <- r.eng.Run(context.Background()) }() // Close stops it
	select {
	case <-ctx.Done():
	case <-r.ctx.Done():
	}
	err := r.Close()
	if e := <-engDone; !errors.Is(e, forwarder.ErrStopped) {
		err = errors.Join(err, e)
	}
	return err
}

// Close stops the relay: it closes the public listeners, every flow and
// control session, and the WireGuard device (and so the tun.Device), then
// waits for its goroutines. It is idempotent.
func (r *Relay) Close() error {
	r.closeOnce.Do(func() {
		r.mu.Lock()
		r.closed = true
		var sessions []*controlSession
		var pending []*controlConn
		for _, p := range r.peers {
			if p.session != nil {
				sessions = append(sessions, p.session)
			}
			if p.pending != nil {
				pending = append(pending, p.pending)
			}
			r.dropPeerLocked(p)
		}
		r.mu.Unlock()
		r.cancel()
		for _, s := range sessions {
			s.close()
		}
		for _, cc := range pending { // not waiting out their hello deadline
			cc.c.Close()
		}
		r.eng.Close() // ends every public flow
		if r.streams != nil {
			r.streams.close()
		}
		r.dev.Close()
		r.wg.Wait()
		r.log.Info("relay down")
	})
	return nil
}

// peerByKey names the configured peer with public key k.
func (r *Relay) peerByKey(k conf.Key) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.cfg.PeerByKey(k)
	if !ok {
		return "", false
	}
	return p.Name, true
}

// StreamAddr is the TCP transport's listening address, or nil when it is off.
func (r *Relay) StreamAddr() net.Addr {
	if r.streams == nil {
		return nil
	}
	return r.streams.Addr()
}

// addPeerLocked registers a configured peer (its WireGuard side is set up
// by the caller).
func (r *Relay) addPeerLocked(pc conf.Peer) {
	p := &relayPeer{
		name:     pc.Name,
		cfg:      pc,
		addr4:    pc.Address.Unmap(),
		results:  make(map[string]message),
		holdings: make(map[portKey]*holding),
	}
	r.peers[pc.Name] = p
	r.byAddr[p.addr4] = p
	r.byAddr[TunnelAddr6(p.addr4)] = p
}

// dropPeerLocked releases everything p holds and forgets it; the caller
// closes its session outside the lock.
func (r *Relay) dropPeerLocked(p *relayPeer) {
	if p.grace != nil {
		p.grace.Stop()
		p.grace = nil
	}
	for _, h := range p.holdings {
		r.releaseLocked(h)
	}
	r.unreserveLocked(p)
	delete(r.peers, p.name)
	delete(r.byAddr, p.addr4)
	delete(r.byAddr, TunnelAddr6(p.addr4))
}

// HandleTCP is called by the relay stack's handler for each connection
// attempt arriving from the tunnel. Only connections to the control port on
// the relay's own tunnel address, from a configured peer's address, are
// accepted; the call then serves the control session until it ends.
func (r *Relay) HandleTCP(src, dst netip.AddrPort, accept func() (net.Conn, error), reject func()) {
	d := dst.Addr().Unmap()
	if dst.Port() != ControlPort || (d != r.addr4 && d != r.addr6) {
		r.rejected.Add(1)
		reject()
		return
	}
	r.mu.Lock()
	p := r.byAddr[src.Addr().Unmap()]
	ok := p != nil && !r.closed
	if ok {
		r.wg.Add(1)
	}
	r.mu.Unlock()
	if !ok {
		r.rejected.Add(1)
		reject()
		return
	}
	defer r.wg.Done()
	c, err := accept()
	if err != nil {
		r.log.Debug("accept control connection", zap.String("peer", p.name), zap.Error(err))
		return
	}
	// One connection per peer waits for its hello: a newer one replaces it,
	// so a peer opening many holds one goroutine and buffer, not many.
	cc := newControlConn(c)
	r.mu.Lock()
	old := p.pending
	p.pending = cc
	if r.closed {
		p.pending = nil
		c.Close()
	}
	r.mu.Unlock()
	if old != nil {
		r.refuseControl(p, old, ctlReplaced, nil)
		old.c.Close()
	}
	r.serveControl(p, cc)
}

// HandleUDP is called on the relay stack's packet path for each datagram
// arriving from the tunnel. Only replies to an existing session toward the
// sending peer's own address and port are passed on, from the same public
// socket the client used; everything else is dropped.
func (r *Relay) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	// Sessions know the peer by its IPv4 tunnel address; a peer's
	// allowed IPs guarantee src is its own.
	from := netip.AddrPortFrom(tunnelAddr4(src.Addr()), src.Port())
	if !r.eng.HandleUDPReply(from, dst, payload) {
		r.rejected.Add(1)
	}
}

// RelayStatus is a snapshot of the relay for the admin API.
type RelayStatus struct {
	Peers       []RelayPeerStatus `json:"peers"`
	TCPSessions int64             `json:"tcp_sessions"`
	UDPSessions int               `json:"udp_sessions"`
	UDPSockets  int               `json:"udp_sockets"` // public UDP sockets open, all peers
	Rejected    uint64            `json:"rejected"`    // flows from the tunnel refused by isolation
	// The WireGuard device's gates (gate.go): packets each direction may
	// hold, packets held now, and reopenings after a stall.
	GatePackets int64  `json:"gate_packets"`
	GateHeld    int64  `json:"gate_held"`
	GateStalls  uint64 `json:"gate_stalls"`
	// WireGuard transport messages received from all peers, and those of
	// them the paths lost on the way, estimated from the gaps in their
	// counters (lossmeter.go).
	DatagramsIn   uint64 `json:"datagrams_in"`
	DatagramsLost uint64 `json:"datagrams_lost"`
	OverLimit     uint64 `json:"over_limit"` // public flows refused by relay.max_sessions
	// The TCP transport (relay.tcp_listen): peers connected over it now,
	// connections authenticated since start, connections refused or ended
	// by reason (busy, handshake, auth, frame, replaced), and WireGuard
	// messages dropped because a connection's write queue was full.
	TCPStreams  int               `json:"tcp_streams"`
	TCPAccepted uint64            `json:"tcp_accepted"`
	TCPRefusals map[string]uint64 `json:"tcp_refusals,omitempty"`
	TCPDropped  uint64            `json:"tcp_dropped"`
	// TCPCongestion is the congestion control the last connection it
	// accepted runs (relay.tcp_congestion, or the kernel's default where
	// the kernel refused it; congestion.go).
	TCPCongestion string `json:"tcp_congestion,omitempty"`
	// The relay forwarder's buffer budget (relay.buffer_memory's share for
	// copy buffers and queued datagrams), the bytes of it in use, and the
	// buffers it refused.
	BufferBudgetBytes int64  `json:"buffer_budget_bytes"`
	BufferUsedBytes   int64  `json:"buffer_used_bytes"`
	BufferDenied      uint64 `json:"buffer_denied"`
}

// RelayPeerStatus describes one peer.
type RelayPeerStatus struct {
	Name          string            `json:"name"`
	PublicKey     string            `json:"public_key"`
	Address       netip.Addr        `json:"address"`
	Connected     bool              `json:"connected"` // control session up
	Endpoint      string            `json:"endpoint,omitempty"`
	LastHandshake time.Time         `json:"last_handshake"` // zero: never
	RxBytes       uint64            `json:"rx_bytes"`
	TxBytes       uint64            `json:"tx_bytes"`
	Ports         []string          `json:"ports"`             // held, e.g. "tcp/443", "udp/10000-10100"
	Refused       map[string]string `json:"refused,omitempty"` // spec -> reason
	// ControlRefusals counts the peer's control connections refused or
	// ended by the relay, by reason ("replaced", "hello_timeout", "rate", ...).
	ControlRefusals map[string]uint64 `json:"control_refusals,omitempty"`
	// RegistersCoalesced counts registers the relay skipped because a newer
	// one from the same peer came before it applied them.
	RegistersCoalesced uint64 `json:"registers_coalesced,omitempty"`
	// UDPSockets are the peer's public UDP sockets open now (one per held
	// UDP port per bind address); PortRefusals counts the answers that
	// refused one of its specs for a cap ("udp_sockets_peer",
	// "udp_sockets_relay").
	UDPSockets   int               `json:"udp_sockets"`
	PortRefusals map[string]uint64 `json:"port_refusals,omitempty"`
	// SessionsActive and SessionsOpened count the peer's TCP flows and UDP
	// client sessions: open now, and opened since the peer was configured.
	SessionsActive int64  `json:"sessions_active"`
	SessionsOpened uint64 `json:"sessions_opened"`
	// DialFailures counts public TCP connections reset because the peer
	// refused or did not answer the flow inside the tunnel.
	DialFailures uint64 `json:"dial_failures"`
	// UDPSessions are the peer's public UDP client sessions open now.
	UDPSessions int64 `json:"udp_sessions"`
	// PublicBytesIn and PublicBytesOut count payload from public clients
	// toward the peer and back.
	PublicBytesIn  uint64 `json:"public_bytes_in"`
	PublicBytesOut uint64 `json:"public_bytes_out"`
	// UDPDropped counts public datagrams dropped either way (full queues,
	// the tunnel refusing a write, a public socket refusing a reply).
	UDPDropped uint64 `json:"udp_dropped"`
	// UDPEvicted counts the peer's public UDP sessions that never had a
	// reply and were evicted to admit a new one (a flood at its ports).
	UDPEvicted uint64 `json:"udp_evicted"`
	// Refusals counts public flows to the peer's ports refused, by reason:
	// the peer's quotas (over_limit_peer_*), the per-source budgets, the
	// relay's max_sessions, dial_failed.
	Refusals map[string]uint64 `json:"refusals,omitempty"`
	// The peer's warm streams (warm.go): open and unused now; taken by a
	// public connection; public connections that found none (and opened
	// their own); dials that failed; closed unused after the idle time;
	// replacements of the idle ones after the peer's path MTU changed;
	// idle ones found reset or closed by the peer when taken (not used).
	WarmStreamsIdle        int    `json:"warm_streams_idle"`
	WarmStreamsUsed        uint64 `json:"warm_streams_used"`
	WarmStreamsMissed      uint64 `json:"warm_streams_missed"`
	WarmStreamDialFailures uint64 `json:"warm_stream_dial_failures"`
	WarmStreamsExpired     uint64 `json:"warm_streams_expired"`
	WarmStreamResets       uint64 `json:"warm_stream_resets"`
	WarmStreamsDead        uint64 `json:"warm_streams_dead"`
}

// HandshakeAge is the time since the peer's last handshake, or -1 if none yet.
func (p RelayPeerStatus) HandshakeAge() time.Duration { return handshakeAge(p.LastHandshake) }

// Status returns a snapshot of the relay.
func (r *Relay) Status() RelayStatus {
	stats, err := readPeerStats(r.dev)
	if err != nil {
		r.log.Debug("relay status", zap.Error(err))
	}
	es := r.eng.Snapshot()
	st := RelayStatus{TCPSessions: es.TCPSessions, UDPSessions: int(es.UDPSessions), Rejected: r.rejected.Load(),
		BufferBudgetBytes: es.BufferBudgetBytes, BufferUsedBytes: es.BufferUsedBytes, BufferDenied: es.BufferDenied}
	st.GatePackets, st.GateHeld, st.GateStalls = r.gates.status()
	st.DatagramsIn, st.DatagramsLost = r.gates.loss.counts()
	if r.streams != nil {
		ss := r.streams.status()
		st.TCPStreams, st.TCPAccepted, st.TCPRefusals, st.TCPDropped = ss.streams, ss.accepted, ss.refused, ss.dropped
		st.TCPCongestion = ss.congestion
	}

	r.mu.Lock()
	st.UDPSockets = r.udpSockets
	live := make(map[*relayPeer]*peerTotals, len(r.peers))
	active := make(map[*relayPeer]int64, len(r.peers))
	udp := make(map[*relayPeer]int64, len(r.peers))
	for _, ms := range es.Mappings {
		p := r.rulePeer[ms.Name]
		if p == nil {
			continue
		}
		if live[p] == nil {
			live[p] = &peerTotals{}
		}
		live[p].add(ms)
		active[p] += ms.SessionsActive
		if ms.Protocol == conf.UDP.String() {
			udp[p] += ms.SessionsActive
		}
	}
	for _, p := range r.peers {
		t := p.retired.plus(live[p])
		ps := RelayPeerStatus{
			Name:      p.name,
			PublicKey: p.cfg.PublicKey.String(),
			Address:   p.addr4,
			Connected: p.session != nil,
			Ports:     specStrings(compressKeys(keysOf(p.holdings))),

			SessionsActive: active[p],
			SessionsOpened: t.opened,
			DialFailures:   t.dialFailed,
			UDPSessions:    udp[p],
			PublicBytesIn:  t.bytesIn,
			PublicBytesOut: t.bytesOut,
			UDPDropped:     t.udpDropped,
			UDPEvicted:     t.udpEvicted,
			Refusals:       t.refusals,

			ControlRefusals:    p.ctlRefused.snapshot(),
			RegistersCoalesced: p.regCoalesced.Load(),
			UDPSockets:         p.udpSockets,

			WarmStreamsUsed:        p.warm.used.Load(),
			WarmStreamsMissed:      p.warm.missed.Load(),
			WarmStreamDialFailures: p.warm.dialFailed.Load(),
			WarmStreamsExpired:     p.warm.expired.Load(),
			WarmStreamResets:       p.warm.resets.Load(),
			WarmStreamsDead:        p.warm.dead.Load(),
		}
		if p.session != nil && p.session.warm != nil {
			ps.WarmStreamsIdle = p.session.warm.idleCount()
		}
		for i := range p.portRefused {
			if n := p.portRefused[i].Load(); n > 0 {
				if ps.PortRefusals == nil {
					ps.PortRefusals = make(map[string]uint64)
				}
				ps.PortRefusals[portRefusalNames[i]] = n
			}
		}
		for why, n := range t.refusals {
			if isOverLimit(why) {
				st.OverLimit += n
			}
		}
		for spec, m := range p.results {
			if !m.OK {
				if ps.Refused == nil {
					ps.Refused = make(map[string]string)
				}
				ps.Refused[spec] = m.Reason
			}
		}
		if s, ok := stats[p.cfg.PublicKey]; ok {
			ps.Endpoint, ps.LastHandshake, ps.RxBytes, ps.TxBytes = s.Endpoint, s.LastHandshake, s.RxBytes, s.TxBytes
		}
		st.Peers = append(st.Peers, ps)
	}
	r.mu.Unlock()
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Name < st.Peers[j].Name })
	return st
}

// Reload applies a new relay config: peers added, removed or changed, new
// port allowances, dial_timeout and max_sessions, without touching other
// peers' flows. A peer that lost an allowance loses only those ports (their
// listeners and flows); a peer whose key or address changed starts over.
// Settings that need a new device or new sockets (listen, private key,
// address, public_bind, mtu, the TCP transport's) cannot change on reload: the error says so and
// nothing changes. If WireGuard refuses the new peers part-way, what it
// applied is rolled back and the error says so.
func (r *Relay) Reload(cfg *conf.RelayConfig) error {
	if cfg == nil {
		return errors.New("reload relay: no config")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errors.New("reload relay: relay is closed")
	}
	old := r.cfg.Relay
	nw := cfg.Relay
	var fixed []string
	if nw.Listen != old.Listen {
		fixed = append(fixed, "relay.listen")
	}
	if nw.PrivateKey != old.PrivateKey {
		fixed = append(fixed, "relay.private_key")
	}
	if nw.Address != old.Address {
		fixed = append(fixed, "relay.address")
	}
	if !slices.Equal(nw.PublicBind, old.PublicBind) {
		fixed = append(fixed, "relay.public_bind")
	}
	if nw.MTU != old.MTU {
		fixed = append(fixed, "relay.mtu")
	}
	if nw.MaxMTU != old.MaxMTU {
		fixed = append(fixed, "relay.max_mtu")
	}
	if nw.TCPListen != old.TCPListen {
		fixed = append(fixed, "relay.tcp_listen")
	}
	if nw.TCPCongestion != old.TCPCongestion {
		fixed = append(fixed, "relay.tcp_congestion")
	}
	if len(fixed) > 0 {
		return fmt.Errorf("reload relay: %v cannot change while running; restart natbox relay to apply", fixed)
	}

	next := make(map[string]conf.Peer, len(cfg.Peers))
	for _, p := range cfg.Peers {
		next[p.Name] = p
	}
	// WireGuard first: if it refuses, nothing has changed on our side.
	var uapi string
	var dropped, added []string
	for name, p := range r.peers {
		np, ok := next[name]
		if !ok || np.PublicKey != p.cfg.PublicKey || np.Address != p.cfg.Address {
			uapi += removePeerUAPI(p.cfg.PublicKey)
			dropped = append(dropped, name)
		}
	}
	for name, np := range next {
		if _, ok := r.peers[name]; !ok || slices.Contains(dropped, name) {
			uapi += peerUAPI(np.PublicKey, netip.AddrPort{}, 0, TunnelPrefixes(np.Address))
			added = append(added, name)
		}
	}
	if uapi != "" {
		if err := r.setPeersLocked(uapi, dropped, added, next); err != nil {
			return err
		}
	}
	r.limits.Store(limitsOf(cfg.Relay))

	var closing []*controlSession
	for _, name := range dropped {
		p := r.peers[name]
		if p.session != nil {
			closing = append(closing, p.session)
			p.session = nil
		}
		r.dropPeerLocked(p)
	}
	if len(dropped) > 0 {
		r.syncChecksumsLocked() // their sessions end unpublished
	}
	for _, name := range added {
		r.addPeerLocked(next[name])
	}
	var notes []notification
	var changed []string
	for name, p := range r.peers {
		np := next[name]
		portsChanged := !slices.Equal(np.Ports, p.cfg.Ports)
		p.cfg = np
		if !portsChanged || slices.Contains(added, name) {
			continue
		}
		changed = append(changed, name)
		if p.session != nil {
			notes = append(notes, r.renotifyLocked(p)...)
			continue
		}
		for k, h := range p.holdings { // in grace: keep only what is still allowed
			if !allowsPort(p.cfg.Ports, k) {
				r.releaseLocked(h)
			}
		}
	}
	notes = append(notes, r.retryOthersLocked(nil, nil, true)...)
	r.cfg = cfg
	r.rulesDirty = true // limits
	r.syncRulesLocked()
	lim := r.limits.Load()
	r.log.Info("relay reloaded", zap.Int("count", len(r.peers)), zap.Strings("added", added),
		zap.Strings("changed", changed), zap.Strings("removed", dropped),
		zap.Duration("dial_timeout", lim.dialTimeout), zap.Int64("max_sessions", lim.maxSessions))
	for _, s := range closing { // close never blocks: it only closes a channel and the conn
		s.close()
	}
	if r.streams != nil { // a removed peer's TCP transport ends with it
		r.streams.retain(func(k conf.Key) bool { _, ok := cfg.PeerByKey(k); return ok })
	}
	r.sendLocked(notes)
	return nil
}

// ErrPeersHalfApplied is a reload whose WireGuard peer update failed part-way
// and could not be rolled back: unlike every other reload error, something
// did change.
var ErrPeersHalfApplied = errors.New("rolling back the WireGuard peers failed too")

// setPeersLocked applies uapi, which removes the dropped peers and adds the
// added ones (names in r.peers and next). wireguard-go applies a UAPI text
// line by line, so a failure can leave part of it applied: then the added
// keys that were not there before are removed and the dropped peers are put
// back as they were (allowed IPs and last endpoint), and the error says
// whether that worked.
func (r *Relay) setPeersLocked(uapi string, dropped, added []string, next map[string]conf.Peer) error {
	stats, _ := readPeerStats(r.dev) // endpoints to restore; best effort
	err := r.ipcSet(uapi)
	if err == nil {
		return nil
	}
	old := make(map[conf.Key]bool, len(dropped))
	for _, name := range dropped {
		old[r.peers[name].cfg.PublicKey] = true
	}
	var undo strings.Builder
	for _, name := range added {
		if k := next[name].PublicKey; !old[k] {
			undo.WriteString(removePeerUAPI(k))
		}
	}
	for _, name := range dropped {
		pc := r.peers[name].cfg
		ep, _ := netip.ParseAddrPort(stats[pc.PublicKey].Endpoint)
		undo.WriteString(peerUAPI(pc.PublicKey, ep, 0, TunnelPrefixes(pc.Address)))
	}
	if uerr := r.ipcSet(undo.String()); uerr != nil {
		r.log.Error("wireguard peers half-updated and the rollback failed; restart natbox relay",
			zap.NamedError("update", err), zap.NamedError("rollback", uerr))
		return fmt.Errorf("reload relay peers: %w; %w (%v): restart natbox relay to restore the peers", err, ErrPeersHalfApplied, uerr)
	}
	return fmt.Errorf("reload relay peers: %w; the WireGuard peers it had changed were rolled back, nothing changed", err)
}

// notification is a batch of messages for one control session.
type notification struct {
	s    *controlSession
	msgs []message
}

// sendLocked queues notifications; it never blocks (see controlSession.send).
func (r *Relay) sendLocked(notes []notification) {
	for _, n := range notes {
		n.s.send(n.msgs...)
	}
}

// reconcileLocked makes p's holdings match its wanted specs and allowances:
// it opens sockets for wanted ports it may take, releases held ports no
// longer wanted or allowed, and returns one result per wanted spec and the
// ports it released.
// pre, if not nil, holds the sockets applyRegister opened outside the lock
// and the specs it could not open: those are used, not opened again.
func (r *Relay) reconcileLocked(p *relayPeer, pre *prepared) ([]message, []portKey) {
	freed := r.releaseUnwantedLocked(p)
	if pre != nil {
		defer func() { // opened for a spec that is no longer granted
			for _, h := range pre.opened {
				if p.holdings[h.key] != h {
					h.discard()
				}
			}
		}()
	}
	keep := make(map[portKey]bool)
	results := make([]message, 0, len(p.wanted))
	for _, raw := range p.wanted {
		res := message{Type: msgResult, Port: raw, OK: true}
		spec, err := parseWireSpec(raw)
		if err != nil {
			res.OK, res.Reason = false, err.Error()
			results = append(results, res)
			continue
		}
		res.Port = spec.String()
		if reason := r.reg.check(p.name, p.cfg.Ports, spec); reason != "" {
			res.OK, res.Reason = false, reason
			results = append(results, res)
			continue
		}
		if reason, which := r.udpSocketsLocked(p, spec); reason != "" {
			p.portRefused[which].Add(1)
			res.OK, res.Reason = false, reason
			results = append(results, res)
			continue
		}
		if reason := pre.failure(raw); reason != "" {
			res.OK, res.Reason = false, reason
			results = append(results, res)
			continue
		}
		idle := r.opts.udpIdleTimeout
		if d, ok := p.udpIdle[raw]; ok {
			idle = d
		}
		var opened []*holding
		for _, k := range portKeys(spec) {
			if h := p.holdings[k]; h != nil {
				if k.proto == conf.UDP && h.udpIdle != idle {
					h.udpIdle = idle // its sessions move to it with the rule
					r.rulesDirty = true
				}
				continue
			}
			if h := pre.take(k); h != nil {
				h.udpIdle = idle
				r.installLocked(h)
				opened = append(opened, h)
				continue
			}
			h, err := r.openLocked(p, k, idle)
			if err != nil {
				res.OK, res.Reason = false, err.Error()
				break
			}
			opened = append(opened, h)
		}
		if !res.OK { // a range is granted whole or not at all
			for _, h := range opened {
				r.releaseLocked(h)
			}
		} else {
			for _, k := range portKeys(spec) {
				keep[k] = true
			}
		}
		results = append(results, res)
	}
	for k, h := range p.holdings {
		if !keep[k] {
			r.releaseLocked(h)
			freed = append(freed, k)
		}
	}
	r.syncRulesLocked()
	return results, freed
}

// renotifyLocked reconciles p and returns the results that changed since
// p's session last heard about them.
func (r *Relay) renotifyLocked(p *relayPeer) []notification {
	var changed []message
	if p.reserved != nil {
		return nil // an apply is opening sockets; it reconciles p when done
	}
	results, _ := r.reconcileLocked(p, nil)
	for _, m := range results {
		if prev, ok := p.results[m.Port]; !ok || prev.OK != m.OK || prev.Reason != m.Reason {
			changed = append(changed, m)
		}
		p.results[m.Port] = m
	}
	if len(changed) == 0 || p.session == nil {
		return nil
	}
	return []notification{{p.session, changed}}
}

// retryOthersLocked re-reconciles every connected peer other than except
// that was refused a spec covering a port in freed: that port may now be
// its. With all, as after a reload, every peer with a refused spec is.
func (r *Relay) retryOthersLocked(except *relayPeer, freed []portKey, all bool) []notification {
	if len(freed) == 0 && !all {
		return nil
	}
	free := make(map[portKey]bool, len(freed))
	for _, k := range freed {
		free[k] = true
	}
	var notes []notification
	for _, q := range r.peers {
		if q == except || q.session == nil {
			continue
		}
		refused := false
		for _, m := range q.results {
			refused = refused || (!m.OK && (all || coversAny(m.Port, free)))
		}
		if refused {
			notes = append(notes, r.renotifyLocked(q)...)
		}
	}
	return notes
}

// releaseUnwantedLocked releases p's holdings that no spec it wants and
// may take covers, first, so their sockets count for nothing against the
// caps; it returns their ports.
func (r *Relay) releaseUnwantedLocked(p *relayPeer) []portKey {
	want := make(map[portKey]bool)
	for _, raw := range p.wanted {
		if spec, err := parseWireSpec(raw); err == nil && r.reg.check(p.name, p.cfg.Ports, spec) == "" {
			for _, k := range portKeys(spec) {
				want[k] = true
			}
		}
	}
	var freed []portKey
	for k, h := range p.holdings {
		if !want[k] {
			r.releaseLocked(h)
			freed = append(freed, k)
		}
	}
	return freed
}

// prepared is what applyRegister opened outside the relay's lock.
type prepared struct {
	opened map[portKey]*holding
	failed map[string]string // wanted spec -> why its sockets could not open
}

func (pr *prepared) failure(raw string) string {
	if pr == nil {
		return ""
	}
	return pr.failed[raw]
}

// take returns the holding opened for k, or nil; the caller owns it.
func (pr *prepared) take(k portKey) *holding {
	if pr == nil {
		return nil
	}
	h := pr.opened[k]
	delete(pr.opened, k)
	return h
}

// udpSocketsLocked returns why p may not open the public UDP sockets spec
// still needs (the ports it does not hold, on every bind address) and the
// cap that says so, or "".
func (r *Relay) udpSocketsLocked(p *relayPeer, spec conf.PortSpec) (string, int) {
	if spec.Proto != conf.UDP {
		return "", 0
	}
	n := 0
	for port := int(spec.Ports.Lo); port <= int(spec.Ports.Hi); port++ {
		if k := (portKey{conf.UDP, uint16(port)}); p.holdings[k] == nil && !p.reserved[k] {
			n++
		}
	}
	need := n * len(r.binds)
	if need == 0 {
		return "", 0
	}
	peerMax := r.cfg.Relay.PeerLimits(&p.cfg).MaxUDPSockets
	switch {
	case peerMax > 0 && p.udpSockets+need > peerMax:
		return fmt.Sprintf("needs %d public UDP sockets (%d ports on %d bind addresses); the peer holds %d of its max_udp_sockets %d",
			need, n, len(r.binds), p.udpSockets, peerMax), refusedUDPSocketsPeer
	case r.cfg.Relay.MaxUDPSockets > 0 && r.udpSockets+need > r.cfg.Relay.MaxUDPSockets:
		return fmt.Sprintf("needs %d public UDP sockets (%d ports on %d bind addresses); the relay has %d of its max_udp_sockets %d open",
			need, n, len(r.binds), r.udpSockets, r.cfg.Relay.MaxUDPSockets), refusedUDPSocketsRelay
	}
	return "", 0
}

// Why a spec's registration was refused by a cap, counted per peer.
const (
	refusedUDPSocketsPeer  = iota // the peer's max_udp_sockets
	refusedUDPSocketsRelay        // the relay's max_udp_sockets
	numPortRefusals
)

var portRefusalNames = [numPortRefusals]string{"udp_sockets_peer", "udp_sockets_relay"}

// coversAny reports whether spec (as a result names it) covers a port in free.
func coversAny(spec string, free map[portKey]bool) bool {
	s, err := parseWireSpec(spec)
	if err != nil {
		return false
	}
	for p := int(s.Ports.Lo); p <= int(s.Ports.Hi); p++ {
		if free[portKey{s.Proto, uint16(p)}] {
			return true
		}
	}
	return false
}

// openLocked opens k's public sockets on every bind address for p and
// starts serving them.
func (r *Relay) openLocked(p *relayPeer, k portKey, udpIdle time.Duration) (*holding, error) {
	h, err := r.openSockets(p, k, udpIdle)
	if err != nil {
		return nil, err
	}
	r.installLocked(h)
	return h, nil
}

// openSockets opens k's public sockets on every bind address for p; it
// needs no lock. The caller installs the holding or closes it.
func (r *Relay) openSockets(p *relayPeer, k portKey, udpIdle time.Duration) (*holding, error) {
	ctx, cancel := context.WithCancel(r.ctx)
	h := &holding{key: k, peer: p, ctx: ctx, cancel: cancel, udpIdle: udpIdle}
	for _, a := range r.binds {
		a = a.Unmap()
		ap := netip.AddrPortFrom(a, k.port).String()
		var lc net.ListenConfig
		switch k.proto {
		case conf.TCP:
			// "tcp6" sets IPV6_V6ONLY, so 0.0.0.0 and :: can both hold the port.
			ln, err := lc.Listen(r.ctx, "tcp"+family(a), ap)
			if err != nil {
				h.closeSockets()
				cancel()
				return nil, bindError(ap, err)
			}
			h.lns = append(h.lns, ln)
		case conf.UDP:
			pc, err := lc.ListenPacket(r.ctx, "udp"+family(a), ap)
			if err != nil {
				h.closeSockets()
				cancel()
				return nil, bindError(ap, err)
			}
			uc := pc.(*net.UDPConn)
			setUDPBuffers(uc)
			h.pcs = append(h.pcs, uc)
			pw, err := rawsock.NewPacketWriter(uc)
			if err != nil {
				h.closeSockets()
				cancel()
				return nil, bindError(ap, err)
			}
			h.pws = append(h.pws, pw)
		}
	}
	return h, nil
}

// installLocked makes h one of its peer's holdings, served once the rules
// are synced.
func (r *Relay) installLocked(h *holding) {
	p, k := h.peer, h.key
	p.holdings[k] = h
	p.udpSockets += len(h.pcs)
	r.udpSockets += len(h.pcs)
	r.rulesDirty = true
	r.reg.take(p.name, k)
	r.log.Info("port opened", zap.String("peer", p.name), zap.Stringer("listen", k))
}

// discard closes a holding that was never installed.
func (h *holding) discard() {
	h.cancel()
	h.closeSockets()
}

// releaseLocked closes h's sockets and flows and frees its port.
func (r *Relay) releaseLocked(h *holding) {
	p := h.peer
	delete(p.holdings, h.key)
	p.udpSockets -= len(h.pcs)
	r.udpSockets -= len(h.pcs)
	r.reg.release(p.name, h.key)
	h.cancel()
	h.closeSockets()
	r.rulesDirty = true
	r.log.Info("port closed", zap.String("peer", p.name), zap.Stringer("listen", h.key))
}

func (h *holding) closeSockets() {
	for _, ln := range h.lns {
		ln.Close()
	}
	for _, pc := range h.pcs {
		pc.Close()
	}
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "4"
	}
	return "6"
}

// bindError is the reason sent to the appliance when a public socket
// cannot be opened, e.g. "cannot bind 0.0.0.0:443: address already in use".
func bindError(addr string, err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return fmt.Errorf("cannot bind %s: %w", addr, err)
	}
	if errno == syscall.EACCES {
		return fmt.Errorf("cannot bind %s: %s; ports below 1024 need CAP_NET_BIND_SERVICE", addr, errno)
	}
	return fmt.Errorf("cannot bind %s: %s", addr, errno)
}

// acceptLoop serves one public TCP listener until it is closed.
func (r *Relay) acceptLoop(h *holding, ln net.Listener) {
	defer r.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || h.ctx.Err() != nil {
				return
			}
			r.log.Warn("accept public connection", zap.Stringer("listen", ln.Addr()), zap.Error(err))
			select { // e.g. out of file descriptors: do not spin
			case <-time.After(100 * time.Millisecond):
			case <-h.ctx.Done():
				return
			}
			continue
		}
		r.wg.Add(1)
		go r.serveTCP(h, c)
	}
}

func unmapPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func keysOf(m map[portKey]*holding) []portKey {
	keys := make([]portKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

// compressKeys sorts keys and merges runs of consecutive ports into ranges.
func compressKeys(keys []portKey) []conf.PortSpec {
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].proto != keys[j].proto {
			return keys[i].proto < keys[j].proto
		}
		return keys[i].port < keys[j].port
	})
	var out []conf.PortSpec
	for _, k := range keys {
		if n := len(out); n > 0 && out[n-1].Proto == k.proto && int(out[n-1].Ports.Hi)+1 == int(k.port) {
			out[n-1].Ports.Hi = k.port
			continue
		}
		out = append(out, conf.PortSpec{Proto: k.proto, Ports: conf.PortRange{Lo: k.port, Hi: k.port}})
	}
	return out
}

func specStrings(specs []conf.PortSpec) []string {
	out := make([]string, len(specs))
	for i, s := range specs {
		out[i] = s.String()
	}
	return out
}

// ListenPort returns the UDP port WireGuard listens on (useful when
// relay.listen asked for port 0).
func (r *Relay) ListenPort() (uint16, error) { return boundPort(r.dev) }
