package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/natbox/natbox/internal/gostack"
)

// TCPRequest is a client's connection attempt, handed to Handler.HandleTCP.
// Normally it is a bare SYN: the handshake is still to be done, so the
// handler can dial the target first and answer with Accept or Reject. On a
// port in SYN-cookie mode (see TCPConfig.CookiePortThreshold) it arrives with
// the handshake already completed (Established): Accept then returns the
// connection at once and Reject resets it.
type TCPRequest struct {
	// Src is the client, Dst the address it connects to.
	Src, Dst netip.AddrPort

	s  *Stack
	fr *tcp.ForwarderRequest // nil when established
	id stack.TransportEndpointID
	// est is the connection a cookie listener accepted (handshake done).
	est *tcpConn
	// ctx is cancelled by pendingRequests when the client gives up; a
	// context (not a bare channel) lets a handler tie a dial to it with
	// context.AfterFunc, without a goroutine per request.
	ctx     context.Context
	abandon context.CancelFunc
	done    atomic.Bool // Accept or Reject was called
	// inHandshake is set while the request counts as a pending handshake
	// (from the SYN until the handshake completed or failed).
	inHandshake atomic.Bool
	// handshakeOver is set once CreateEndpoint returned; the handshake
	// timer stops re-arming.
	handshakeOver atomic.Bool
	timedOut      atomic.Bool
}

// errCompleted is returned by a second Accept.
var errCompleted = errors.New("netstack: tcp request already accepted or rejected")

// ErrHandshakeTimeout is returned (wrapped) by Accept when the client did not
// complete the handshake within TCPConfig.HandshakeTimeout: a client that
// went away, or a spoofed SYN. Its HandshakeTimeout method reports true, so
// packages that may not import netstack can recognise it.
var ErrHandshakeTimeout error = handshakeTimeoutError{}

type handshakeTimeoutError struct{}

func (handshakeTimeoutError) Error() string          { return "netstack: client did not complete the handshake" }
func (handshakeTimeoutError) Timeout() bool          { return true }
func (handshakeTimeoutError) HandshakeTimeout() bool { return true }

// Established reports whether the handshake is already complete (the request
// came through a SYN-cookie listener). A dial failure then cannot show as
// "connection refused": Reject resets the accepted connection instead.
func (r *TCPRequest) Established() bool { return r.est != nil }

// Accept completes the handshake and returns the client connection, a
// TCPConn. It fails if the client went away meanwhile, the stack is
// closing, or the request was already answered; and with ErrHandshakeTimeout
// if the client does not answer the SYN-ACK within TCPConfig.HandshakeTimeout.
func (r *TCPRequest) Accept() (net.Conn, error) {
	if !r.done.CompareAndSwap(false, true) {
		return nil, errCompleted
	}
	s := r.s
	s.pending.remove(r)
	if r.est != nil {
		if s.closing.Load() {
			r.est.ep.Abort()
			return nil, ErrClosed
		}
		s.conns.add(r.est)
		return r.est, nil
	}
	if s.closing.Load() {
		r.endHandshake(false)
		r.fr.Complete(true)
		return nil, ErrClosed
	}
	var wq waiter.Queue
	t := time.AfterFunc(s.cfg.TCP.HandshakeTimeout, r.expireHandshake)
	gen := s.routeGen()
	ep, err := r.fr.CreateEndpoint(&wq)
	r.handshakeOver.Store(true)
	t.Stop()
	r.endHandshake(err == nil)
	if err != nil {
		r.fr.Complete(true)
		if r.timedOut.Load() {
			s.stats.handshakeTimeouts.Add(1)
			return nil, fmt.Errorf("netstack: accept %s -> %s: %w", r.Src, r.Dst, ErrHandshakeTimeout)
		}
		return nil, fmt.Errorf("netstack: accept %s -> %s: %w", r.Src, r.Dst, tcpipError(err))
	}
	r.fr.Complete(false)
	if s.closing.Load() {
		// Close may have snapshotted the endpoints before this one existed.
		ep.Abort()
		return nil, ErrClosed
	}
	s.setKeepalive(ep)
	return s.track(newTCPConn(&wq, ep), gen), nil
}

// expireHandshake runs when HandshakeTimeout has passed since Accept sent the
// SYN-ACK. gVisor would retransmit it for about two minutes with
// CreateEndpoint blocked all along (and the handler's target connection
// open); aborting the SYN-RCVD endpoint makes CreateEndpoint return now.
// The endpoint is found the way abortTimeWait finds one. If it is not
// registered yet (CreateEndpoint has not got that far) or not in SYN-RCVD
// (another endpoint of the 4-tuple, or one that completed just now and
// CreateEndpoint is about to return), look again shortly.
func (r *TCPRequest) expireHandshake() {
	if r.handshakeOver.Load() {
		return
	}
	te := r.s.stack.FindTransportEndpoint(r.netProto(), tcp.ProtocolNumber, r.id, nicID)
	ep, ok := te.(*tcp.Endpoint)
	if !ok || tcp.EndpointState(ep.State()) != tcp.StateSynRecv {
		time.AfterFunc(handshakeRecheck, r.expireHandshake)
		return
	}
	r.timedOut.Store(true)
	ep.Abort()
}

// handshakeRecheck is how soon expireHandshake looks again for an endpoint
// it could not abort yet.
const handshakeRecheck = 20 * time.Millisecond

func (r *TCPRequest) netProto() tcpip.NetworkProtocolNumber {
	if r.id.LocalAddress.Len() == 4 {
		return header.IPv4ProtocolNumber
	}
	return header.IPv6ProtocolNumber
}

// endHandshake stops counting r as a pending handshake (once); completed
// says the client answered the SYN-ACK.
func (r *TCPRequest) endHandshake(completed bool) {
	if r.inHandshake.CompareAndSwap(true, false) {
		r.s.handshakes.done(r.id, completed)
	}
}

// Reject answers the connection attempt with an RST (the client sees
// "connection refused", or a reset of the connection if it was
// Established). A Reject after Accept is a no-op.
func (r *TCPRequest) Reject() {
	if !r.done.CompareAndSwap(false, true) {
		return
	}
	r.s.pending.remove(r)
	r.s.stats.tcpRejected.Add(1)
	if r.est != nil {
		r.est.ep.Abort() // RST: an abort, not a FIN the client would take for a clean end
		return
	}
	r.endHandshake(false)
	r.fr.Complete(true)
}

// Abandoned returns a channel that is closed if the client gives up while the
// handler is still deciding: when it sends an RST for this connection, or when
// the Stack closes. Best effort: a client that silently stops retransmitting
// its SYN is not noticed (there is no endpoint before Accept to watch; gVisor
// ignores repeated SYNs of a pending request).
func (r *TCPRequest) Abandoned() <-chan struct{} { return r.ctx.Done() }

// Context is cancelled when Abandoned is closed.
func (r *TCPRequest) Context() context.Context { return r.ctx }

// forwardTCP is the tcp.Forwarder's handler, on its own goroutine per SYN.
func (s *Stack) forwardTCP(fr *tcp.ForwarderRequest) {
	if !s.admit() {
		fr.Complete(true)
		return
	}
	defer s.handlers.Done()
	gostack.Grow()

	id := fr.ID()
	r := &TCPRequest{
		Src: netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort),
		Dst: netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort),
		s:   s,
		fr:  fr,
		id:  id,
	}
	r.ctx, r.abandon = context.WithCancel(context.Background())
	s.stats.tcpRequests.Add(1)
	r.inHandshake.Store(true)
	s.handshakes.start(id)
	s.pending.add(r)
	defer r.Reject() // no-op if the handler answered
	s.handler.HandleTCP(r)
}

// admit reports whether a new handler call may start (the Stack is not
// closing); if so the caller owes s.handlers.Done.
func (s *Stack) admit() bool {
	s.admitMu.Lock()
	defer s.admitMu.Unlock()
	if s.admitClosed {
		return false
	}
	s.handlers.Add(1)
	return true
}

// pendingRequests tracks requests between SYN and Accept/Reject, so an RST
// from the client can mark them abandoned.
type pendingRequests struct {
	n  atomic.Int32 // len(m), read without mu on the packet path
	mu sync.Mutex
	// mu guards the following fields.
	m      map[stack.TransportEndpointID]*TCPRequest
	closed bool
}

func (p *pendingRequests) add(r *TCPRequest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		r.abandon()
		return
	}
	p.m[r.id] = r
	p.n.Store(int32(len(p.m)))
}

func (p *pendingRequests) remove(r *TCPRequest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m[r.id] == r {
		delete(p.m, r.id)
		p.n.Store(int32(len(p.m)))
	}
}

// abandon marks the pending request that an inbound RST belongs to.
func (p *pendingRequests) abandon(info *packetInfo, c *counters) {
	if p.n.Load() == 0 {
		return
	}
	id := info.endpointID()
	p.mu.Lock()
	defer p.mu.Unlock()
	if r, ok := p.m[id]; ok {
		delete(p.m, id)
		p.n.Store(int32(len(p.m)))
		r.abandon()
		c.abandoned.Add(1)
	}
}

// closeAll closes every pending request's Abandoned channel (Stack.Close).
func (p *pendingRequests) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for id, r := range p.m {
		r.abandon()
		delete(p.m, id)
	}
	p.n.Store(0)
}

// setKeepalive turns keepalive on so a vanished peer cannot pin a splice
// (and its goroutines) forever.
func (s *Stack) setKeepalive(ep tcpip.Endpoint) {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(s.cfg.TCP.KeepaliveIdle)
	ep.SetSockOpt(&idle)
	interval := tcpip.KeepaliveIntervalOption(s.cfg.TCP.KeepaliveInterval)
	ep.SetSockOpt(&interval)
}

// DialTCP opens a TCP connection from src to dst through the link. src may be
// any address (spoofing) with port 0 for an ephemeral port; the relay uses it
// to originate flows with the public client's own address. Cancelling ctx
// aborts the attempt. The conn is a TCPConn.
func (s *Stack) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	if s.closing.Load() {
		return nil, ErrClosed
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.Addr().IsValid() || (src.Addr().IsValid() && src.Addr().Is4() != dst.Addr().Is4()) {
		return nil, fmt.Errorf("netstack: dial %s -> %s: addresses must be valid and of one family", src, dst)
	}
	proto := tcpip.NetworkProtocolNumber(header.IPv4ProtocolNumber)
	if dst.Addr().Is6() {
		proto = header.IPv6ProtocolNumber
	}
	var wq waiter.Queue
	gen := s.routeGen()
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, fmt.Errorf("netstack: dial %s -> %s: %w", src, dst, tcpipError(terr))
	}
	remote := tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(dst.Addr()), Port: dst.Port()}
	if src.Addr().IsValid() {
		local := tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(src.Addr()), Port: src.Port()}
		if src.Port() != 0 {
			// The relay reuses a client's address and port as the client
			// does; an earlier flow on the same 4-tuple that we closed first
			// may still sit in TIME_WAIT and would make the bind fail.
			abortTimeWait(s.stack, proto, stack.TransportEndpointID{
				LocalPort: local.Port, LocalAddress: local.Addr, RemotePort: remote.Port, RemoteAddress: remote.Addr,
			})
			// And a client may use one source port toward two public
			// ports (the kernel only keeps 4-tuples unique), so a flow on
			// the same address and port toward another port, live or in
			// TIME_WAIT, must not make the bind fail either: SO_REUSEADDR,
			// which every such dial sets, leaves the 4-tuple to Connect.
			ep.SocketOptions().SetReuseAddress(true)
		}
		if terr := ep.Bind(local); terr != nil {
			ep.Close()
			return nil, fmt.Errorf("netstack: dial %s -> %s: bind: %w", src, dst, tcpipError(terr))
		}
	}
	s.setKeepalive(ep)

	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(remote)
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Abort()
			return nil, fmt.Errorf("netstack: dial %s -> %s: %w", src, dst, ctx.Err())
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, &net.OpError{Op: "dial", Net: "tcp", Source: net.TCPAddrFromAddrPort(src), Addr: net.TCPAddrFromAddrPort(dst), Err: tcpipError(terr)}
	}
	if s.closing.Load() {
		ep.Abort()
		return nil, ErrClosed
	}
	return s.track(newTCPConn(&wq, ep), gen), nil
}

// TCPConn is what the stack's TCP conns offer beyond net.Conn; Accept and
// DialTCP return conns that implement it.
type TCPConn interface {
	net.Conn
	CloseRead() error
	CloseWrite() error
	// Abort closes the connection with an RST instead of a FIN, discarding
	// unsent data, as Close after SetLinger(0) does to a *net.TCPConn: the
	// peer reads "connection reset", never a clean end of stream.
	Abort() error
}

// tcpConn is a gonet conn with Abort, whose Read and Write report a reset,
// an abort or a keepalive timeout as the syscall errno a kernel socket
// would (gonet keeps only the text), so callers test them with errors.Is.
type tcpConn struct {
	*gonet.TCPConn
	ep     tcpip.Endpoint
	wq     *waiter.Queue
	zc     zeroCopyState
	budget *connBudget // set once handed out; Close removes the conn from it
	fixed  bool        // send buffer set to a fixed size; guarded by budget.mu
	// standby: out of the budget's share-out (Standby); guarded by budget.mu
	standby bool
	// recvStart is the receive buffer it was handed out with (budget.add).
	recvStart int
	floor     int // cuts stop here: two segments (budget.add)
	// A receive buffer cut while the connection may hold out-of-order
	// segments (budget.go, watchCut): the size it had before (0: not
	// watched), the bytes read and gVisor's segment-queue drops then
	// (guarded by budget.mu).
	cutFrom         int
	cutIn, cutDrops uint64
	thawed          bool // cutFrom given back (thawStuckLocked)
	// movedIn and movedOut count the bytes read and written, for the
	// budget's check of which connections carry bulk data and which way;
	// lastIn and lastOut are them at the last check, and quiet the checks
	// in a row a bulk one moved little (guarded by budget.mu).
	movedIn, movedOut atomic.Uint64
	lastIn, lastOut   uint64
	quiet             int
	wasReset          atomic.Bool // a call reported a reset (noteReset)
	// routeGen is the stack's route generation when the handshake began
	// (routeMTUSince).
	routeGen uint64
}

var _ TCPConn = (*tcpConn)(nil)

func newTCPConn(wq *waiter.Queue, ep tcpip.Endpoint) *tcpConn {
	c := &tcpConn{TCPConn: gonet.NewTCPConn(wq, ep), ep: ep, wq: wq}
	c.zc.deadlineSet = make(chan struct{}, 1)
	return c
}

func (c *tcpConn) Read(b []byte) (int, error) {
	n, err := c.TCPConn.Read(b)
	c.movedIn.Add(uint64(n))
	if err == io.EOF {
		return n, c.eof("read")
	}
	return n, c.noteReset(connError(err))
}

func (c *tcpConn) Write(b []byte) (int, error) {
	n, err := c.TCPConn.Write(b)
	c.movedOut.Add(uint64(n))
	return n, c.noteReset(connError(err))
}

// noteReset remembers a reset err reports: gVisor reports a connection's
// reset to one call only, and a later read would then see a clean end of
// stream (a write on one goroutine, a read on another, the splice's case).
func (c *tcpConn) noteReset(err error) error {
	if errors.Is(err, syscall.ECONNRESET) {
		c.wasReset.Store(true)
	}
	return err
}

// eof is the end of stream a read reached: io.EOF, or the reset a call
// before it reported.
func (c *tcpConn) eof(op string) error {
	if c.wasReset.Load() {
		return connError(c.opError(op, &tcpip.ErrConnectionReset{}))
	}
	return io.EOF
}

// Standby takes c out of the stack's buffer budget while it carries no data
// (a relay's warm stream waiting for its flow, tunnel/warm.go): its buffers
// drop to two segments, so idle connections held ahead of use do not thin
// out the windows of those that move data. Resume puts it back, at the
// light share, before it carries a flow.
func (c *tcpConn) Standby() {
	if c.budget != nil {
		c.budget.standby(c)
	}
}

// Quiet reports whether the connection is established with nothing to
// read, no error and no FIN: a pooled connection its peer has not given up
// on (the relay's idle warm streams, tunnel/warm.go, whose peer never
// speaks first).
func (c *tcpConn) Quiet() bool {
	return tcp.EndpointState(c.ep.State()) == tcp.StateEstablished &&
		c.ep.Readiness(waiter.ReadableEvents|waiter.EventErr|waiter.EventHUp) == 0
}

// Resume ends Standby.
func (c *tcpConn) Resume() {
	if c.budget != nil {
		c.budget.resume(c)
	}
}

func (c *tcpConn) Abort() error {
	// Abort sends the RST in every connected state (after a half-close
	// too); Close then releases the endpoint as usual.
	c.ep.Abort()
	return c.Close()
}

// Close closes the connection; what the peer has not taken yet still goes
// out, as from a kernel socket, but for at most TCPConfig.OrphanTimeout
// without progress. gVisor otherwise probes a zero window for as long as
// the peer answers (RFC 1122), and a client that stops reading would hold
// the closed endpoint and its send queue, which the budget no longer
// counts, forever. Linux bounds its orphans the same way
// (tcp_orphan_retries).
func (c *tcpConn) Close() error {
	if c.budget != nil {
		c.budget.remove(c)
		uto := tcpip.TCPUserTimeoutOption(c.budget.s.cfg.TCP.OrphanTimeout)
		c.ep.SetSockOpt(&uto)
	}
	return c.TCPConn.Close()
}

// track counts c, whose handshake began at route generation gen, in the
// stack's buffer budget until it is closed.
func (s *Stack) track(c *tcpConn, gen uint64) *tcpConn {
	c.routeGen = gen
	s.conns.add(c)
	return c
}

// connError maps the text gonet left of a tcpip.Error back to its errno.
func connError(err error) error {
	if err == nil {
		return nil // before oe, which escapes: no allocation per call
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Err == nil {
		return err
	}
	var errno syscall.Errno
	switch oe.Err.Error() {
	case (*tcpip.ErrConnectionReset).String(nil):
		errno = syscall.ECONNRESET
	case (*tcpip.ErrConnectionAborted).String(nil), (*tcpip.ErrAborted).String(nil):
		errno = syscall.ECONNABORTED
	case (*tcpip.ErrTimeout).String(nil):
		errno = syscall.ETIMEDOUT
	case (*tcpip.ErrClosedForSend).String(nil):
		errno = syscall.EPIPE
	default:
		return err
	}
	mapped := *oe
	mapped.Err = errno
	return &mapped
}

// tcpipError maps gVisor errors to the syscall errors callers test with
// errors.Is (gonet only keeps the text).
func tcpipError(err tcpip.Error) error {
	switch err.(type) {
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrNetworkUnreachable, *tcpip.ErrHostUnreachable:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrPortInUse, *tcpip.ErrBadLocalAddress:
		return syscall.EADDRINUSE
	}
	return errors.New(err.String())
}
