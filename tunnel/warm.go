package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/gostack"
)

// Warm streams: the relay keeps a few TCP connections open to each peer's
// stack ahead of use, so a public connection's first bytes go through the
// tunnel at once, not after a handshake's round trip. A relayed connection
// then costs one round trip between relay and appliance instead of two
// (frp's multiplexed streams cost one too).
//
// Only for a peer whose hello said "warm_streams":true; an older appliance
// says nothing and gets one tunnel connection per public connection.
//
//	relay -> appliance  a TCP connection from the relay's tunnel address to
//	                    the appliance's, port ControlPort; idle until used
//	relay -> appliance  the header (warmHeader), then the client's bytes
//	appliance -> relay  warmAccepted once the target answered, then the
//	                    target's bytes; or warmRefused, then a FIN
//
// A public flow never comes from the relay's own tunnel address (the relay
// refuses such a client), so the appliance tells a warm stream from a
// public flow to a mapping on port 7 by its source.

// The appliance's one-byte answer to a warm stream's header.
const (
	warmAccepted byte = 0
	warmRefused  byte = 1
)

// The header: version, family (4 or 6), the public port the client reached,
// the client's port (both big-endian) and address (4 or 16 bytes).
const (
	warmVersion       = 1
	warmHeaderFixed   = 6
	maxWarmHeaderSize = warmHeaderFixed + 16
)

// Defaults of WithWarmStreams.
const (
	defaultWarmMax  = 128              // idle and dialing streams per peer, at most
	defaultWarmIdle = 60 * time.Second // an idle stream older than this is closed
)

// warmMin streams stay open toward a connected peer while none are used.
const warmMin = 2

// errWarmHeader marks a header that is not one.
var errWarmHeader = errors.New("malformed warm stream header")

// appendWarmHeader appends the header of a flow from client to port.
func appendWarmHeader(b []byte, client netip.AddrPort, port uint16) []byte {
	a := client.Addr().Unmap()
	fam := byte(4)
	if a.Is6() {
		fam = 6
	}
	b = append(b, warmVersion, fam)
	b = binary.BigEndian.AppendUint16(b, port)
	b = binary.BigEndian.AppendUint16(b, client.Port())
	return append(b, a.AsSlice()...)
}

// readWarmHeader reads a header from r: the client and the public port.
func readWarmHeader(r io.Reader) (client netip.AddrPort, port uint16, err error) {
	var b [maxWarmHeaderSize]byte
	if _, err := io.ReadFull(r, b[:warmHeaderFixed]); err != nil {
		return client, 0, err
	}
	if b[0] != warmVersion {
		return client, 0, fmt.Errorf("%w: version %d, want %d", errWarmHeader, b[0], warmVersion)
	}
	n := 4
	switch b[1] {
	case 4:
	case 6:
		n = 16
	default:
		return client, 0, fmt.Errorf("%w: family %d", errWarmHeader, b[1])
	}
	if _, err := io.ReadFull(r, b[warmHeaderFixed:warmHeaderFixed+n]); err != nil {
		return client, 0, fmt.Errorf("warm stream header: %w", io.ErrUnexpectedEOF)
	}
	a, _ := netip.AddrFromSlice(b[warmHeaderFixed : warmHeaderFixed+n])
	port = binary.BigEndian.Uint16(b[2:])
	if port == 0 || !a.IsValid() || a.IsUnspecified() {
		return client, 0, fmt.Errorf("%w: client %s, port %d", errWarmHeader, a, port)
	}
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[4:])), port, nil
}

// ---- the appliance's side

// warmServed counts the appliance's warm streams.
type warmServed struct {
	waiting atomic.Int64  // accepted, waiting for their header
	served  atomic.Uint64 // carried a public flow
	refused atomic.Uint64 // refused: WithWarmStreams' bound on waiting ones
	bad     atomic.Uint64 // closed for a malformed header
}

// ServeWarm serves a connection attempt from src to dst that arrived through
// the tunnel if it is one of the relay's warm streams, and reports whether
// it was: it accepts it, waits for the header and hands the public flow it
// carries to serve with the client's own address, as if the flow had come
// on its own (so allowlists and per-source budgets see the client). The
// stack's handler calls it first, on the attempt's goroutine.
func (u *Uplink) ServeWarm(src, dst netip.AddrPort, a forwarder.TCPAttempt, serve func(src, dst netip.AddrPort, a forwarder.TCPAttempt)) bool {
	if dst.Port() != ControlPort || src.Addr().Unmap() != u.cfg.RelayAddress.Unmap() || u.opts.warmMax == 0 {
		return false
	}
	w := &u.warm
	if w.waiting.Add(1) > int64(2*u.opts.warmMax) {
		w.waiting.Add(-1)
		w.refused.Add(1)
		a.Reject()
		return true
	}
	c, err := a.Accept()
	if err != nil {
		w.waiting.Add(-1)
		return true
	}
	// Waiting, it holds two segments' buffers, outside the budget.
	sc, _ := c.(standbyConn)
	if sc != nil {
		sc.Standby()
	}
	// The relay closes a stream idle for warmIdle; this bounds one whose
	// relay vanished.
	c.SetReadDeadline(time.Now().Add(2 * u.opts.warmIdle))
	client, port, err := readWarmHeader(c)
	w.waiting.Add(-1)
	if sc != nil {
		sc.Resume()
	}
	if err != nil {
		// EOF: the relay closed it unused; others: the relay or this
		// stack went away.
		if errors.Is(err, errWarmHeader) {
			w.bad.Add(1)
			u.log.Debug("warm stream closed", zap.Error(err))
		}
		c.Close()
		return true
	}
	c.SetReadDeadline(time.Time{})
	w.served.Add(1)
	// The GC shrank this goroutine's stack while it waited; the dial and
	// the splice would grow it again from deep inside.
	gostack.Grow()
	local := netip.AddrPortFrom(tunnelAddrFor(u.cfg.Address, client.Addr()), port)
	serve(client, local, warmAttempt{c})
	return true
}

// warmAttempt is a warm stream's flow as the forwarder's connection attempt:
// the answer byte tells the relay whether the target took it.
type warmAttempt struct{ c net.Conn }

func (a warmAttempt) Accept() (net.Conn, error) {
	if ws, ok := a.c.(warmStream); ok {
		return newAnswerConn(ws), nil
	}
	if _, err := a.c.Write([]byte{warmAccepted}); err != nil {
		a.c.Close()
		return nil, err
	}
	return a.c, nil
}

func (a warmAttempt) Reject() {
	a.c.Write([]byte{warmRefused})
	a.c.Close()
}

// Context is never cancelled: the target's dial timeout bounds the wait.
func (a warmAttempt) Context() context.Context { return context.Background() }

// ---- the relay's side

// warmCounters are a peer's warm stream counters, kept across its sessions.
type warmCounters struct {
	used, missed, dialFailed, expired, resets, dead atomic.Uint64
}

// warmStream is what a warm stream's conn offers: a netstack TCPConn with its
// zero-copy paths (netstack/zerocopy_linux.go), all of which warmConn passes on.
type warmStream interface {
	net.Conn
	CloseRead() error
	CloseWrite() error
	Abort() error
	WriteToSocket(syscall.RawConn) (int, error, error)
	ReadFromSocket(syscall.RawConn) (int, error, error)
	// Quiet reports the stream established with nothing to read: its
	// peer has not reset or closed it while it waited.
	Quiet() bool
	standbyConn
}

// standbyConn is a netstack conn that can leave the stack's buffer budget
// while it waits (netstack's tcpConn.Standby): a pool of idle streams must
// not thin out the windows of the flows that move data.
type standbyConn interface {
	Standby()
	Resume()
}

type idleWarm struct {
	c     warmStream
	since time.Time
}

// warmPool keeps a session's warm streams toward its peer. How many it keeps
// follows use: a take that finds none doubles the target (up to max), a
// sweep that saw no such miss halves it (down to warmMin).
type warmPool struct {
	dial   func(context.Context) (net.Conn, error)
	cnt    *warmCounters
	max    int
	idleT  time.Duration
	ctx    context.Context
	cancel context.CancelFunc
	wg     *sync.WaitGroup // the relay's
	log    *zap.Logger

	mu      sync.Mutex
	idle    []idleWarm // oldest first
	dialing int
	target  int
	missed  bool   // a take found none since the last sweep
	failing bool   // a dial failed: no new ones for warmRetry
	gen     uint64 // reset's count: a dial begun before a reset is discarded
	closed  bool
}

// newWarmPool starts a pool dialing with dial; close ends it.
func newWarmPool(parent context.Context, dial func(context.Context) (net.Conn, error), cnt *warmCounters, maxStreams int,
	idle time.Duration, wg *sync.WaitGroup, log *zap.Logger) *warmPool {
	p := &warmPool{dial: dial, cnt: cnt, max: maxStreams, idleT: idle, wg: wg, log: log, target: min(warmMin, maxStreams)}
	p.ctx, p.cancel = context.WithCancel(parent)
	p.mu.Lock()
	p.fillLocked()
	p.mu.Unlock()
	wg.Add(1)
	go p.sweepLoop()
	return p
}

// take returns an idle stream, or nil; either way it refills.
func (p *warmPool) take() warmStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	var c warmStream
	for n := len(p.idle); n > 0 && c == nil; n = len(p.idle) {
		c = p.idle[n-1].c // the newest: the oldest may expire unused
		p.idle[n-1] = idleWarm{}
		p.idle = p.idle[:n-1]
		if !c.Quiet() {
			// The appliance gave up on it while it waited (e.g. its
			// handshake completed on the relay's side only, past the
			// appliance's handshake timeout): nothing was written on
			// it, so the flow takes the next one or a fresh dial
			// instead of a reset.
			c.Close()
			p.cnt.dead.Add(1)
			c = nil
		}
	}
	if c != nil {
		p.cnt.used.Add(1)
	} else {
		p.cnt.missed.Add(1)
		p.missed = true
		p.target = min(p.max, 2*max(p.target, 1))
	}
	p.fillLocked()
	return c
}

// warmDialing bounds a peer's warm streams in their handshake at once: a
// pool growing after misses refills at most this many per round trip.
const warmDialing = 64

// fillLocked dials until idle and dialing streams reach the target, at most
// warmDialing at once; each dial's end fills again.
func (p *warmPool) fillLocked() {
	for !p.closed && !p.failing && p.ctx.Err() == nil && len(p.idle)+p.dialing < p.target && p.dialing < warmDialing {
		p.dialing++
		p.wg.Add(1)
		go p.dialOne(p.gen)
	}
}

const (
	// warmDialTimeout bounds one warm stream's handshake: under the
	// appliance's 3 s (netstack's default HandshakeTimeout), past which it
	// drops its half-open end, and a dial that completed later would pool
	// a stream already reset.
	warmDialTimeout = 2500 * time.Millisecond
	warmRetry       = time.Second // after a failed dial, before the next
)

// retry dials again after a failure's pause.
func (p *warmPool) retry() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failing = false
	p.fillLocked()
}

// dialOne dials one stream for the pool as it was at reset count gen.
func (p *warmPool) dialOne(gen uint64) {
	defer p.wg.Done()
	gostack.Grow() // for gVisor's handshake
	ctx, cancel := context.WithTimeout(p.ctx, warmDialTimeout)
	c, err := p.dial(ctx)
	cancel()
	ws, ok := c.(warmStream)
	if err == nil && !ok {
		c.Close()
		err = fmt.Errorf("a %T has no zero-copy paths", c)
	}
	if err == nil {
		ws.Standby()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dialing--
	switch {
	case err != nil:
		if !p.closed && !p.failing {
			p.failing = true
			time.AfterFunc(warmRetry, p.retry)
		}
		if !p.closed {
			p.cnt.dialFailed.Add(1)
			p.log.Debug("warm stream dial failed", zap.Error(err))
		}
	case p.closed:
		ws.Close()
	case p.gen != gen: // begun before a reset: at the old MTU
		ws.Close()
		p.fillLocked()
	default:
		p.idle = append(p.idle, idleWarm{c: ws, since: time.Now()})
		p.fillLocked()
	}
}

func (p *warmPool) sweepLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.idleT / 4)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case now := <-t.C:
			p.sweep(now)
		}
	}
}

// sweep closes the streams idle past idleT, adapts the target and refills.
func (p *warmPool) sweep(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for n < len(p.idle) && now.Sub(p.idle[n].since) > p.idleT {
		p.idle[n].c.Close()
		n++
	}
	p.cnt.expired.Add(uint64(n))
	p.idle = append(p.idle[:0], p.idle[n:]...)
	if !p.missed {
		p.target = max(min(warmMin, p.max), p.target/2)
	}
	p.missed = false
	p.fillLocked()
}

// reset replaces the idle streams: the peer's path MTU changed, and a TCP
// connection keeps the MSS of its handshake.
func (p *warmPool) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, w := range p.idle {
		w.c.Close()
	}
	clear(p.idle)
	p.idle = p.idle[:0]
	p.gen++
	p.cnt.resets.Add(1)
	p.fillLocked()
}

// idleCount is the number of streams ready now.
func (p *warmPool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// close closes the idle streams and stops dialing.
func (p *warmPool) close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = nil, true
	p.mu.Unlock()
	p.cancel()
	for _, w := range idle {
		w.c.Close()
	}
}

// coalesceWait is how long a warm stream's header (relay) or answer
// (appliance) waits for the flow's first bytes, to leave in one segment with
// them, before it leaves alone (the other side may be the one to speak
// first).
const coalesceWait = time.Millisecond

// leadBytes sends lead (a header or an answer) with the first bytes written
// on c, alone after coalesceWait, or before a half-close or close, whichever
// comes first: a segment and a wake-up per flow less each way.
type leadBytes struct {
	c warmStream
	// sent is set once the lead is written (or dropped), never before: a
	// write that sees it may go straight to c.
	sent  atomic.Bool
	mu    sync.Mutex // serialises the first write with the timer's; guards timer
	lead  []byte
	timer *time.Timer
}

func newLeadBytes(c warmStream, lead []byte) *leadBytes {
	l := &leadBytes{c: c, lead: lead}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.timer = time.AfterFunc(coalesceWait, func() { l.flush() })
	return l
}

// stop drops the lead: the stream ends without it.
func (l *leadBytes) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.timer.Stop()
	l.sent.Store(true)
}

// write writes b on c, after the lead if it is still waiting.
func (l *leadBytes) write(b []byte) (int, error) {
	if l.sent.Load() {
		return l.c.Write(b)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sent.Load() {
		return l.c.Write(b)
	}
	l.timer.Stop()
	n, err := l.c.Write(append(l.lead[:len(l.lead):len(l.lead)], b...))
	l.sent.Store(true)
	return max(n-len(l.lead), 0), err
}

// flush sends the lead alone if it is still waiting.
func (l *leadBytes) flush() error {
	if l.sent.Load() {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sent.Load() {
		return nil
	}
	l.timer.Stop()
	_, err := l.c.Write(l.lead)
	l.sent.Store(true)
	return err
}

// leadConn is a warm stream whose lead goes out before anything written on
// it: with the first write, or alone before a zero-copy write or a
// half-close (the other side may be waiting to speak).
type leadConn struct {
	warmStream
	lead *leadBytes
}

func (c *leadConn) Write(b []byte) (int, error) { return c.lead.write(b) }

func (c *leadConn) ReadFromSocket(rc syscall.RawConn) (int, error, error) {
	if err := c.lead.flush(); err != nil {
		return 0, nil, err
	}
	return c.warmStream.ReadFromSocket(rc)
}

func (c *leadConn) CloseWrite() error {
	c.lead.flush()
	return c.warmStream.CloseWrite()
}

// answerConn is a warm stream's flow on the appliance once its target
// answered: the accepted byte leads the target's first bytes.
type answerConn struct{ leadConn }

func newAnswerConn(c warmStream) *answerConn {
	return &answerConn{leadConn{warmStream: c, lead: newLeadBytes(c, []byte{warmAccepted})}}
}

// Close sends the answer first: a target that closes without a byte still
// took the flow.
func (c *answerConn) Close() error {
	c.lead.flush()
	return c.warmStream.Close()
}

// Abort resets the stream: no answer is due.
func (c *answerConn) Abort() error {
	c.lead.stop()
	return c.warmStream.Abort()
}

// warmConn is a warm stream carrying a public flow on the relay: the header
// leads the client's first bytes, and the first read takes the appliance's
// answer byte.
type warmConn struct {
	leadConn             // the header leads
	answered bool        // only the reading goroutine (the splice's) looks
	late     atomic.Bool // no answer within the dial timeout
	timer    *time.Timer
}

// startWarm starts the flow from client to port on c (its header leaves
// with the client's first bytes); the answer is due by ctx's deadline (the
// relay's dial timeout).
func startWarm(ctx context.Context, c warmStream, client netip.AddrPort, port uint16) *warmConn {
	c.Resume()
	w := &warmConn{leadConn: leadConn{warmStream: c, lead: newLeadBytes(c, appendWarmHeader(make([]byte, 0, maxWarmHeaderSize), client, port))}}
	if d, ok := ctx.Deadline(); ok {
		w.timer = time.AfterFunc(time.Until(d), func() {
			w.late.Store(true)
			c.SetReadDeadline(time.Unix(1, 0)) // wakes the read waiting for the answer
		})
	}
	return w
}

// answer reads the appliance's answer once; a refusal or none in time is
// forwarder.ErrLateDialFailure.
func (c *warmConn) answer() error {
	if c.answered {
		return nil
	}
	var b [1]byte
	_, err := io.ReadFull(c.warmStream, b[:])
	if c.timer != nil {
		c.timer.Stop()
	}
	// Whatever ends the stream before the answer (a stale stream's reset
	// too), the flow reached no target.
	switch {
	case c.late.Load():
		return fmt.Errorf("warm stream: no answer within the dial timeout: %w", forwarder.ErrLateDialFailure)
	case err != nil:
		return fmt.Errorf("warm stream ended before its answer (%v): %w", err, forwarder.ErrLateDialFailure)
	case b[0] != warmAccepted:
		return fmt.Errorf("warm stream: the peer refused the flow: %w", forwarder.ErrLateDialFailure)
	}
	c.answered = true
	return nil
}

func (c *warmConn) Read(b []byte) (int, error) {
	if err := c.answer(); err != nil {
		return 0, err
	}
	return c.warmStream.Read(b)
}

func (c *warmConn) WriteToSocket(rc syscall.RawConn) (int, error, error) {
	if err := c.answer(); err != nil {
		return 0, err, nil
	}
	return c.warmStream.WriteToSocket(rc)
}

// Close and Abort stop the timers too. A stream closed before its header
// left reads as unused on the appliance: no target is dialed for a client
// that left without a byte.
func (c *warmConn) Close() error {
	c.stopTimers()
	return c.warmStream.Close()
}

func (c *warmConn) Abort() error {
	c.stopTimers()
	return c.warmStream.Abort()
}

func (c *warmConn) stopTimers() {
	c.lead.stop()
	if c.timer != nil {
		c.timer.Stop()
	}
}
