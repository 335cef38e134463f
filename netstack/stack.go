// Package netstack is natbox's only home of gVisor: one userspace TCP/IP stack
// per Stack, whose single NIC is a tun.Device (a kernel TUN from CreateTUN, the
// stack side of a Direct pair towards a wireguard-go device, or one end of a
// Pipe joining two stacks). It terminates TCP and UDP flows addressed to any
// destination (promiscuous + spoofing) and hands them to a Handler as
// net.Conns and datagrams with their real addresses; it knows nothing about
// mappings.
package netstack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Config configures a Stack. Zero values mean the documented defaults.
type Config struct {
	// MTU of the link; 0 means the tun.Device's MTU.
	MTU int
	// PathMTU is the MTU of the stack's routes at start (0: MTU); see
	// SetPathMTU (pathmtu.go).
	PathMTU int
	// Addresses are assigned to the NIC. Promiscuous mode and spoofing accept
	// and originate any address anyway; these matter for ICMP echo and as the
	// stack's preferred source addresses.
	Addresses []netip.Prefix
	TCP       TCPConfig
	// QueueLen is the outward queue's capacity in MTU-sized packets
	// (default 2048; a TSO frame counts as its size in MTUs). Writers block
	// when it is full.
	QueueLen int
}

// TCPConfig holds the TCP knobs.
type TCPConfig struct {
	// RecvBufMax and SendBufMax cap the buffers per connection (default
	// 16 MiB each: a window of 8 MiB, 1.3 Gbit/s at a 50 ms round trip;
	// the relay's WAN benchmarks in tunnel/BENCH.md).
	RecvBufMax int
	SendBufMax int
	// RACK enables RACK loss detection. Off by default: with it on, gVisor
	// stalled transfers (tailscale#9707).
	RACK bool
	// KeepaliveIdle and KeepaliveInterval set TCP keepalive on every endpoint
	// (defaults 60 s and 15 s, 9 probes): a dead client must not pin a
	// splice forever.
	KeepaliveIdle     time.Duration
	KeepaliveInterval time.Duration
	// TimeWait is how long a closed endpoint stays in TIME_WAIT (0: gVisor's
	// 60 s). A new SYN for a TIME_WAIT 4-tuple is accepted regardless (see
	// reopenTimeWait), so this only bounds memory.
	TimeWait time.Duration
	// MaxClosing bounds the endpoints kept past ESTABLISHED (TIME_WAIT and
	// the FIN states; default 256, ~1.5 MiB): at it, connections skip
	// TIME_WAIT until half of them are gone (timewait.go). Negative: no
	// bound.
	MaxClosing int
	// OrphanTimeout bounds how long a connection natbox closed may keep
	// trying to deliver what it still holds (default 60 s, as Linux gives
	// an orphaned socket; tcpConn.Close).
	OrphanTimeout time.Duration
	// MaxInFlight bounds handshakes handed to the Handler at once (default
	// 8192); SYNs beyond it are dropped by gVisor and counted in
	// Stats.TCPInFlightDrops. Admission budgets belong to the forwarder.
	MaxInFlight int
	// HandshakeTimeout bounds how long TCPRequest.Accept waits for the
	// client's ACK after sending the SYN-ACK (default 3 s: room for two
	// retransmits). A client that never answers (a spoofed SYN) makes Accept
	// fail with ErrHandshakeTimeout, so the handler releases the target
	// connection it dialed first; gVisor alone would wait about 2 minutes.
	HandshakeTimeout time.Duration
	// CookiePortThreshold and CookieTotalThreshold switch a port to SYN
	// cookies (see syncookie.go): a SYN that finds this many handshakes
	// pending on its port (default 64) or in total (default 512), each
	// raised by the rate at which handshakes complete there
	// (pendingLimit), opens a cookie listener on the port, and from then on
	// its handshakes complete before the Handler is called. Negative
	// disables cookie mode.
	CookiePortThreshold  int
	CookieTotalThreshold int
	// MaxCookiePorts caps the ports in cookie mode at once (default 1024);
	// beyond it SYNs take the normal path (Stats.CookiePortsOverflow).
	MaxCookiePorts int
	// CookieIdle is how long a cookie port must see no SYN, or see its
	// SYNs at least half answered, and no pressure, before it leaves
	// cookie mode (default 10 s).
	CookieIdle time.Duration
	// BufferBudget bounds, in bytes, the receive and send buffers of all
	// TCP connections together (see connBudget): light connections an
	// equal share of at most 1 MiB, those carrying bulk data the rest, no
	// less than 16 KiB and no more than RecvBufMax / SendBufMax, so more
	// connections mean smaller windows rather than more memory.
	// 0: no budget, each connection auto-tunes up to the maxima.
	BufferBudget int
}

// Defaults.
const (
	defaultQueueLen          = 2048
	defaultRecvBufMax        = 16 << 20
	defaultSendBufMax        = 16 << 20
	defaultBufMin            = 4 << 10
	defaultBufDefault        = 1 << 20
	defaultKeepaliveIdle     = 60 * time.Second
	defaultKeepaliveInterval = 15 * time.Second
	defaultMaxInFlight       = 8192
	defaultHandshakeTimeout  = 3 * time.Second
	defaultCookiePort        = 64
	defaultCookieTotal       = 512
	defaultMaxCookiePorts    = 1024
	defaultCookieIdle        = 10 * time.Second
	defaultMaxClosing        = 256
	defaultOrphanTimeout     = 60 * time.Second
	nicID                    = tcpip.NICID(1)
	// flushTimeout bounds how long Close waits for the outward queue to drain.
	flushTimeout = 2 * time.Second
)

func (c *Config) applyDefaults() {
	if c.QueueLen == 0 {
		c.QueueLen = defaultQueueLen
	}
	t := &c.TCP
	if t.RecvBufMax == 0 {
		t.RecvBufMax = defaultRecvBufMax
	}
	if t.SendBufMax == 0 {
		t.SendBufMax = defaultSendBufMax
	}
	if t.KeepaliveIdle == 0 {
		t.KeepaliveIdle = defaultKeepaliveIdle
	}
	if t.KeepaliveInterval == 0 {
		t.KeepaliveInterval = defaultKeepaliveInterval
	}
	if t.MaxInFlight == 0 {
		t.MaxInFlight = defaultMaxInFlight
	}
	if t.HandshakeTimeout <= 0 {
		t.HandshakeTimeout = defaultHandshakeTimeout
	}
	if t.CookiePortThreshold == 0 {
		t.CookiePortThreshold = defaultCookiePort
	}
	if t.CookieTotalThreshold == 0 {
		t.CookieTotalThreshold = defaultCookieTotal
	}
	if t.MaxCookiePorts <= 0 {
		t.MaxCookiePorts = defaultMaxCookiePorts
	}
	if t.CookieIdle <= 0 {
		t.CookieIdle = defaultCookieIdle
	}
	if t.MaxClosing == 0 {
		t.MaxClosing = defaultMaxClosing
	}
	if t.OrphanTimeout <= 0 {
		t.OrphanTimeout = defaultOrphanTimeout
	}
}

// Handler receives the flows a Stack terminates.
type Handler interface {
	// HandleTCP is called on its own goroutine for each new connection
	// attempt: a SYN, or, on a port in SYN-cookie mode, a connection whose
	// handshake a cookie completed (r.Established). Exactly one of r.Accept
	// or r.Reject must be called before HandleTCP returns (if neither was,
	// the request is rejected). Stack.Close waits for HandleTCP calls to
	// return; conns from Accept fail once the stack closes.
	HandleTCP(r *TCPRequest)
	// HandleUDP is called on the packet path for each datagram; it must not
	// block. payload is valid only during the call. On a multi-queue TUN it
	// is called concurrently, one caller per queue (a flow's datagrams stay
	// on one queue, in order).
	HandleUDP(src, dst netip.AddrPort, payload []byte)
}

// Errors.
var (
	// ErrClosed is returned by operations on a closed Stack.
	ErrClosed = errors.New("netstack: stack closed")
	// ErrMessageTooLong is returned by WriteUDP for a datagram that does not
	// fit the MTU: natbox never fragments.
	ErrMessageTooLong = errors.New("netstack: datagram exceeds the link mtu")
)

// Stack is one gVisor stack over one tun.Device. Its methods are safe for
// concurrent use.
type Stack struct {
	dev tun.Device
	// queues are the device's own queues when it is a vnetDevice (natbox's
	// kernel TUN): one input pump each, writes on the first.
	queues []frameQueue
	// queueFrames counts the frames each queue's pump read.
	queueFrames []atomic.Uint64
	cfg         Config
	handler     Handler
	// pathMTU is the path's MTU, shareMTU the budget's limit, routeMTU
	// what the link reports to gVisor (pathmtu.go); routeMu serializes
	// changes.
	pathMTU, shareMTU, routeMTU atomic.Int32
	routeMu                     sync.Mutex
	routes                      routeHistory
	probeSeq                    atomic.Uint32
	log                         *zap.Logger
	stack                       *stack.Stack
	link                        *linkEndpoint
	stats                       counters

	// closing is set first in Close: stop admitting flows and injecting input.
	closing   atomic.Bool
	closeOnce sync.Once
	closeErr  error

	admitMu sync.Mutex
	// admitMu guards admitting new handler calls against Close's Wait.
	admitClosed bool
	handlers    sync.WaitGroup

	pending    pendingRequests
	conns      connBudget
	timeWait   timeWaitCap
	handshakes *handshakeCounts
	cookies    cookiePorts

	directBufs [1][]byte // writeDirect's batch; used by one writer at a time
	// directItems and frameParts are writeFrames' (vnet), likewise.
	directItems [1]*outBuf
	frameParts  [][]byte
	// direct is set on a Direct pair's stack side: no pumps run, Run lets
	// the pair's reader and writers in instead.
	direct *directShared

	runMu sync.Mutex
	// runMu guards running and stopped: Run starts the pumps only on a
	// Stack that Close has not begun to stop, and Close waits for them only
	// if Run started them.
	running, stopped bool
	done             chan struct{} // closed when Close begins: ends Run's wait

	inputs     sync.WaitGroup // the input pumps, one per TUN queue
	outputDone chan struct{}
}

// counters are the Stack's own statistics (gVisor keeps the rest).
type counters struct {
	packetsIn, bytesIn   atomic.Uint64
	packetsOut, bytesOut atomic.Uint64
	groDelivered         atomic.Uint64 // packets GRO handed to the stack
	udpFastPath          atomic.Uint64
	udpReassembled       atomic.Uint64
	udpSent              atomic.Uint64
	tcpRequests          atomic.Uint64
	tcpRejected          atomic.Uint64
	timeWaitReopened     atomic.Uint64
	abandoned            atomic.Uint64
	oversize             atomic.Uint64
	handshakeTimeouts    atomic.Uint64
	cookieEntries        atomic.Uint64 // ports switched to cookie mode
	cookieExits          atomic.Uint64
	cookieOverflow       atomic.Uint64 // SYNs past MaxCookiePorts
	cookieFailures       atomic.Uint64 // cookie listeners that could not open
	cookieConns          atomic.Uint64 // connections cookies completed
	synRetransHeld       atomic.Uint64 // see noteSYN
	cookieExitSynsHeld   atomic.Uint64
	fragmentsIn          atomic.Uint64
	// lateTCPChecksum counts SYNs with a bad checksum dropped after
	// injection (synChecksumValid); reported in Invalid.TCPChecksum.
	lateTCPChecksum atomic.Uint64
	readBatches     atomic.Uint64 // dev.Read calls that returned packets
	gsoFramesIn     atomic.Uint64 // vnet frames of several segments read
	gsoFramesOut    atomic.Uint64 // TSO frames written
	writeBatches    atomic.Uint64 // dev.Write calls
	readErrors      atomic.Uint64
	writeErrors     atomic.Uint64
	invalid         [numDropReasons]atomic.Uint64
}

// New builds a Stack on dev; Run starts its input and output pumps, so no
// packet reaches h before Run: everything h needs can be wired between New
// and Run. The Stack owns dev from now on and closes it last in Close (also
// when New fails).
//
// gVisor's stack.New starts goroutines of its own (TCP's segment processors,
// timers); they wait for packets, which only Run's input pump delivers, and
// stop in Close.
func New(dev tun.Device, cfg Config, h Handler, log *zap.Logger) (*Stack, error) {
	if dev == nil || h == nil || log == nil {
		if dev != nil {
			dev.Close()
		}
		return nil, errors.New("netstack: New needs a tun.Device, a Handler and a logger")
	}
	if cfg.MTU == 0 {
		// Only asked when needed: a kernel TUN answers by name through a
		// socket of the caller's network namespace, which may not be the TUN's.
		devMTU, err := dev.MTU()
		if err != nil {
			dev.Close()
			return nil, fmt.Errorf("netstack: read device mtu (set Config.MTU to skip): %w", err)
		}
		cfg.MTU = devMTU
	}
	cfg.applyDefaults()
	if cfg.MTU < minLinkMTU || cfg.MTU > maxLinkMTU {
		dev.Close()
		return nil, fmt.Errorf("netstack: mtu %d out of range; use %d-%d", cfg.MTU, minLinkMTU, maxLinkMTU)
	}
	if cfg.PathMTU == 0 {
		cfg.PathMTU = cfg.MTU
	}
	if cfg.PathMTU < minLinkMTU || cfg.PathMTU > cfg.MTU {
		dev.Close()
		return nil, fmt.Errorf("netstack: path mtu %d out of range; use %d-%d (the link's mtu)", cfg.PathMTU, minLinkMTU, cfg.MTU)
	}
	s := &Stack{
		dev:        dev,
		cfg:        cfg,
		handler:    h,
		log:        log,
		done:       make(chan struct{}),
		outputDone: make(chan struct{}),
	}
	vdev, vnet := dev.(vnetDevice)
	if vnet {
		s.queues = vdev.frameQueues()
		s.queueFrames = make([]atomic.Uint64, len(s.queues))
	}
	s.pending.m = make(map[stack.TransportEndpointID]*TCPRequest)
	s.conns.init(s)
	s.handshakes = newHandshakeCounts(s.cookieMode())
	s.cookies.m = make(map[uint16]*cookieListener)
	s.cookies.stop = make(chan struct{})
	s.link = newLinkEndpoint(uint32(cfg.MTU), cfg.QueueLen, &s.stats, vnet)
	direct, isDirect := dev.(*directStackEnd)
	s.link.byRef = isDirect
	if _, isPipe := dev.(*pipeEnd); !isPipe && !isDirect && directWrites {
		// Not on a Pipe: its Write waits for the reader, which may be a
		// Stack's input pump delivering into the caller's own endpoint.
		s.link.writeDirect = s.writeDirect
	}
	if delayedACKEnabled {
		hold := delayedACKHold
		if isDirect { // a tunnel's stack: delack.go, tunnelDelayedACKHold
			hold = tunnelDelayedACKHold
		}
		s.link.acks = newDelayedACKs(hold, func(b *outBuf) { s.link.send(b, true) }, s.link.putBuf)
	}
	s.stack = stack.New(stack.Options{
		// Loopback-addressed packets from the link are allowed: through the
		// relay, a client on the relay host's 127.0.0.1 or ::1 is originated
		// with that real address (natbox demo does exactly this). The kernel
		// drops such martians before they could reach a TUN.
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := s.configure(); err != nil {
		s.stack.Close()
		s.stack.Wait()
		dev.Close()
		return nil, err
	}
	s.timeWait.init(s)
	if isDirect {
		// Bound now; from Run on, wireguard-go's goroutines move the
		// packets through the other end instead of pumps.
		direct.d.attach(s)
	}
	return s, nil
}

// ErrRunning is returned by a second Run.
var ErrRunning = errors.New("netstack: stack already running")

// Run starts the input and output pumps and the SYN-cookie sweep, serves
// until ctx is done or Close is called, then closes the Stack and returns
// once every goroutine it started has stopped: nil on a clean stop, the
// device's close error, or ErrClosed at once if Close came first. On a
// Direct pair it starts no pumps but lets the pair's reader and writers
// (wireguard-go's goroutines, held until now) move packets; Close waits for
// their deliveries.
func (s *Stack) Run(ctx context.Context) error {
	s.runMu.Lock()
	switch {
	case s.stopped:
		s.runMu.Unlock()
		return ErrClosed
	case s.running:
		s.runMu.Unlock()
		return ErrRunning
	}
	s.running = true
	switch {
	case s.direct != nil:
		// No pumps: the Direct pair's reader and writers wait for this.
		s.direct.start()
	case len(s.queues) > 0:
		go s.runOutput()
		for i, q := range s.queues {
			s.inputs.Add(1)
			go s.runInputQueue(q, &s.queueFrames[i])
		}
	default:
		go s.runOutput()
		s.inputs.Add(1)
		go s.runInput()
	}
	s.cookies.wg.Add(1)
	go s.runCookieSweep()
	if s.cfg.TCP.BufferBudget > 0 {
		s.conns.checks.Add(1)
		go s.conns.runChecks(s.done)
	}
	s.runMu.Unlock()
	s.log.Info("netstack started", zap.Int("mtu", s.cfg.MTU), zap.Int("batch", s.dev.BatchSize()),
		zap.Bool("vnet", len(s.queues) > 0), zap.Int("queues", max(len(s.queues), 1)))
	select {
	case <-ctx.Done():
	case <-s.done:
	}
	return s.Close()
}

// configure sets every stack option explicitly, each with its reason.
func (s *Stack) configure() error {
	st, t := s.stack, s.cfg.TCP
	rbuf, sbuf := s.conns.options(s.conns.share)
	tcpOpts := []struct {
		name string
		opt  tcpip.SettableTransportProtocolOption
	}{
		// SACK: recovers multiple losses per RTT; gVisor's default today, set
		// so a default change cannot silently cost throughput.
		{"sack", ptr(tcpip.TCPSACKEnabled(true))},
		// RACK off by default: tailscale#9707 (stalls with RACK on), and it
		// more than halved a flow on a lossy line (BenchmarkLossyLine).
		{"recovery", ptr(recovery(t.RACK))},
		// reno pinned: cubic overflowed in gvisor#11632, and reno is what the
		// benchmarks were made with.
		{"congestion control", ptr(tcpip.CongestionControlOption("reno"))},
		// Buffers 4 KiB / 1 MiB / max: auto-tuning grows towards max on fast
		// paths (gVisor's 4 MiB max limits single flows).
		// Under a BufferBudget, the send max is the light connections'
		// share and each receive buffer is set to its share (budget.go).
		{"receive buffer", &rbuf},
		{"send buffer", &sbuf},
		// Receive-buffer moderation: every read goes through gonet, which
		// calls ModerateRecvBuf, so the window follows the reader.
		{"receive buffer moderation", ptr(tcpip.TCPModerateReceiveBufferOption(true))},
		// The only listening endpoints are the SYN-cookie ones (syncookie.go):
		// they must answer every SYN with a cookie and keep no state.
		// tcp.Forwarder does not look at this option.
		{"always use syn cookies", ptr(tcpip.TCPAlwaysUseSynCookies(true))},
	}
	if t.TimeWait > 0 {
		tcpOpts = append(tcpOpts, struct {
			name string
			opt  tcpip.SettableTransportProtocolOption
		}{"time-wait timeout", ptr(tcpip.TCPTimeWaitTimeoutOption(t.TimeWait))})
	}
	for _, o := range tcpOpts {
		if err := st.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("netstack: set tcp %s: %s", o.name, err)
		}
	}
	if err := st.CreateNICWithOptions(nicID, s.link, stack.NICOptions{QDisc: directQDisc{s.link}}); err != nil {
		return fmt.Errorf("netstack: create nic: %s", err)
	}
	// Promiscuous: accept packets for any destination (the mapped public
	// addresses are not ours). Spoofing: answer and originate from them.
	if err := st.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack: set promiscuous mode: %s", err)
	}
	if err := st.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack: set spoofing: %s", err)
	}
	for _, p := range s.cfg.Addresses {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits())
		proto := tcpip.NetworkProtocolNumber(ipv4.ProtocolNumber)
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(p.Addr().AsSlice()), PrefixLen: p.Bits()},
		}
		if err := st.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("netstack: add address %s: %s", p, err)
		}
	}
	st.SetRouteTable(routeTable())
	s.pathMTU.Store(int32(s.cfg.PathMTU))
	s.shareMTU.Store(int32(shareMTU(s.conns.share)))
	s.applyRoutesLocked() // nothing else runs yet

	fwd := tcp.NewForwarder(st, s.conns.initialWindow(), t.MaxInFlight, s.forwardTCP)
	st.SetTransportProtocolHandler(tcp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if !s.synChecksumValid(id, pkt) {
			s.stats.lateTCPChecksum.Add(1)
			return true // dropped: no RST, no request
		}
		return fwd.HandlePacket(id, pkt)
	})
	st.SetTransportProtocolHandler(udp.ProtocolNumber, s.handleReassembledUDP)
	return nil
}

func ptr[T any](v T) *T { return &v }

func recovery(rack bool) tcpip.TCPRecovery {
	if rack {
		return tcpip.TCPRACKLossDetection
	}
	return 0
}

// runInput is the input pump: it reads batches from the device, takes UDP
// off to the Handler, and injects the rest through GRO.
func (s *Stack) runInput() {
	defer s.inputs.Done()
	// The device reads straight into gVisor buffer views: a packet for the
	// stack is handed over without a copy and its slot gets a fresh view
	// (pooled by gVisor); UDP and dropped packets leave their view in place.
	batch := s.dev.BatchSize()
	size := tunOffset + s.cfg.MTU
	views := make([]*buffer.View, batch)
	bufs := make([][]byte, batch)
	sizes := make([]int, batch)
	for i := range views {
		views[i] = buffer.NewViewSize(size)
		bufs[i] = views[i].AsSlice()
	}
	defer func() {
		for _, v := range views {
			v.Release()
		}
	}()

	var g gro.GRO
	g.Init(groEnabled)
	var cd countingDispatcher
	var info packetInfo
	for {
		n, err := s.dev.Read(bufs, sizes, tunOffset)
		if s.closing.Load() {
			return // Close drains nothing from here on; the device closes last
		}
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			// e.g. a kernel frame larger than the MTU: counted, not fatal.
			if c := s.stats.readErrors.Add(1); c&(c-1) == 0 { // log 1, 2, 4, 8, ...
				s.log.Warn("tun read failed", zap.Error(err), zap.Uint64("count", c))
			}
			if n == 0 {
				continue
			}
		}
		d := s.link.getDispatcher()
		if d == nil {
			continue
		}
		cd.NetworkDispatcher, cd.n = d, 0
		g.Dispatcher = &cd
		var bytesIn uint64
		for i := 0; i < n; i++ {
			pkt := bufs[i][tunOffset : tunOffset+sizes[i]]
			bytesIn += uint64(len(pkt))
			classify(pkt, &info)
			if !s.admitInput(&info) {
				continue
			}
			if info.packet != nil {
				pkt = info.packet // trimmed to the IP length
			}
			v := views[i]
			v.TrimFront(tunOffset)
			v.CapLength(len(pkt))
			views[i] = buffer.NewViewSize(size)
			bufs[i] = views[i].AsSlice()
			pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: inboundBuffer(pkt, &info, v)})
			pb.NetworkProtocolNumber = info.proto
			// classify verified the TCP checksum: GRO need not again. (The
			// NIC marks every packet validated anyway, see Capabilities.)
			pb.RXChecksumValidated = info.tcpChecked
			g.Enqueue(pb)
			pb.DecRef()
		}
		flushGRO(&g, &cd)
		s.stats.readBatches.Add(1)
		s.stats.packetsIn.Add(uint64(n))
		s.stats.bytesIn.Add(bytesIn)
		s.stats.groDelivered.Add(cd.n)
	}
}

// admitInput acts on a classified inbound packet: drops are counted, UDP
// goes to the Handler, and a packet for gVisor gets holdBack's handling. It
// reports whether the packet goes on to gVisor. Safe for concurrent use.
func (s *Stack) admitInput(info *packetInfo) bool {
	switch info.verdict {
	case verdictDrop:
		s.stats.invalid[info.reason].Add(1)
		return false
	case verdictUDP:
		s.stats.udpFastPath.Add(1)
		s.handler.HandleUDP(info.src, info.dst, info.payload)
		return false
	}
	return !s.holdBack(info)
}

// holdBack does what an injected packet needs before gVisor sees it (see
// reopenTimeWait, noteSYN, pendingRequests.abandon) and reports whether it
// must not be injected.
func (s *Stack) holdBack(info *packetInfo) bool {
	if info.fragment {
		s.stats.fragmentsIn.Add(1)
	}
	fin := info.tcpFlags&(tcpFlagSYN|tcpFlagRST|tcpFlagFIN|tcpFlagACK) == tcpFlagFIN|tcpFlagACK
	if s.link.acks != nil && info.tcp && (info.tcpPayload > 0 || fin) {
		small := info.tcpPayload <= delackMaxRequest && info.tcpFlags&(tcpFlagSYN|tcpFlagRST|tcpFlagFIN|tcpFlagACK) == tcpFlagACK
		end := info.tcpSeq + uint32(info.tcpPayload)
		if fin {
			end++ // the FIN's own sequence number
		}
		s.link.acks.note(info.endpointID(), end, info.tcpAck, small, fin && info.tcpPayload <= delackMaxRequest)
	}
	if info.pureSYN() {
		s.reopenTimeWait(info)
		if s.noteSYN(info) {
			return true
		}
	} else if info.rst() {
		s.pending.abandon(info, &s.stats)
	}
	return false
}

// Input pumps of a vnet device (runInputQueue).
const (
	// frameBufSize holds the largest frame (an IP packet of 64 KiB) and is
	// gVisor's largest pooled chunk.
	frameBufSize = 1 << 16
	// handOverMin: a frame at least this large is handed to gVisor in the
	// read buffer itself (at most half of it unused); a smaller one is
	// copied into a buffer its size, so a small segment waiting in a
	// receive queue never pins 64 KiB.
	handOverMin = frameBufSize / 2
	// frameBatch bounds the frames injected before GRO is flushed.
	frameBatch = 64
)

// groWorthWaiting reports whether a frame is worth holding in GRO for more
// of its flow: a full-size TCP segment the kernel did not aggregate (a
// sender or path without TSO/GRO). Anything else (a TSO frame, a short
// segment someone waits for, an ACK) is flushed to gVisor at once and the
// pump goes back to a blocking read: probing for more first cost one
// read(2) per wakeup and measured ~5% on ping-pong.
func groWorthWaiting(h vnetHdr, info *packetInfo, n, mtu int) bool {
	return groEnabled && h.gso() == vnetGSONone && info.tcp && n > mtu/2
}

// runInputQueue is the input pump of one vnet queue: it reads frames one
// read(2) each, takes UDP off to the Handler (each datagram of a USO frame)
// and injects the rest through GRO (a TSO frame as one packet: gVisor's TCP
// takes segments of any size). GRO is flushed after each frame, except
// while full-size segments keep coming (groWorthWaiting): those are read
// until none is waiting (or frameBatch) so GRO can merge them. The kernel's checksum verdict in the header is trusted
// (classifyFrame); without one, checksums are verified as on any device.
func (s *Stack) runInputQueue(q frameQueue, frames *atomic.Uint64) {
	defer s.inputs.Done()
	var hdr [vnetHdrLen]byte
	view := buffer.NewViewSize(frameBufSize)
	defer func() { view.Release() }()
	var g gro.GRO
	g.Init(groEnabled)
	var cd countingDispatcher
	var info packetInfo
	pending := 0
	flush := func() {
		flushGRO(&g, &cd)
		s.stats.groDelivered.Add(cd.n)
		cd.n, pending = 0, 0
	}
	for {
		n, err := q.read(hdr[:], view.AsSlice(), pending == 0)
		if s.closing.Load() {
			return
		}
		if err == errWouldBlock {
			flush()
			continue
		}
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			if c := s.stats.readErrors.Add(1); c&(c-1) == 0 {
				s.log.Warn("tun read failed", zap.Error(err), zap.Uint64("count", c))
			}
			continue
		}
		frames.Add(1)
		s.stats.readBatches.Add(1)
		s.stats.packetsIn.Add(1)
		s.stats.bytesIn.Add(uint64(n))
		d := s.link.getDispatcher()
		if d == nil {
			continue
		}
		cd.NetworkDispatcher = d
		g.Dispatcher = &cd
		h := decodeVnetHdr(hdr[:])
		if h.gso() != vnetGSONone {
			s.stats.gsoFramesIn.Add(1)
		}
		pkt := view.AsSlice()[:n]
		classifyFrame(h, pkt, &info)
		switch info.verdict {
		case verdictDrop:
			s.stats.invalid[info.reason].Add(1)
			continue
		case verdictUDP:
			s.stats.udpFastPath.Add(1)
			src, dst := info.src, info.dst
			if k := udpSegments(h, &info, func(p []byte) { s.handler.HandleUDP(src, dst, p) }); k > 1 {
				// Each datagram counts as a packet read and one taken.
				s.stats.packetsIn.Add(uint64(k - 1))
				s.stats.udpFastPath.Add(uint64(k - 1))
			}
			continue
		}
		if info.packet != nil {
			pkt = info.packet // trimmed to the IP length
		}
		if s.holdBack(&info) {
			continue
		}
		if !info.tcpChecked || info.pureSYN() {
			// A checksum a local sender left partial must be whole where
			// gVisor checks one: a SYN's, in synChecksumValid (a few bytes).
			completeChecksum(h, pkt)
		}
		var v *buffer.View // nil: inboundBuffer copies pkt
		if len(pkt) >= handOverMin {
			v = view
			v.CapLength(len(pkt))
			view = buffer.NewViewSize(frameBufSize)
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: inboundBuffer(pkt, &info, v)})
		pb.NetworkProtocolNumber = info.proto
		pb.RXChecksumValidated = info.tcpChecked
		g.Enqueue(pb)
		pb.DecRef()
		if pending++; pending >= frameBatch || !groWorthWaiting(h, &info, len(pkt), s.cfg.MTU) {
			flush()
		}
	}
}

// countingDispatcher counts what GRO delivers, to report coalescing.
type countingDispatcher struct {
	stack.NetworkDispatcher
	n uint64
}

func (c *countingDispatcher) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	c.n++
	c.NetworkDispatcher.DeliverNetworkPacket(p, pkt)
}

// flushGRO hands every packet g holds to the stack through cd (g's
// Dispatcher). gVisor's GRO.Flush releases only the first packet of each of
// its eight buckets: its loop steps to the next list entry after removeOne
// has reset the current one's links. So packets of flows that share a
// bucket (a hash of addresses and ports: with four flows, more often than
// not) stayed behind; a pooled GRO (Direct's deliverBatch) then delivered
// newer packets of their flow first, from another pooled GRO, and the
// stale ones later: reordering the sender takes for loss, with a halved
// window each time (tunnel/BENCH.md change 13). Each pass releases at least
// one packet per non-empty bucket, so this ends within a bucket's capacity.
func flushGRO(g *gro.GRO, cd *countingDispatcher) {
	for {
		before := cd.n
		g.Flush()
		if cd.n == before {
			return
		}
	}
}

// reopenTimeWait lets a new SYN through for a 4-tuple whose endpoint sits in
// TIME_WAIT. gVisor hands such a SYN only to a listening endpoint
// (tcp/connect.go handleTimeWaitSegments); with tcp.Forwarder there is none,
// so it would be dropped and a client reusing its address and port stalls
// until TIME_WAIT ends (ARCHITECTURE.md "Known traps"). Like Linux conntrack,
// we treat the SYN as reopening the connection: the TIME_WAIT endpoint is
// aborted (which unregisters it at once) before the SYN is injected, so the
// forwarder sees it as new. The abort sends an RST carrying the old
// connection's sequence numbers; a client in SYN-SENT ignores it because it
// does not acknowledge the new SYN (RFC 793 p. 66-67).
func (s *Stack) reopenTimeWait(p *packetInfo) {
	if abortTimeWait(s.stack, p.proto, p.endpointID()) {
		s.stats.timeWaitReopened.Add(1)
	}
}

// synChecksumValid reports whether pkt, a segment no endpoint took, is not a
// SYN with a wrong checksum. classify checks TCP checksums before gVisor
// does (gVisor trusts them: the link advertises RX checksum offload), but
// not those of segments in IP fragments or behind IPv6 extension headers
// other than hop-by-hop and destination options; a corrupt or forged SYN
// among those must not start a dial either.
func (s *Stack) synChecksumValid(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	hdr := header.TCP(pkt.TransportHeader().Slice())
	if len(hdr) < header.TCPMinimumSize || hdr.Flags()&header.TCPFlagSyn == 0 {
		return true
	}
	return hdr.IsChecksumValid(id.RemoteAddress, id.LocalAddress, pkt.Data().Checksum(), uint16(pkt.Data().Size()))
}

// abortTimeWait aborts the endpoint registered for id if it is in TIME_WAIT.
func abortTimeWait(st *stack.Stack, proto tcpip.NetworkProtocolNumber, id stack.TransportEndpointID) bool {
	te := st.FindTransportEndpoint(proto, tcp.ProtocolNumber, id, nicID)
	ep, ok := te.(*tcp.Endpoint)
	if !ok || tcp.EndpointState(ep.State()) != tcp.StateTimeWait {
		return false
	}
	ep.Abort()
	return true
}

// runOutput is the output pump: it drains the queue in batches into the
// device until the queue is closed and empty.
func (s *Stack) runOutput() {
	defer close(s.outputDone)
	batch := s.dev.BatchSize()
	bufs := make([][]byte, 0, batch)
	spare := make([]*outBuf, 0, s.cfg.QueueLen)
	deviceClosed := false
	var room groRoom
	_, isPipe := s.dev.(*pipeEnd)
	room.enabled = !isPipe && s.queues == nil
	for {
		items, ok := s.link.q.take(spare)
		if !ok {
			return
		}
		for start := 0; start < len(items); start += batch {
			end := min(start+batch, len(items))
			bufs = bufs[:0]
			var bytesOut uint64
			if s.queues != nil {
				if !deviceClosed {
					deviceClosed = s.writeFrames(items[start:end])
				}
				continue
			}
			for i, b := range items[start:end] {
				bufs = append(bufs, room.packet(i, end-start, b))
				bytesOut += uint64(b.n)
			}
			if deviceClosed {
				continue
			}
			// Keep draining after the device closed so blocked writers
			// return; they fail once Close closes the queue.
			deviceClosed = s.writeDevice(bufs, bytesOut)
		}
		s.link.q.done()
		for i, b := range items {
			s.link.putBuf(b)
			items[i] = nil
		}
		spare = items[:0]
	}
}

// directWrites is a variable only so benchmarks can compare.
var directWrites = true

// writeDirect writes one packet on the caller's goroutine (linkEndpoint.send
// allows one at a time, so the batch slice is reused).
func (s *Stack) writeDirect(b *outBuf) {
	if s.queues != nil {
		s.directItems[0] = b
		s.writeFrames(s.directItems[:])
		s.directItems[0] = nil
		s.link.putBuf(b)
		return
	}
	s.directBufs[0] = b.data[:tunOffset+b.n]
	s.writeDevice(s.directBufs[:], uint64(b.n))
	s.directBufs[0] = nil
	s.link.putBuf(b)
}

// writeDevice writes one batch and counts it. It reports whether the device
// is closed.
func (s *Stack) writeDevice(bufs [][]byte, bytes uint64) (closed bool) {
	s.stats.writeBatches.Add(1)
	if _, err := s.dev.Write(bufs, tunOffset); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return true
		}
		if c := s.stats.writeErrors.Add(1); c&(c-1) == 0 {
			s.log.Warn("tun write failed", zap.Error(err), zap.Uint64("count", c))
		}
	}
	s.stats.packetsOut.Add(uint64(len(bufs)))
	s.stats.bytesOut.Add(bytes)
	return false
}

// writeFrames writes items as vnet frames (header and packet each), one
// write(2) each: a TSO frame is its own batch. A frame goes to the queue
// of its flow (flowQueue): the kernel steers a flow's packets towards us to
// the queue we last wrote it on, so writing every flow on the first queue
// put all reads on one input pump. One writer at a time (the outward
// queue's busy flag): the gather list is the Stack's.
func (s *Stack) writeFrames(items []*outBuf) (closed bool) {
	for _, b := range items {
		s.stats.writeBatches.Add(1)
		s.frameParts = b.appendParts(s.frameParts[:0])
		q := s.queues[0]
		if len(s.queues) > 1 {
			q = s.queues[flowQueue(s.frameParts, len(s.queues))]
		}
		err := q.write(s.frameParts)
		clear(s.frameParts)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return true
			}
			if c := s.stats.writeErrors.Add(1); c&(c-1) == 0 {
				s.log.Warn("tun write failed", zap.Error(err), zap.Uint64("count", c))
			}
		}
		s.stats.packetsOut.Add(1)
		s.stats.bytesOut.Add(uint64(b.n))
	}
	return false
}

// groBufSize leaves room for a 64 KiB frame behind the headroom: the device
// checks cap(buf)-2*offset against the coalesced length.
const groBufSize = 2*tunOffset + 65535

// groRoom gives the device's GRO the room it needs. wireguard-go's Linux TUN
// coalesces the TCP segments (and UDP datagrams) of one Write into TSO frames
// by appending to the first packet's buffer, and only when that buffer has
// the capacity (offload_linux.go coalesceTCPPackets, coalesceInsufficientCap).
// Pooled outBufs are MTU-sized, so without this every segment was its own
// write(2) (measured: 1.0 packets per write, the reverse direction at a third
// of the forward one). The pump copies the packets of a multi-packet batch
// into its own buffers of groBufSize; their pages are touched only as far as
// frames grow.
type groRoom struct {
	enabled bool
	bufs    [][]byte // one per batch slot, allocated on first use
}

// packet returns the device buffer (headroom + packet) for slot i of a batch
// of n: b's own buffer, or a copy in a buffer with room to coalesce.
func (r *groRoom) packet(i, n int, b *outBuf) []byte {
	p := b.data[:tunOffset+b.n]
	if !r.enabled || n < 2 {
		return p
	}
	if i >= len(r.bufs) {
		r.bufs = append(r.bufs, make([][]byte, i+1-len(r.bufs))...)
	}
	if r.bufs[i] == nil {
		r.bufs[i] = make([]byte, 0, groBufSize)
	}
	return append(r.bufs[i][:0], p...)
}

// WriteUDP sends one datagram from src to dst straight to the link (any src:
// spoofing). src and dst must be the same address family (IPv4-mapped IPv6 is
// treated as IPv4). Datagrams that do not fit the MTU fail with
// ErrMessageTooLong: nothing is fragmented. It blocks while the outward queue
// is full. payload is not retained.
func (s *Stack) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	if s.closing.Load() {
		return ErrClosed
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !src.Addr().IsValid() || !dst.Addr().IsValid() || src.Addr().Is4() != dst.Addr().Is4() {
		return fmt.Errorf("netstack: write udp %s -> %s: addresses must be valid and of one family", src, dst)
	}
	n := udpPacketLen(src.Addr().Is4(), len(payload))
	if mtu := s.PathMTU(); n > mtu {
		return fmt.Errorf("netstack: write udp %s -> %s: %d-byte packet, mtu %d: %w", src, dst, n, mtu, ErrMessageTooLong)
	}
	b := s.link.getBuf(n)
	b.n = n
	buildUDP(b.packet(), src, dst, payload)
	if !s.link.writeRaw(b) {
		return ErrClosed
	}
	s.stats.udpSent.Add(1)
	return nil
}

// handleReassembledUDP receives the UDP datagrams that reach gVisor: the
// reassembled fragments and packets with IPv6 extension headers that the
// fast path passed on. It always reports true so gVisor sends no ICMP.
func (s *Stack) handleReassembledUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	if s.closing.Load() {
		return true
	}
	hdr := header.UDP(pkt.TransportHeader().Slice())
	if len(hdr) < header.UDPMinimumSize || int(hdr.Length()) != header.UDPMinimumSize+pkt.Data().Size() {
		s.stats.invalid[dropUDPHeader].Add(1)
		return true
	}
	payload := pkt.Data().AsRange().ToSlice()
	v4 := pkt.NetworkProtocolNumber == header.IPv4ProtocolNumber
	if !v4 || hdr.Checksum() != 0 {
		if !hdr.IsChecksumValid(id.RemoteAddress, id.LocalAddress, checksum.Checksum(payload, 0)) {
			s.stats.invalid[dropUDPChecksum].Add(1)
			return true
		}
	}
	src := netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	s.stats.udpReassembled.Add(1)
	s.handler.HandleUDP(src, dst, payload)
	return true
}

func addrFrom(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}

func tcpipAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// Stats is a snapshot of the Stack's counters. natbox status and /metrics
// export every field by reflection (admin.CountersOf): an unsigned field is a
// counter unless tagged `stats:"gauge"`, a nested struct is a group by reason.
type Stats struct {
	PacketsIn, BytesIn   uint64 // read from the device
	PacketsOut, BytesOut uint64 // written to the device
	// ReadBatches and WriteBatches count dev.Read calls that returned
	// packets and dev.Write calls: packets per batch is what the device's
	// GRO (on write) can coalesce.
	ReadBatches, WriteBatches uint64
	// GROCoalesced is how many inbound packets GRO merged into others.
	GROCoalesced uint64
	// GSOFramesIn and GSOFramesOut count kernel TUN frames of several
	// segments (TSO, USO): read and injected as one packet (a USO frame's
	// datagrams go to the Handler one by one), and TCP segments of up to
	// 64 KiB written as one frame the kernel segments. PacketsIn and
	// PacketsOut count such a frame once (a USO frame once per datagram).
	GSOFramesIn, GSOFramesOut uint64
	// UDPFastPath counts datagrams handed to HandleUDP without gVisor;
	// UDPReassembled those that went through gVisor (fragments).
	UDPFastPath, UDPReassembled uint64
	UDPSent                     uint64 // WriteUDP datagrams queued
	TCPRequests                 uint64 // connection attempts handed to HandleTCP
	TCPRejected                 uint64 // requests answered with RST
	TCPAbandoned                uint64 // pending requests whose client sent RST
	// TCPInFlightDrops counts SYNs dropped because MaxInFlight handshakes
	// were pending.
	TCPInFlightDrops uint64
	// TimeWaitReopened counts SYNs that replaced a TIME_WAIT endpoint.
	TimeWaitReopened uint64
	TCPRetransmits   uint64
	// How gVisor recovered lost segments: SACK or fast recovery (a loss
	// repaired within a round trip), a retransmission timeout (the flow
	// starts again from one segment: on a WAN the costly kind), and
	// recoveries that turned out spurious (reordering taken for loss).
	TCPSackRecovery     uint64
	TCPFastRecovery     uint64
	TCPTimeouts         uint64
	TCPSpuriousRecovery uint64
	TCPEstablished      uint64 `stats:"gauge"` // currently established
	// TCPClosing is how many connections are closed or closing but not
	// gone: FIN-WAIT, CLOSE-WAIT, LAST-ACK, CLOSING and TIME-WAIT (each
	// still a whole gVisor endpoint; TCPConfig.TimeWait and MaxClosing
	// bound the last).
	TCPClosing uint64 `stats:"gauge"`
	// TimeWaitCapped counts the times TCPConfig.MaxClosing switched
	// TIME_WAIT off, TimeWaitSkipped the connections closed while it was
	// off (those natbox closed first left TIME_WAIT at once), and
	// TimeWaitOff is 1 while it is off.
	TimeWaitCapped, TimeWaitSkipped uint64
	TimeWaitOff                     uint64 `stats:"gauge"`
	// QueueFullWaits counts writers that blocked on a full outward queue.
	QueueFullWaits uint64
	// DirectWrites counts packets written on the sender's goroutine because
	// the output pump was idle (included in PacketsOut and WriteBatches).
	DirectWrites uint64
	// AcksHeld counts pure ACKs of small requests held back for the answer
	// (delayed ACK); AcksSuppressed those of them the answer made needless.
	AcksHeld, AcksSuppressed uint64
	ReadErrors               uint64
	WriteErrors              uint64
	// Oversize counts outbound packets larger than the MTU (a bug if > 0).
	Oversize uint64
	Invalid  InvalidStats

	// TCPHandshakeTimeouts counts Accepts that failed with
	// ErrHandshakeTimeout; TCPHandshakesPending is the number of requests
	// between SYN and a completed or failed handshake (a gauge).
	TCPHandshakeTimeouts uint64
	TCPHandshakesPending uint64 `stats:"gauge"`
	// SYN-cookie mode (syncookie.go): ports switched to it and back, ports in
	// it now (a gauge), SYNs that would have switched a port past
	// MaxCookiePorts, listeners that failed to open, and connections that
	// cookies completed and handed to the Handler.
	CookieModeEntries, CookieModeExits uint64
	CookiePortsActive                  uint64 `stats:"gauge"`
	CookiePortsOverflow                uint64
	CookieListenerFailures             uint64
	CookieConns                        uint64
	// CookieSYNRetransHeld counts SYN retransmissions of handshakes pending
	// on the dial-first path that were kept from a cookie listener.
	CookieSYNRetransHeld uint64
	// CookieExitSynsHeld counts SYNs dropped while their port left cookie
	// mode (cookieLeaveGrace): their clients retransmit to the dial-first
	// path.
	CookieExitSynsHeld uint64
	// gVisor's cookie counters: SYN-ACKs with a cookie sent, ACKs with a
	// valid and an invalid cookie, and SYNs or ACKs dropped because a cookie
	// listener's accept queue was full.
	SynCookiesSent, SynCookiesValid, SynCookiesInvalid uint64
	SynCookieQueueDrops                                uint64
	// IP reassembly, bounded by gVisor (4 MiB of fragments per IP version;
	// incomplete datagrams dropped after 30 s for IPv4, 60 s for IPv6;
	// neither is settable through its API): fragments read, fragments
	// dropped as malformed or overlapping, and reassembly timeouts that
	// produced an ICMP time-exceeded (those whose first fragment arrived).
	IPFragmentsIn, IPFragmentsMalformed, IPReassemblyTimeouts uint64

	// The TCP buffer budget (TCPConfig.BufferBudget, budget.go):
	// connections handed out and open, the bytes received on them and not
	// read yet, a light connection's buffer share per direction (0: no
	// budget), the connections carrying bulk data and the share of each
	// buffer of theirs in a bulk direction, times a connection became
	// bulk, times a share fell, buffers cut to it, and cut receive buffers
	// given back for a while to let a gap fill (budget.go, thawStuckLocked).
	TCPConns         uint64 `stats:"gauge"`
	TCPRecvQueued    uint64 `stats:"gauge"`
	TCPBufferShare   uint64 `stats:"gauge"`
	TCPBulkConns     uint64 `stats:"gauge"`
	TCPBulkShare     uint64 `stats:"gauge"`
	TCPBulkPromoted  uint64
	TCPBufferLowered uint64
	TCPBufferCuts    uint64
	TCPBufferThaws   uint64
	// RouteMTU is the MTU new TCP connections use: the path's, or less
	// where the share could not hold two segments (pathmtu.go).
	RouteMTU uint64 `stats:"gauge"`
}

// InvalidStats counts inbound packets dropped as malformed, by reason.
type InvalidStats struct {
	IPHeader, IPChecksum, UDPHeader, UDPChecksum, TCPChecksum uint64
	// VnetHeader counts kernel TUN frames whose virtio-net header asked for
	// something natbox does not do (an unknown segmentation type, a UDP
	// segmentation frame that is not UDP).
	VnetHeader uint64
}

// Stats returns a snapshot of the counters.
func (s *Stack) Stats() Stats {
	c := &s.stats
	in := c.packetsIn.Load()
	gs := s.stack.Stats()
	fullWaits, direct := s.link.q.counts()
	conns, buffered := s.conns.buffered()
	share, bulkShare, bulkConns := s.conns.currentShares()
	var acksHeld, acksSuppressed uint64
	if a := s.link.acks; a != nil {
		acksHeld, acksSuppressed = a.heldTotal.Load(), a.suppressed.Load()
	}
	injected := in - c.udpFastPath.Load() - c.invalidTotal() - c.synRetransHeld.Load() - c.cookieExitSynsHeld.Load()
	coalesced := uint64(0)
	if d := c.groDelivered.Load(); injected > d {
		coalesced = injected - d
	}
	return Stats{
		PacketsIn:           in,
		BytesIn:             c.bytesIn.Load(),
		PacketsOut:          c.packetsOut.Load(),
		BytesOut:            c.bytesOut.Load(),
		ReadBatches:         c.readBatches.Load(),
		WriteBatches:        c.writeBatches.Load(),
		GROCoalesced:        coalesced,
		GSOFramesIn:         c.gsoFramesIn.Load(),
		GSOFramesOut:        c.gsoFramesOut.Load(),
		UDPFastPath:         c.udpFastPath.Load(),
		UDPReassembled:      c.udpReassembled.Load(),
		UDPSent:             c.udpSent.Load(),
		TCPRequests:         c.tcpRequests.Load(),
		TCPRejected:         c.tcpRejected.Load(),
		TCPAbandoned:        c.abandoned.Load(),
		TCPInFlightDrops:    gs.TCP.ForwardMaxInFlightDrop.Value(),
		TimeWaitReopened:    c.timeWaitReopened.Load(),
		TimeWaitCapped:      s.timeWait.engaged.Load(),
		TimeWaitSkipped:     s.timeWait.skipped.Load(),
		TimeWaitOff:         b2u(s.timeWait.on.Load()),
		TCPRetransmits:      gs.TCP.Retransmits.Value(),
		TCPSackRecovery:     gs.TCP.SACKRecovery.Value(),
		TCPFastRecovery:     gs.TCP.FastRecovery.Value(),
		TCPTimeouts:         gs.TCP.Timeouts.Value(),
		TCPSpuriousRecovery: gs.TCP.SpuriousRecovery.Value() + gs.TCP.SpuriousRTORecovery.Value(),
		TCPEstablished:      gs.TCP.CurrentEstablished.Value(),
		TCPClosing:          gs.TCP.CurrentConnected.Value() - min(gs.TCP.CurrentConnected.Value(), gs.TCP.CurrentEstablished.Value()),
		QueueFullWaits:      fullWaits,
		DirectWrites:        direct,
		AcksHeld:            acksHeld,
		AcksSuppressed:      acksSuppressed,
		ReadErrors:          c.readErrors.Load(),
		WriteErrors:         c.writeErrors.Load(),
		Oversize:            c.oversize.Load(),

		TCPHandshakeTimeouts:   c.handshakeTimeouts.Load(),
		TCPHandshakesPending:   uint64(max(s.handshakes.total.Load(), 0)),
		CookieModeEntries:      c.cookieEntries.Load(),
		CookieModeExits:        c.cookieExits.Load(),
		CookiePortsActive:      uint64(s.cookies.n.Load()),
		CookiePortsOverflow:    c.cookieOverflow.Load(),
		CookieListenerFailures: c.cookieFailures.Load(),
		CookieConns:            c.cookieConns.Load(),
		CookieSYNRetransHeld:   c.synRetransHeld.Load(),
		CookieExitSynsHeld:     c.cookieExitSynsHeld.Load(),
		SynCookiesSent:         gs.TCP.ListenOverflowSynCookieSent.Value(),
		SynCookiesValid:        gs.TCP.ListenOverflowSynCookieRcvd.Value(),
		SynCookiesInvalid:      gs.TCP.ListenOverflowInvalidSynCookieRcvd.Value(),
		SynCookieQueueDrops:    gs.TCP.ListenOverflowSynDrop.Value() + gs.TCP.ListenOverflowAckDrop.Value(),
		IPFragmentsIn:          c.fragmentsIn.Load(),
		IPFragmentsMalformed:   gs.IP.MalformedFragmentsReceived.Value(),
		IPReassemblyTimeouts:   gs.ICMP.V4.PacketsSent.TimeExceeded.Value() + gs.ICMP.V6.PacketsSent.TimeExceeded.Value(),
		TCPConns:               uint64(conns),
		TCPRecvQueued:          buffered,
		TCPBufferShare:         uint64(share),
		TCPBulkConns:           uint64(bulkConns),
		TCPBulkShare:           uint64(bulkShare),
		TCPBulkPromoted:        s.conns.promoted.Load(),
		RouteMTU:               uint64(s.RouteMTU()),
		TCPBufferLowered:       s.conns.lowered.Load(),
		TCPBufferCuts:          s.conns.cuts.Load(),
		TCPBufferThaws:         s.conns.thaws.Load(),
		Invalid: InvalidStats{
			IPHeader:    c.invalid[dropIPHeader].Load(),
			IPChecksum:  c.invalid[dropIPChecksum].Load(),
			UDPHeader:   c.invalid[dropUDPHeader].Load(),
			UDPChecksum: c.invalid[dropUDPChecksum].Load(),
			TCPChecksum: c.invalid[dropTCPChecksum].Load() + c.lateTCPChecksum.Load(),
			VnetHeader:  c.invalid[dropVnetHeader].Load(),
		},
	}
}

func (c *counters) invalidTotal() uint64 {
	var n uint64
	for i := range c.invalid {
		n += c.invalid[i].Load()
	}
	return n
}

// Close shuts the Stack down in order (ARCHITECTURE.md, lifecycle): stop admitting flows
// and injecting input, close the gVisor stack (aborting endpoints with RSTs),
// wait for it and for running HandleTCP calls, flush the outward queue, and
// only then close the device, which also ends the input pump's read.
// Idempotent, safe before, during and after Run, and concurrently; no
// goroutine of the Stack outlives it (a concurrent call returns once the
// first is done).
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		close(s.done)
		s.runMu.Lock()
		s.stopped = true
		running := s.running
		s.runMu.Unlock()
		s.admitMu.Lock()
		s.admitClosed = true
		s.admitMu.Unlock()
		s.pending.closeAll()
		s.closeCookies()
		s.conns.checks.Wait()
		if s.direct != nil {
			s.direct.quiesce()
		}

		s.stack.Close()
		s.stack.Wait()
		s.handlers.Wait()

		// Flush what is queued (the RSTs), but do not let a peer that stopped
		// reading hold Close: closing the device unblocks the pump's Write.
		if s.link.acks != nil {
			s.link.acks.close() // what waits goes to the queue, flushed below
		}
		s.link.q.close()
		if s.direct != nil {
			s.direct.flushedOnClose()
		}
		if running {
			select {
			case <-s.outputDone:
			case <-time.After(flushTimeout):
			}
		}
		s.closeErr = s.dev.Close()
		if running {
			<-s.outputDone
			s.inputs.Wait()
		}
		s.log.Info("netstack stopped")
	})
	return s.closeErr
}

// TCPRetransmits returns the TCP segments this stack has resent. An uplink
// reads it to see what the way to the relay loses (tunnel/uplink_transport.go).
func (s *Stack) TCPRetransmits() uint64 { return s.stack.Stats().TCP.Retransmits.Value() }
