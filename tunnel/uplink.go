package tunnel

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/conf"
)

// ControlDialer dials TCP from the appliance's own stack, through the
// tunnel. *netstack.Stack implements it.
type ControlDialer interface {
	DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)
}

// everywhere is every destination: the relay's stack answers for all the
// addresses an uplink sends to.
var everywhere = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// Uplink states, as shown by Status.
const (
	StateConnecting = "connecting"
	StateRegistered = "registered"
)

const (
	// staleHandshake is when the tunnel counts as down: past it, wireguard-go
	// rejects the session's keys (RejectAfterTime).
	staleHandshake  = 180 * time.Second
	minBackoff      = time.Second
	maxBackoff      = 30 * time.Second
	controlDialWait = 10 * time.Second
	statsInterval   = 30 * time.Second
	tunnelCheck     = 5 * time.Second
)

// Uplink is the appliance side of relay mode: a WireGuard tunnel to the
// relay and the control client that registers this appliance's ports there,
// re-registering after any failure (relay restart, roaming, lost tunnel).
type Uplink struct {
	cfg    *conf.Uplink
	dev    *wgDevice
	client *streamClient // the bind's transport switch and TCP stream
	dialer UplinkStack
	log    *zap.Logger
	opts   options
	gates  gates // bound the data packets each direction of dev holds
	path   pathState
	warm   warmServed

	host string // the relay's host and port, re-resolved on failure
	port uint16

	kick      chan struct{} // SetPorts wakes the control loop
	warmReset chan struct{} // the path MTU changed: the relay's warm streams must go
	closed    chan struct{}
	closeOnce sync.Once
	running   atomic.Bool    // Run was called
	runWG     sync.WaitGroup // Run's goroutines

	// mu guards the following fields.
	mu       sync.Mutex
	ports    []string         // wanted specs, single-protocol
	udpIdle  map[string]int64 // UDP idle timeout (ms) of wanted udp specs that have one
	state    string
	endpoint netip.AddrPort
	results  map[string]message // last result per spec
	pending  int                // results still due for the last register
	peerName string             // as the relay knows us
	tr       transportState
}

// NewUplink configures a WireGuard device on dev with the relay as its only
// peer and returns an Uplink; Run resolves the relay and keeps the
// registration. Nothing is sent before Run: the peer has no endpoint until
// Run resolves the relay. The goroutines NewUplink starts are
// wireguard-go's own (device.NewDevice starts its routines, and dev's
// EventUp brings the device up from one of them: its API has no way to
// build a device that waits). It takes ownership of dev (closed by Close, or before
// returning an error). dialer is the appliance stack, used to reach the
// relay's control port through the tunnel, and to probe the path's MTU
// (pathmtu.go). cmd creates dev and the stack with cfg.MaxMTU.
func NewUplink(cfg *conf.Uplink, dev tun.Device, dialer UplinkStack, log *zap.Logger, opts ...Option) (*Uplink, error) {
	u, err := newUplink(cfg, dev, dialer, log, opts)
	if err != nil {
		if dev != nil {
			dev.Close()
		}
		return nil, err
	}
	return u, nil
}

func newUplink(cfg *conf.Uplink, dev tun.Device, dialer UplinkStack, log *zap.Logger, opts []Option) (*Uplink, error) {
	switch {
	case cfg == nil:
		return nil, errors.New("new uplink: no config")
	case dev == nil:
		return nil, errors.New("new uplink: no tunnel device")
	case dialer == nil:
		return nil, errors.New("new uplink: no control dialer")
	case log == nil:
		return nil, errors.New("new uplink: no logger")
	case cfg.PrivateKey.IsZero():
		return nil, errors.New("new uplink: uplink.private_key is not set; create one with natbox genkey")
	case cfg.RelayPublicKey.IsZero():
		return nil, errors.New("new uplink: uplink.relay_public_key is not set; copy it from the relay (natbox pubkey)")
	case !cfg.Address.Unmap().Is4() || !cfg.RelayAddress.Unmap().Is4():
		return nil, fmt.Errorf("new uplink: uplink.address %q and relay_address %q must be IPv4 addresses",
			cfg.Address, cfg.RelayAddress)
	}
	host, portText, err := net.SplitHostPort(cfg.Relay)
	if err != nil {
		return nil, fmt.Errorf("new uplink: uplink.relay %q: %w; write host:port, e.g. \"relay.example.net:51820\"", cfg.Relay, err)
	}
	port, err := net.LookupPort("udp", portText)
	if err != nil {
		return nil, fmt.Errorf("new uplink: uplink.relay %q: %w", cfg.Relay, err)
	}
	if mtu, err := dev.MTU(); err == nil && cfg.MaxMTU != 0 && mtu != cfg.MaxMTU {
		log.Warn("tunnel device mtu differs from uplink.max_mtu", zap.Int("device_mtu", mtu), zap.Int("max_mtu", cfg.MaxMTU))
	}
	client := newStreamClient(newUDPBind())
	o := buildOptions(opts)
	gate := gateSize(o.bufferMemory)
	d, g, err := newDevice(dev, client.bind, cfg.PrivateKey, 0, gate, log)
	if err != nil {
		return nil, err
	}
	// Allowed IPs are everything: public clients' real addresses come through.
	// Keepalives start with the endpoint (resolve): one sent before would fail
	// and hold the first real handshake back by wireguard-go's 5 s rekey timer.
	uapi := peerUAPI(cfg.RelayPublicKey, netip.AddrPort{}, 0,
		[]netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")})
	if err := d.IpcSet(uapi); err != nil {
		d.Close()
		return nil, fmt.Errorf("configure relay peer: %w", err)
	}
	u := &Uplink{
		cfg:       cfg,
		dev:       d,
		client:    client,
		dialer:    dialer,
		log:       log,
		opts:      o,
		gates:     g,
		host:      host,
		port:      uint16(port),
		kick:      make(chan struct{}, 1),
		warmReset: make(chan struct{}, 1),
		closed:    make(chan struct{}),
		state:     StateConnecting,
		results:   make(map[string]message),
	}
	u.path.mtu.Store(int64(cfg.MTU))
	u.path.kick = make(chan struct{}, 1)
	return u, nil
}

// SetPorts sets the ports this appliance wants on the relay (the listen
// ports of its uplink mappings) and re-registers if connected. Call it at
// start and on every reload. Safe for concurrent use.
func (u *Uplink) SetPorts(specs []conf.PortSpec) {
	wanted := make([]WantedPort, len(specs))
	for i, s := range specs {
		wanted[i] = WantedPort{Spec: s}
	}
	u.SetWanted(wanted)
}

// WantedPort is a port spec an appliance wants on the relay, with the
// idle timeout of its UDP sessions there (0: the relay's default).
type WantedPort struct {
	Spec    conf.PortSpec
	UDPIdle time.Duration
}

// SetWanted is SetPorts with each spec's UDP idle timeout, which the relay
// applies to its public sessions of that spec.
func (u *Uplink) SetWanted(ports []WantedPort) {
	var specs []conf.PortSpec
	idle := make(map[string]int64)
	for _, w := range ports {
		for _, s := range splitProtos([]conf.PortSpec{w.Spec}) {
			specs = append(specs, s)
			if ms := w.UDPIdle.Milliseconds(); s.Proto == conf.UDP && ms > 0 {
				idle[s.String()] = max(idle[s.String()], ms) // one spec in two mappings: the longer
			}
		}
	}
	wanted := specStrings(specs)
	sort.Strings(wanted)
	wanted = slices.Compact(wanted)
	u.mu.Lock()
	changed := !slices.Equal(wanted, u.ports) || !maps.Equal(idle, u.udpIdle)
	u.ports = wanted
	u.udpIdle = idle
	for spec := range u.results {
		if !slices.Contains(wanted, spec) {
			delete(u.results, spec)
		}
	}
	u.mu.Unlock()
	if changed {
		select {
		case u.kick <- struct{}{}:
		default:
		}
	}
}

// Run keeps the tunnel and the registration up until ctx is done or Close
// is called, then closes the uplink and returns once every goroutine it
// started has stopped. On a closed Uplink, and a second time, it returns
// ErrClosed at once.
func (u *Uplink) Run(ctx context.Context) error {
	select {
	case <-u.closed:
		return ErrClosed
	default:
	}
	if !u.running.CompareAndSwap(false, true) {
		return ErrClosed
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	u.runWG.Add(2)
	go func() {
		defer u.runWG.Done()
		select {
		case <-u.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	go func() {
		defer u.runWG.Done()
		u.monitorLoop(ctx)
	}()
	u.runWG.Add(1)
	go func() {
		defer u.runWG.Done()
		u.transportLoop(ctx)
	}()
	u.runWG.Add(1)
	go func() {
		defer u.runWG.Done()
		u.pathLoop(ctx)
	}()
	u.log.Info("uplink starting", zap.String("relay", u.cfg.Relay), zap.Stringer("address", u.cfg.Address))
	backoff := minBackoff
	failures := 0
	for ctx.Err() == nil {
		u.resolve(ctx)
		registered, err := u.controlSession(ctx)
		if ctx.Err() != nil {
			break
		}
		u.setState(StateConnecting)
		if registered {
			backoff, failures = minBackoff, 0
		}
		// The first failure in a row is news; the retries that follow are not.
		if failures++; failures == 1 {
			u.log.Warn("relay control connection lost; reconnecting", zap.Error(err))
		} else {
			u.log.Debug("relay control connection failed", zap.Error(err), zap.Int("count", failures))
		}
		// The relay may have restarted and lost our session keys: start a new
		// handshake at once instead of waiting for wireguard-go's timers.
		if p := u.dev.LookupPeer(device.NoisePublicKey(u.cfg.RelayPublicKey)); p != nil {
			p.ExpireCurrentKeypairs()
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(backoff*2, maxBackoff)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
	}
	cancel()
	u.runWG.Wait()
	return u.Close()
}

// Close closes the WireGuard device (and so the tun.Device). Idempotent.
func (u *Uplink) Close() error {
	u.closeOnce.Do(func() {
		close(u.closed)
		u.dev.Close()
	})
	return nil
}

// resolve looks the relay up and points WireGuard at it when the address
// changed. Failures are logged; the old endpoint stays.
func (u *Uplink) resolve(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, controlDialWait)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", u.host)
	if err != nil || len(addrs) == 0 {
		u.log.Warn("cannot resolve relay; check uplink.relay and DNS", zap.String("relay", u.cfg.Relay), zap.Error(err))
		return
	}
	u.mu.Lock()
	cur := u.endpoint
	u.mu.Unlock()
	for _, a := range addrs {
		if netip.AddrPortFrom(a.Unmap(), u.port) == cur {
			return // still valid
		}
	}
	ep := netip.AddrPortFrom(addrs[0].Unmap(), u.port)
	uapi := fmt.Sprintf("public_key=%s\nendpoint=%s\npersistent_keepalive_interval=%d\n",
		u.cfg.RelayPublicKey.Hex(), ep, int(u.cfg.Keepalive.D()/time.Second))
	if err := u.dev.IpcSet(uapi); err != nil {
		u.log.Warn("set relay endpoint", zap.Stringer("dst", ep), zap.Error(err))
		return
	}
	// A new endpoint deserves a handshake now, not after the rekey timer.
	// Only a move drops the keys: on the first endpoint there are none, and
	// the IpcSet above may just have sent an initiation (turning the
	// persistent keepalive on sends one); expiring would let a second one
	// leave within the same TAI64N tick, which the relay rejects as a
	// replay while the first one's response no longer matches, and the
	// tunnel waits out wireguard-go's 5 s retry.
	if p := u.dev.LookupPeer(device.NoisePublicKey(u.cfg.RelayPublicKey)); p != nil {
		if cur.IsValid() {
			p.ExpireCurrentKeypairs()
		}
		p.SendKeepalive()
	}
	u.mu.Lock()
	u.endpoint = ep
	u.mu.Unlock()
	u.log.Info("relay endpoint set", zap.Stringer("dst", ep))
}

// controlSession dials the relay's control port through the tunnel,
// registers the wanted ports and keeps the session alive until it fails or
// ctx is done. registered reports whether the relay answered the hello.
func (u *Uplink) controlSession(ctx context.Context) (registered bool, err error) {
	src := netip.AddrPortFrom(u.cfg.Address.Unmap(), 0)
	dst := netip.AddrPortFrom(u.cfg.RelayAddress.Unmap(), ControlPort)
	dctx, cancel := context.WithTimeout(ctx, controlDialWait)
	c, err := u.dialer.DialTCP(dctx, src, dst)
	cancel()
	if err != nil {
		return false, fmt.Errorf("dial relay control %s: %w", dst, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	cc := newControlConn(c)
	if err := cc.write(message{Type: msgHello, Version: u.opts.version, ChecksumsOptional: u.opts.checksumsOptional != nil,
		WarmStreams: u.opts.warmMax > 0}, controlWriteTimeout); err != nil {
		return false, fmt.Errorf("send hello: %w", err)
	}
	hello, err := cc.read(u.opts.pingTimeout)
	if err != nil {
		return false, fmt.Errorf("read relay hello: %w", err)
	}
	if hello.Type != msgHello {
		return false, fmt.Errorf("relay answered %q to hello: %s", hello.Type, hello.Reason)
	}
	u.mu.Lock()
	u.peerName = hello.Peer
	u.mu.Unlock()
	if set := u.opts.checksumsOptional; set != nil && hello.ChecksumsOptional {
		set(everywhere)
		defer set(nil) // the next relay may be an older one
	}
	u.log.Info("relay control connected", zap.String("peer", hello.Peer), zap.String("version", hello.Version))

	readErr := make(chan error, 1)
	u.runWG.Add(1)
	go func() {
		defer u.runWG.Done()
		readErr <- u.readLoop(cc)
	}()
	defer func() { c.Close(); <-readErr }()

	if err := u.register(cc); err != nil {
		return true, err
	}
	// The session shows the tunnel works: find its MTU (pathmtu.go).
	u.kickProbe()
	ping := time.NewTicker(u.opts.pingInterval)
	defer ping.Stop()
	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case err := <-readErr:
			readErr <- err // for the deferred drain
			return true, err
		case <-u.kick:
			if err := u.register(cc); err != nil {
				return true, err
			}
		case <-u.warmReset:
			if err := cc.write(message{Type: msgWarm}, controlWriteTimeout); err != nil {
				return true, fmt.Errorf("send warm_reset: %w", err)
			}
		case <-ping.C:
			if err := cc.write(message{Type: msgPing}, controlWriteTimeout); err != nil {
				return true, fmt.Errorf("send ping: %w", err)
			}
		}
	}
}

// register sends the whole wanted set.
func (u *Uplink) register(cc *controlConn) error {
	u.mu.Lock()
	ports := slices.Clone(u.ports)
	idle := maps.Clone(u.udpIdle)
	u.pending = len(ports)
	if len(ports) == 0 {
		u.state = StateRegistered
	}
	u.mu.Unlock()
	if len(idle) == 0 {
		idle = nil
	}
	if err := cc.write(message{Type: msgRegister, Ports: ports, UDPIdle: idle}, controlWriteTimeout); err != nil {
		return fmt.Errorf("send register: %w", err)
	}
	return nil
}

// readLoop handles the relay's messages until the connection fails or the
// relay goes quiet past the ping timeout.
func (u *Uplink) readLoop(cc *controlConn) error {
	for {
		m, err := cc.read(u.opts.pingTimeout)
		if err != nil {
			return fmt.Errorf("read relay control: %w", err)
		}
		switch m.Type {
		case msgResult:
			u.handleResult(m)
		case msgError:
			return fmt.Errorf("relay: %s", m.Reason)
		}
	}
}

// handleResult records one result; a refusal is logged when it is new or
// its reason changed, so a reconnecting uplink does not repeat itself.
func (u *Uplink) handleResult(m message) {
	u.mu.Lock()
	if !slices.Contains(u.ports, m.Port) {
		u.mu.Unlock()
		return // an answer to a set we no longer want
	}
	prev, seen := u.results[m.Port]
	u.results[m.Port] = m
	if u.pending > 0 {
		// Registered once the relay has answered every spec of the register.
		if u.pending--; u.pending == 0 {
			u.state = StateRegistered
		}
	}
	u.mu.Unlock()
	switch {
	case !m.OK && (!seen || prev.OK || prev.Reason != m.Reason):
		u.log.Warn("relay refused port", zap.String("port", m.Port), zap.String("reason", m.Reason))
	case m.OK && (!seen || !prev.OK):
		u.log.Info("relay port registered", zap.String("port", m.Port))
	}
}

func (u *Uplink) setState(s string) {
	u.mu.Lock()
	u.state = s
	u.mu.Unlock()
}

// monitorLoop logs the tunnel going up or down at info and its handshake age
// and bytes at debug.
func (u *Uplink) monitorLoop(ctx context.Context) {
	check := time.NewTicker(tunnelCheck)
	defer check.Stop()
	lastStats := time.Now()
	up := false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-check.C:
			st := u.Status()
			fresh := !st.LastHandshake.IsZero() && now.Sub(st.LastHandshake) < staleHandshake
			if fresh != up {
				up = fresh
				if up {
					u.log.Info("tunnel up", zap.String("endpoint", st.Endpoint))
				} else {
					u.log.Info("tunnel down", zap.Time("last_handshake", st.LastHandshake))
				}
			}
			if now.Sub(lastStats) >= statsInterval {
				lastStats = now
				u.log.Debug("tunnel stats", zap.Duration("handshake_age", st.HandshakeAge()),
					zap.Uint64("bytes_rx", st.RxBytes), zap.Uint64("bytes_tx", st.TxBytes))
			}
		}
	}
}

// UplinkStatus is a snapshot of the uplink for the admin API.
type UplinkStatus struct {
	State         string            `json:"state"` // StateConnecting, or StateRegistered once the relay answered every port
	Relay         string            `json:"relay"`
	Endpoint      string            `json:"endpoint,omitempty"`
	Peer          string            `json:"peer,omitempty"` // our name on the relay
	LastHandshake time.Time         `json:"last_handshake"` // zero: never
	RxBytes       uint64            `json:"rx_bytes"`
	TxBytes       uint64            `json:"tx_bytes"`
	Registered    []string          `json:"registered"`        // e.g. "tcp/443"
	Refused       map[string]string `json:"refused,omitempty"` // spec -> reason

	// Transport is what WireGuard rides now, TransportUDP or TransportTCP
	// (TLS to relay_tcp); SwitchReason says why it last changed, and
	// TransportError why the last TCP connect failed ("" once one works).
	Transport      string `json:"transport"`
	SwitchReason   string `json:"switch_reason,omitempty"`
	TransportError string `json:"transport_error,omitempty"`
	// The WireGuard device's gates (gate.go): packets each direction may
	// hold, packets held now, and reopenings after a stall.
	GatePackets int64  `json:"gate_packets"`
	GateHeld    int64  `json:"gate_held"`
	GateStalls  uint64 `json:"gate_stalls"`
	// WireGuard transport messages received from the relay, and those of
	// them the path lost on the way, estimated from the gaps in their
	// counters (lossmeter.go): what slows the tunnel's TCP flows on a lossy
	// path (README, "Slow through the relay").
	DatagramsIn   uint64 `json:"datagrams_in"`
	DatagramsLost uint64 `json:"datagrams_lost"`
	// UsingTCP is Transport == "tcp", for /metrics; TCPForLoss says it is
	// there because UDP lost (uplink.loss_fallback), not for want of an
	// answer over UDP or by configuration.
	UsingTCP          bool   `json:"using_tcp"`
	TCPForLoss        bool   `json:"tcp_for_loss"`
	TransportSwitches uint64 `json:"transport_switches"`
	// TCPConnects and TCPConnectFailures count TLS connections to relay_tcp
	// made and failed; TCPDropped counts WireGuard messages dropped on the
	// TCP path (no connection up, or its write queue full).
	TCPConnects        uint64 `json:"tcp_connects"`
	TCPConnectFailures uint64 `json:"tcp_connect_failures"`
	TCPDropped         uint64 `json:"tcp_dropped"`
	// TCPCongestion is the congestion control the last TCP connection to
	// relay_tcp ran (uplink.tcp_congestion, or the kernel's default where
	// the kernel refused it; congestion.go).
	TCPCongestion string `json:"tcp_congestion,omitempty"`
	// MTU is the tunnel MTU in use (uplink.mtu, or more where the path
	// probe showed the path carries it); PathProbes counts the probe's
	// echo requests and PathProbesLost those that got no echo.
	MTU            int64  `json:"mtu"`
	PathProbes     uint64 `json:"path_probes"`
	PathProbesLost uint64 `json:"path_probes_lost"`
	// The relay's warm streams (warm.go): waiting for a public flow now,
	// that carried one, refused past the bound on waiting ones, and closed
	// for a malformed header.
	WarmStreamsWaiting int64  `json:"warm_streams_waiting"`
	WarmStreamsServed  uint64 `json:"warm_streams_served"`
	WarmStreamsRefused uint64 `json:"warm_streams_refused"`
	WarmStreamsBad     uint64 `json:"warm_streams_bad"`
}

// HandshakeAge is the time since the last handshake, or -1 if none yet.
func (s UplinkStatus) HandshakeAge() time.Duration { return handshakeAge(s.LastHandshake) }

func handshakeAge(last time.Time) time.Duration {
	if last.IsZero() {
		return -1
	}
	return time.Since(last)
}

// Status returns a snapshot of the uplink.
func (u *Uplink) Status() UplinkStatus {
	u.mu.Lock()
	st := UplinkStatus{State: u.state, Relay: u.cfg.Relay, Peer: u.peerName, Transport: TransportUDP,
		SwitchReason: u.tr.reason, TransportError: u.tr.lastError, TransportSwitches: u.tr.switches,
		TCPConnects: u.tr.connects, TCPConnectFailures: u.tr.failures, TCPDropped: u.client.bind.cnt.dropped.Load(),
		TCPCongestion: u.tr.congestion}
	if u.client.tcp.Load() {
		st.Transport, st.UsingTCP, st.TCPForLoss = TransportTCP, true, u.tr.forLoss
	}
	st.GatePackets, st.GateHeld, st.GateStalls = u.gates.status()
	st.DatagramsIn, st.DatagramsLost = u.gates.loss.counts()
	st.MTU, st.PathProbes, st.PathProbesLost = u.path.mtu.Load(), u.path.probes.Load(), u.path.lost.Load()
	st.WarmStreamsWaiting, st.WarmStreamsServed = u.warm.waiting.Load(), u.warm.served.Load()
	st.WarmStreamsRefused, st.WarmStreamsBad = u.warm.refused.Load(), u.warm.bad.Load()
	for _, spec := range u.ports {
		m, ok := u.results[spec]
		switch {
		case !ok:
		case m.OK:
			st.Registered = append(st.Registered, spec)
		default:
			if st.Refused == nil {
				st.Refused = make(map[string]string)
			}
			st.Refused[spec] = m.Reason
		}
	}
	u.mu.Unlock()
	stats, err := readPeerStats(u.dev)
	if err != nil {
		u.log.Debug("uplink status", zap.Error(err))
	}
	if s, ok := stats[u.cfg.RelayPublicKey]; ok {
		st.Endpoint, st.LastHandshake, st.RxBytes, st.TxBytes = s.Endpoint, s.LastHandshake, s.RxBytes, s.TxBytes
	}
	if s := u.client.cur.Load(); st.UsingTCP && s != nil && !s.closed() {
		st.Endpoint = s.ep.DstToString()
	}
	return st
}
