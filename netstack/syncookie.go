package netstack

import (
	"context"
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// This file is the SYN-flood defence. Normally every SYN goes to
// tcp.Forwarder, which hands it to the Handler before the handshake (dial
// first: a stopped target looks "refused" to the client). That costs a
// forwarder in-flight slot, a handler goroutine and, once the dial succeeds,
// a target connection per SYN until the handshake completes or
// HandshakeTimeout aborts it. gVisor has SYN cookies only for listening
// endpoints (transport/tcp/accept.go handleListenSegment), so under
// pressure a port gets one: a listener bound to the wildcard address on
// that port (IPv4 and IPv6). The demuxer prefers an existing 4-tuple
// endpoint, so connections in progress are not disturbed; new SYNs reach the
// listener, which, with TCPAlwaysUseSynCookies set stack-wide (only these
// listeners exist), answers with a cookie and keeps no state. A client that
// completes the handshake comes out of Accept established and goes to the
// Handler (handshake first); spoofed SYNs cost nothing.
//
// gVisor's cookie does not encode window scaling, so cookie connections
// have none: their receive window stays at 64 KiB (a throughput cap on long
// paths while a port is under attack).

// handshakeCounts counts pending handshakes (forwarder requests from their
// SYN until the handshake completed or failed) per local port and in total,
// and knows their 4-tuples. The counts are an array, not a map: the input
// pump reads them for every SYN without a lock.
type handshakeCounts struct {
	total atomic.Int32
	port  [1 << 16]atomic.Int32
	// Handshakes that completed, per second, in total and per port (nil
	// where cookie mode is off): how many a port may keep pending before
	// it counts as flooded (pendingLimit).
	completedTotal completionRate
	completed      *[1 << 16]completionRate

	mu sync.Mutex
	// mu guards ids.
	ids map[stack.TransportEndpointID]struct{}
}

func newHandshakeCounts(rates bool) *handshakeCounts {
	h := &handshakeCounts{ids: make(map[stack.TransportEndpointID]struct{})}
	if rates {
		h.completed = new([1 << 16]completionRate)
	}
	return h
}

func (h *handshakeCounts) start(id stack.TransportEndpointID) {
	h.total.Add(1)
	h.port[id.LocalPort].Add(1)
	h.mu.Lock()
	h.ids[id] = struct{}{}
	h.mu.Unlock()
}

// done ends a pending handshake; completed says the client answered.
func (h *handshakeCounts) done(id stack.TransportEndpointID, completed bool) {
	h.mu.Lock()
	delete(h.ids, id)
	h.mu.Unlock()
	h.total.Add(-1)
	h.port[id.LocalPort].Add(-1)
	if completed && h.completed != nil {
		now := time.Now().Unix()
		h.completedTotal.add(now)
		h.completed[id.LocalPort].add(now)
	}
}

// busyFactor caps how far a port's completion rate raises its pending
// limit: at most busyFactor times the configured threshold.
const busyFactor = 16

// pendingLimit is how many handshakes may be pending before a SYN switches
// to cookies, given the configured threshold and the handshakes that
// completed in the last second: at least the threshold, and half a second's
// completions. A real client answers the SYN-ACK within its round trip, so a
// busy port (or stack) has about its completion rate times that pending;
// a spoofed flood's handshakes never complete. Without this, a port whose
// clients simply connect often (64 of them at once in their handshake, on a
// slow target or long paths) went to cookies and lost window scaling. The
// cap bounds the target connections a flood on a busy port holds before
// cookies start.
func pendingLimit(threshold int, rate *completionRate, now int64) int {
	return min(max(threshold, rate.perSecond(now)/2), threshold*busyFactor)
}

// overLimit reports whether a SYN for port finds its port's or the stack's
// pending handshakes at their limit.
func (h *handshakeCounts) overLimit(port uint16, t *TCPConfig, now int64) bool {
	return h.portOverLimit(port, t.CookiePortThreshold, now) ||
		h.completed != nil && int(h.total.Load()) >= pendingLimit(t.CookieTotalThreshold, &h.completedTotal, now)
}

func (h *handshakeCounts) portOverLimit(port uint16, threshold int, now int64) bool {
	return h.completed != nil && int(h.port[port].Load()) >= pendingLimit(threshold, &h.completed[port], now)
}

// completionRate counts events per second: the current second's count and
// the previous second's, with the second (mod 2^16), in one word, so the
// packet path reads it without a lock.
type completionRate struct{ w atomic.Uint64 }

const rateCountMax = 1<<24 - 1

func unpackRate(w uint64) (sec uint16, cur, prev int) {
	return uint16(w >> 48), int(w >> 24 & rateCountMax), int(w & rateCountMax)
}

func packRate(sec uint16, cur, prev int) uint64 {
	return uint64(sec)<<48 | uint64(cur)<<24 | uint64(prev)
}

// add counts one event at unix second now.
func (c *completionRate) add(now int64) {
	sec := uint16(now)
	for {
		old := c.w.Load()
		s, cur, prev := unpackRate(old)
		switch sec {
		case s:
			cur = min(cur+1, rateCountMax)
		case s + 1:
			cur, prev = 1, cur
		default:
			cur, prev = 1, 0
		}
		if c.w.CompareAndSwap(old, packRate(sec, cur, prev)) {
			return
		}
	}
}

// perSecond is the count of the last whole second, or of the current one so
// far when that is more (a rate that has just risen).
func (c *completionRate) perSecond(now int64) int {
	s, cur, prev := unpackRate(c.w.Load())
	switch uint16(now) {
	case s:
		return max(cur, prev)
	case s + 1:
		return cur
	}
	return 0
}

func (h *handshakeCounts) pending(id stack.TransportEndpointID) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.ids[id]
	return ok
}

// cookieBacklog is each cookie listener's accept queue; runCookieAccept
// drains it at once, so it only absorbs bursts of completed handshakes.
const cookieBacklog = 1024

// cookiePorts is the set of ports in SYN-cookie mode.
type cookiePorts struct {
	n  atomic.Int32 // len(m), read without mu on the packet path
	mu sync.Mutex
	// mu guards the following fields.
	m      map[uint16]*cookieListener
	closed bool

	wg   sync.WaitGroup // accept loops and the idle sweep
	stop chan struct{}  // closed by Stack.Close
}

// cookieListener is one port's pair of listening endpoints.
type cookieListener struct {
	port    uint16
	eps     []tcpip.Endpoint
	wqs     []*waiter.Queue
	lastSYN atomic.Int64 // unix nanos of the last SYN for the port
	// SYNs and the connections cookies completed since windowStart (unix
	// nanos, the sweep's): a port whose SYNs are answered is busy, not
	// flooded, and leaves cookie mode although SYNs keep coming.
	syns, conns atomic.Int64
	windowStart int64
	// leaving is set when the sweep decided the port leaves cookie mode;
	// the listener closes cookieLeaveGrace later (leaveTimer).
	leaving    atomic.Bool
	leaveTimer *time.Timer // guarded by cookiePorts.mu
	stop       chan struct{}
	stopSent   bool          // stop is closed; guarded by cookiePorts.mu
	stopped    chan struct{} // closed when runCookieAccept returned
}

// cookieLeaveGrace is how long a port that leaves cookie mode keeps its
// listener while the input pump drops the port's new SYNs. Closing at once
// reset clients: a SYN still queued on the listener is answered with a RST
// when it closes (gVisor redelivers it only to another endpoint, never to
// tcp.Forwarder: tcp/connect.go tryDeliverSegmentFromClosedEndpoint), and
// so is the handshake ACK of a cookie sent just before. In the grace, those
// ACKs (one round trip) still find the listener; a dropped SYN's client
// retransmits after its initial RTO (1 s on Linux, more than the grace) and
// takes the dial-first path.
const cookieLeaveGrace = 500 * time.Millisecond

// cookieMode reports whether new SYNs may switch ports to cookie mode.
func (s *Stack) cookieMode() bool {
	return s.cfg.TCP.CookiePortThreshold > 0 && s.cfg.TCP.CookieTotalThreshold > 0
}

// noteSYN is called by the input pump for every pure SYN before it is
// injected: it refreshes a cookie port's activity, or switches the port to
// cookie mode when its (or all) pending handshakes reached the threshold,
// so that this SYN already gets a cookie. It reports whether to drop the
// SYN (counted): any SYN of a port leaving cookie mode (cookieLeaveGrace),
// and a retransmission of a handshake still pending on the dial-first path
// (tcp.Forwarder ignores those) must not reach the cookie listener, whose
// connection would then race the forwarder's for the 4-tuple and reset the
// client.
func (s *Stack) noteSYN(p *packetInfo) (drop bool) {
	if !s.cookieMode() {
		return false
	}
	port := p.dstPort
	if s.cookies.n.Load() > 0 {
		s.cookies.mu.Lock()
		l := s.cookies.m[port]
		s.cookies.mu.Unlock()
		if l != nil {
			if l.leaving.Load() {
				s.stats.cookieExitSynsHeld.Add(1)
				return true
			}
			l.lastSYN.Store(time.Now().UnixNano())
			l.syns.Add(1)
			return s.holdSYNRetransmission(p)
		}
	}
	if !s.handshakes.overLimit(port, &s.cfg.TCP, time.Now().Unix()) {
		return false
	}
	s.enterCookieMode(port)
	return s.holdSYNRetransmission(p)
}

// holdSYNRetransmission reports (and counts) a SYN of a handshake still
// pending on the dial-first path: it must not reach a cookie listener.
func (s *Stack) holdSYNRetransmission(p *packetInfo) bool {
	if !s.handshakes.pending(p.endpointID()) {
		return false
	}
	s.stats.synRetransHeld.Add(1)
	return true
}

// enterCookieMode opens port's cookie listeners, unless MaxCookiePorts are
// open already (the SYN then takes the forwarder path, counted).
func (s *Stack) enterCookieMode(port uint16) {
	c := &s.cookies
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.m[port] != nil {
		return
	}
	if len(c.m) >= s.cfg.TCP.MaxCookiePorts {
		s.stats.cookieOverflow.Add(1)
		return
	}
	l, err := s.newCookieListener(port)
	if err != nil {
		if n := s.stats.cookieFailures.Add(1); n&(n-1) == 0 {
			s.log.Warn("syn-cookie listener failed", zap.Uint16("listen", port), zap.Error(err), zap.Uint64("count", n))
		}
		return
	}
	c.m[port] = l
	c.n.Store(int32(len(c.m)))
	s.stats.cookieEntries.Add(1)
	c.wg.Add(1)
	go s.runCookieAccept(l)
	now := time.Now().Unix()
	s.log.Warn("port under syn flood: syn cookies on",
		zap.Uint16("listen", port),
		zap.Int32("pending", s.handshakes.port[port].Load()),
		zap.Int("port_limit", pendingLimit(s.cfg.TCP.CookiePortThreshold, &s.handshakes.completed[port], now)),
		zap.Int32("pending_total", s.handshakes.total.Load()),
		zap.Int("total_limit", pendingLimit(s.cfg.TCP.CookieTotalThreshold, &s.handshakes.completedTotal, now)))
}

// newCookieListener binds and listens on the wildcard address at port, for
// IPv4 and (v6-only) IPv6.
func (s *Stack) newCookieListener(port uint16) (*cookieListener, error) {
	l := &cookieListener{port: port, stop: make(chan struct{}), stopped: make(chan struct{})}
	l.lastSYN.Store(time.Now().UnixNano())
	l.windowStart = l.lastSYN.Load()
	for _, proto := range []tcpip.NetworkProtocolNumber{header.IPv4ProtocolNumber, header.IPv6ProtocolNumber} {
		wq := new(waiter.Queue)
		ep, err := s.stack.NewEndpoint(tcp.ProtocolNumber, proto, wq)
		if err == nil && proto == header.IPv6ProtocolNumber {
			ep.SocketOptions().SetV6Only(true)
		}
		if err == nil {
			// Connections that forwarder requests made on this port hold no
			// port reservation; a relay's DialTCP bound to it would, and
			// then the port stays in forwarder mode (counted).
			if err = ep.Bind(tcpip.FullAddress{Port: port}); err == nil {
				err = ep.Listen(cookieBacklog)
			}
			if err == nil {
				// A client's first data that reaches the listener before
				// its handshake ACK made the connection is moved to the
				// connection, but gVisor leaves its size charged to the
				// listener (tcp/accept.go handleListenSegment, then
				// segment.setOwner), and the listener's queue refuses
				// payload once the charge passes its receive buffer: after
				// a few thousand connections every such client waited a
				// 200 ms retransmission (TestCookiePortKeepsPace). The
				// charge is an int32, so this limit is never reached.
				// Accepted connections keep the stack's buffer: Listen
				// has already taken it. Nothing is lost as a bound: the
				// queue always takes segments without payload (SYNs,
				// the flood itself); the listener's processor drains it.
				ep.SocketOptions().SetReceiveBufferSize(math.MaxInt32, false)
			}
			if err != nil {
				ep.Close()
			}
		}
		if err != nil {
			l.close()
			return nil, tcpipError(err)
		}
		l.eps = append(l.eps, ep)
		l.wqs = append(l.wqs, wq)
	}
	return l, nil
}

func (l *cookieListener) close() {
	for _, ep := range l.eps {
		ep.Close()
	}
}

// runCookieAccept hands the port's completed cookie handshakes to the
// Handler until the listener is stopped; then it closes the listener (its
// queued, unaccepted connections are reset).
func (s *Stack) runCookieAccept(l *cookieListener) {
	defer s.cookies.wg.Done()
	defer close(l.stopped)
	defer l.close()
	notify := make(chan struct{}, 1)
	for _, wq := range l.wqs {
		e := waiter.NewFunctionEntry(waiter.ReadableEvents, func(waiter.EventMask) {
			select {
			case notify <- struct{}{}:
			default:
			}
		})
		wq.EventRegister(&e)
		defer wq.EventUnregister(&e)
	}
	for {
		stopping := false
		select {
		case <-l.stop:
			stopping = true // one last pass: what completed before is served
		default:
		}
		for _, ep := range l.eps {
			for {
				nep, nwq, err := ep.Accept(nil)
				if err != nil {
					break // ErrWouldBlock, or the listener is closing
				}
				s.handleCookieConn(l, nep, nwq)
			}
		}
		if stopping {
			return
		}
		select {
		case <-l.stop:
		case <-notify:
		}
	}
}

// handleCookieConn hands one connection whose handshake a cookie completed
// to the Handler, as an Established TCPRequest.
func (s *Stack) handleCookieConn(l *cookieListener, ep tcpip.Endpoint, wq *waiter.Queue) {
	info, ok := ep.Info().(*stack.TransportEndpointInfo)
	if !ok || !s.admit() {
		ep.Abort()
		return
	}
	s.stats.cookieConns.Add(1)
	l.conns.Add(1)
	id := info.ID
	s.setKeepalive(ep)
	r := &TCPRequest{
		Src: netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort),
		Dst: netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort),
		s:   s,
		id:  id,
		est: newTCPConn(wq, ep), // its MSS came from the cookie: at most the route's
	}
	r.est.routeGen = s.routeGen()
	go func() {
		defer s.handlers.Done()
		r.serve()
	}()
}

// serve runs the Handler for an established request.
func (r *TCPRequest) serve() {
	s := r.s
	r.ctx, r.abandon = context.WithCancel(context.Background())
	s.stats.tcpRequests.Add(1)
	s.pending.add(r)
	defer r.Reject() // no-op if the handler answered
	s.handler.HandleTCP(r)
}

// runCookieSweep lets ports leave cookie mode (closeCookieListener, after
// cookieLeaveGrace) when they are not under pressure and saw no SYN for
// CookieIdle, or their SYNs in the last CookieIdle were mostly answered
// (clients, not a flood), until the Stack closes.
func (s *Stack) runCookieSweep() {
	defer s.cookies.wg.Done()
	idle := s.cfg.TCP.CookieIdle
	tick := time.NewTicker(max(idle/4, time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-s.cookies.stop:
			return
		case now := <-tick.C:
			s.sweepCookies(now, idle)
		}
	}
}

func (s *Stack) sweepCookies(now time.Time, idle time.Duration) {
	c := &s.cookies
	if c.n.Load() == 0 {
		return
	}
	t := now.UnixNano()
	c.mu.Lock()
	defer c.mu.Unlock()
	for port, l := range c.m {
		if l.leaving.Load() {
			continue
		}
		off := t-l.lastSYN.Load() >= int64(idle)
		if !off && t-l.windowStart >= int64(idle) {
			syns, conns := l.syns.Swap(0), l.conns.Swap(0)
			l.windowStart = t
			off = 2*conns >= syns
		}
		if !off || s.handshakes.portOverLimit(port, s.cfg.TCP.CookiePortThreshold, now.Unix()) {
			continue
		}
		l.leaving.Store(true)
		c.wg.Add(1)
		l.leaveTimer = time.AfterFunc(cookieLeaveGrace, func() {
			defer c.wg.Done()
			s.closeCookieListener(l)
		})
	}
}

// closeCookieListener ends a leaving port's cookie mode, unless the Stack
// closed first.
func (s *Stack) closeCookieListener(l *cookieListener) {
	if !s.stopCookieListener(l) {
		return
	}
	<-l.stopped
	s.forgetCookieListener(l)
	s.stats.cookieExits.Add(1)
	s.log.Info("syn cookies off", zap.Uint16("listen", l.port))
}

// stopCookieListener tells l's accept loop to close it, and reports false
// if the Stack closed first. The port stays in the map, leaving, until the
// endpoints are closed (forgetCookieListener): meanwhile its SYNs are still
// dropped (noteSYN). Out of the map earlier, a SYN reached the still-bound
// listener, got a cookie, and its ACK a reset once the listener closed.
func (s *Stack) stopCookieListener(l *cookieListener) bool {
	c := &s.cookies
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.m[l.port] != l {
		return false
	}
	l.stopSent = true
	close(l.stop)
	return true
}

// forgetCookieListener takes the closed l's port out of the map.
func (s *Stack) forgetCookieListener(l *cookieListener) {
	c := &s.cookies
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m[l.port] == l {
		delete(c.m, l.port)
		c.n.Store(int32(len(c.m)))
	}
}

// closeCookies stops the sweep and every cookie listener (Stack.Close).
func (s *Stack) closeCookies() {
	c := &s.cookies
	c.mu.Lock()
	c.closed = true
	for port, l := range c.m {
		if !l.stopSent {
			l.stopSent = true
			close(l.stop)
		}
		if l.leaveTimer != nil && l.leaveTimer.Stop() {
			c.wg.Done() // its closeCookieListener will not run
		}
		delete(c.m, port)
	}
	c.n.Store(0)
	c.mu.Unlock()
	close(c.stop)
	c.wg.Wait()
}
