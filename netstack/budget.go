package netstack

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// minConnBuf is the least a connection's receive or send buffer is cut to
// under a buffer budget: about eleven 1448-byte segments, enough for a flow
// to go on (slowly) however many share the budget. Past
// BufferBudget/(2*minConnBuf) connections the floor, not the budget, bounds
// them.
const minConnBuf = 16 << 10

// budgetLogEvery rate-limits the warning that buffers were cut.
const budgetLogEvery = 10 * time.Second

// Light and bulk connections. Most connections through a port mapping are
// light (an SSH session, a websocket, a keep-alive HTTP connection waiting
// for its next request) and need little buffer; a few carry bulk data and
// need a window of the path's bandwidth times its round trip (8 MiB at
// 50 ms and 1.3 Gbit/s). Sharing the budget equally among all of them
// would give a download beside 200 idle connections a 32 KiB window, a few
// Mbit/s over a WAN. So every connection starts light (a share of at most
// lightBufMax, gVisor's default buffer), and the budget checks every
// bulkCheckEvery which ones moved at least bulkMinBytes in a direction
// since the last check: those become bulk in that direction, and that
// direction's buffer (the receive buffer for data coming in, the send
// buffer for data going out) gets what the light buffers leave of the
// budget, shared among the bulk directions. A flow is one way almost
// always (a download, an upload, a stream), so its other buffer stays at
// the light share. A bulk connection that moved less for bulkQuietChecks
// checks in a row is light again.
const (
	lightBufMax     = defaultBufDefault
	bulkCheckEvery  = 200 * time.Millisecond
	bulkMinBytes    = 64 << 10 // 2.6 Mbit/s over a check
	bulkQuietChecks = 5
)

// connBudget shares TCPConfig.BufferBudget among the stack's TCP
// connections. Each connection's receive buffer is set by the budget when
// the connection is handed out and from then on (fitLight, fitBulk):
// gVisor's receive auto-tuning would grow it towards the stack-wide
// maximum, which must stay at the configured one, since gVisor derives a
// connection's window scale from it at the handshake, and a scale for 1 MiB
// could never open a bulk connection's window past 2 MiB. Send buffers auto-tune up to the light
// share, the stack-wide send maximum, and are cut to a lowered share or
// fixed at the bulk one (gVisor has no way back to auto-tuning). The light
// share is budget / 2 / connections, rounded down to a power of two so it
// changes only when the count crosses one, between minConnBuf and
// lightBufMax; the bulk directions get the rest. The receive buffer bounds
// what the peer may send (the window), the send buffer what a writer may
// queue, so the bytes gVisor holds for the connections stay within the
// budget: every connection's two buffers at the light share, plus each
// bulk direction's excess over it, is at most the budget, and a flow that
// would need more is slowed by its window instead.
type connBudget struct {
	s                *Stack
	total            int // 0: no budget, the connections are only counted
	recvMax, sendMax int // the configured maxima

	// mu guards the following fields, and is held while buffers are set so
	// that the last share decided is the one applied. Setting a buffer may
	// send a window update, which waits while the outward queue is full
	// (the output pump drains it; it never takes mu).
	mu        sync.Mutex
	conns     map[*tcpConn]struct{} // handed out and not closed
	bulk      map[*tcpConn]bulkDirs // those of conns that are bulk, and in which directions
	cutRecv   map[*tcpConn]struct{} // receive buffers cut and not read from since (watchCut)
	share     int                   // per light buffer; 0: no budget
	bulkShare int                   // per bulk direction's buffer

	lowered  atomic.Uint64  // times the share fell
	cuts     atomic.Uint64  // buffers set below their size
	promoted atomic.Uint64  // times a connection became bulk
	thaws    atomic.Uint64  // cut receive buffers given back to fill a gap (thawStuck)
	lastLog  atomic.Int64   // unix nanos of the last warning
	checks   sync.WaitGroup // runChecks
}

func (b *connBudget) init(s *Stack) {
	b.s = s
	b.total = s.cfg.TCP.BufferBudget
	b.recvMax, b.sendMax = s.cfg.TCP.RecvBufMax, s.cfg.TCP.SendBufMax
	b.conns = make(map[*tcpConn]struct{})
	b.bulk = make(map[*tcpConn]bulkDirs)
	b.cutRecv = make(map[*tcpConn]struct{})
	if b.total > 0 {
		b.share = b.lightFor(1)
		b.bulkShare = b.share
	}
}

// shareFor returns the per-connection, per-direction share for n
// connections that all get the same.
func (b *connBudget) shareFor(n int) int {
	return min(floorPow2(b.total/2/max(n, 1)), b.bufMax())
}

// floorPow2 returns the largest power of two not above x, and no less than
// minConnBuf.
func floorPow2(x int) int {
	p := minConnBuf
	for p*2 <= x {
		p *= 2
	}
	return p
}

func (b *connBudget) bufMax() int { return max(b.recvMax, b.sendMax) }

// lightFor returns the light connections' share among n connections.
func (b *connBudget) lightFor(n int) int { return min(b.shareFor(n), lightBufMax) }

// bulkDirs is the directions a bulk connection carries bulk data in.
type bulkDirs uint8

const (
	bulkIn  bulkDirs = 1 << iota // received: its receive buffer (the window) is bulk
	bulkOut                      // sent: its send buffer is bulk
)

// count returns how many directions d holds.
func (d bulkDirs) count() int { return int(d&bulkIn) + int(d&bulkOut)>>1 }

// bulkFor returns a bulk direction's buffer share among n connections
// whose buffers are light but for dirs bulk directions: what all 2n
// buffers at light leave of the budget, in equal parts, on top of light.
// It is rounded down to a quarter of a power of two, finer than the light
// share since it is the window of the flows that need one.
func (b *connBudget) bulkFor(n, dirs, light int) int {
	if dirs == 0 {
		return light
	}
	rest := light + (b.total-2*n*light)/dirs
	if p := floorPow2(rest); rest >= p {
		rest -= rest % (p / 4)
	}
	return min(max(rest, light), b.bufMax())
}

// bulkDirsLocked returns the bulk directions of all bulk connections.
func (b *connBudget) bulkDirsLocked() (dirs int) {
	for _, d := range b.bulk {
		dirs += d.count()
	}
	return dirs
}

// options returns the stack's buffer options for the light share (0: the
// configured ones); configure sets them for the initial share. The receive
// maximum stays the configured one (the window scale, see connBudget); new
// connections start as light ones.
func (b *connBudget) options(share int) (tcpip.TCPReceiveBufferSizeRangeOption, tcpip.TCPSendBufferSizeRangeOption) {
	rdef, smax := b.recvMax, b.sendMax
	if share > 0 {
		rdef, smax = min(rdef, share), min(smax, share)
	}
	return tcpip.TCPReceiveBufferSizeRangeOption{Min: defaultBufMin, Default: min(defaultBufDefault, rdef), Max: b.recvMax},
		tcpip.TCPSendBufferSizeRangeOption{Min: defaultBufMin, Default: min(defaultBufDefault, smax), Max: smax}
}

// initialWindow is the receive buffer tcp.Forwarder gives a new connection
// (fixed when the forwarder is made): the default, or under a budget no
// more than a share among 64 connections, so a burst of new connections
// does not start far beyond the budget before they are fitted.
func (b *connBudget) initialWindow() int {
	if b.total <= 0 {
		return defaultBufDefault
	}
	return min(defaultBufDefault, b.shareFor(64))
}

// add counts c, as light, and fits it, and under a lowered share everyone,
// to the shares.
func (b *connBudget) add(c *tcpConn) {
	c.budget = b
	// Two segments at the MTU the connection's handshake had (its MSS is
	// at most that, less the IPv4 and TCP headers): cuts stop there.
	c.floor = 2 * (b.s.routeMTUSince(c.routeGen) - header.IPv4MinimumSize - header.TCPMinimumSize)
	ops := c.ep.SocketOptions()
	c.recvStart = int(ops.GetReceiveBufferSize())
	if b.total > 0 {
		// Set at its own size: that ends gVisor's receive auto-tuning, and
		// the budget sets it from now on.
		ops.SetReceiveBufferSize(int64(c.recvStart), true)
	}
	b.mu.Lock()
	b.conns[c] = struct{}{}
	b.rebalanceLocked(c, nil)
	b.mu.Unlock()
	b.s.timeWait.check(false)
}

// remove forgets c, counted or on standby (a warm stream closed while it
// waited: its cut left it watched in cutRecv); the others may get a larger
// share.
func (b *connBudget) remove(c *tcpConn) {
	b.mu.Lock()
	_, counted := b.conns[c]
	ok := counted || c.standby
	if ok {
		delete(b.conns, c)
		delete(b.bulk, c)
		delete(b.cutRecv, c)
		c.standby = false
		if counted {
			b.rebalanceLocked(nil, nil)
		}
	}
	b.mu.Unlock()
	if ok {
		b.s.timeWait.check(true)
	}
}

// standby takes c out of the budget's share-out: its buffers drop to its
// floor (two segments) and the connections that move data share the budget
// without it. resume puts it back as a new light connection.
func (b *connBudget) standby(c *tcpConn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.conns[c]; !ok {
		return
	}
	delete(b.conns, c)
	delete(b.bulk, c)
	c.standby = true
	if b.total > 0 {
		c.fixed = false
		c.fitBuffers(0, 0)
	}
	b.rebalanceLocked(nil, nil)
}

func (b *connBudget) resume(c *tcpConn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !c.standby {
		return
	}
	c.standby = false
	b.conns[c] = struct{}{}
	b.rebalanceLocked(c, nil)
}

// runChecks checks the connections' traffic every bulkCheckEvery until
// the stack closes.
func (b *connBudget) runChecks(done <-chan struct{}) {
	defer b.checks.Done()
	tick := time.NewTicker(bulkCheckEvery)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			b.check()
		}
	}
}

// check makes the connections that moved at least bulkMinBytes in a
// direction since the last check bulk in it, and the bulk ones that moved
// less for bulkQuietChecks checks in a row light, and refits the shares.
// A bulk connection stays bulk in a direction it no longer uses until it
// is light again (a transfer that turns round keeps both windows).
func (b *connBudget) check() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.total <= 0 {
		return
	}
	var changed []*tcpConn
	for c := range b.conns {
		in, out := c.movedIn.Load(), c.movedOut.Load()
		var busy bulkDirs
		if in-c.lastIn >= bulkMinBytes {
			busy |= bulkIn
		}
		if out-c.lastOut >= bulkMinBytes {
			busy |= bulkOut
		}
		c.lastIn, c.lastOut = in, out
		dirs, bulk := b.bulk[c]
		switch {
		case busy != 0 && !bulk:
			b.bulk[c] = busy
			b.promoted.Add(1)
			changed = append(changed, c)
		case busy != 0:
			c.quiet = 0
			if busy&^dirs != 0 {
				b.bulk[c] = dirs | busy
				changed = append(changed, c)
			}
		case bulk:
			if c.quiet++; c.quiet >= bulkQuietChecks {
				delete(b.bulk, c)
				changed = append(changed, c)
			}
		}
	}
	if len(changed) > 0 {
		b.rebalanceLocked(nil, changed)
	}
	b.thawStuckLocked()
}

// A cut receive buffer can stall its connection. gVisor keeps out-of-order
// segments while they fill less than three quarters of the receive buffer
// (tcp/rcv.go, handleRcvdSegment) and refuses every segment with data once
// what the connection holds passes the buffer (tcp/segment_queue.go,
// enqueue). Cut below the out-of-order segments it holds, the buffer
// refuses the retransmission that would fill their gap, and nothing frees
// them: the connection stalls for as long as the cut lasts (a bulk echo
// stalled 30 s under reloads in internal/app TestReloadUnderLoad; made
// to stall for good in TestBudgetThawsAStuckGap). gVisor
// shows neither those segments nor the gap, only its segment-queue drops;
// so a cut receive buffer is watched (watchCut) until the connection's
// reader gets data again, and one whose drops grow while nothing waits to
// be read (a slow reader's full buffer is the budget doing its job) gets
// its size from before the cut back (thawStuckLocked): the gap fills, the
// held segments go up to the reader, and the next check cuts it again.
// Thawing adds little memory: the held segments are there either way, and
// the buffer is cut again at the first check after the reader got data.

// watchCut notes a receive buffer cut from cur. Called with mu held.
func (b *connBudget) watchCut(c *tcpConn, cur int) {
	if c.cutFrom == 0 {
		c.cutFrom, c.cutIn, c.cutDrops = cur, c.movedIn.Load(), c.segmentQueueDrops()
		b.cutRecv[c] = struct{}{}
	}
}

// thawStuckLocked gives the watched connections that are stuck their
// receive buffer back, forgets those whose reader got data, and cuts
// those again to their share. Called with mu held, at each check.
func (b *connBudget) thawStuckLocked() {
	for c := range b.cutRecv {
		if _, counted := b.conns[c]; !counted && !c.standby {
			delete(b.cutRecv, c)
			continue
		}
		switch drops := c.segmentQueueDrops(); {
		case c.movedIn.Load() != c.cutIn:
			// The reader got data: whatever gap there was moved on. A
			// thawed buffer is cut to its share again (and watched again).
			thawed := c.thawed
			c.cutFrom, c.thawed = 0, false
			delete(b.cutRecv, c)
			if thawed {
				b.refitLocked(c)
			}
		case drops != c.cutDrops && c.unread() == 0:
			b.thaws.Add(1)
			c.ep.SocketOptions().SetReceiveBufferSize(int64(c.cutFrom), true)
			c.cutDrops, c.thawed = drops, true
		}
	}
}

// refitLocked fits c to its share again: its class's, or on standby its
// floor.
func (b *connBudget) refitLocked(c *tcpConn) {
	switch d, isBulk := b.bulk[c]; {
	case c.standby:
		c.fitBuffers(0, 0)
	case isBulk:
		b.fitBulk(c, d, b.bulkShare, b.share)
	default:
		b.fitLight(c, b.share)
	}
}

// segmentQueueDrops returns the segments gVisor refused c for want of
// receive buffer.
func (c *tcpConn) segmentQueueDrops() uint64 {
	if st, ok := c.ep.Stats().(*tcp.Stats); ok {
		return st.ReceiveErrors.SegmentQueueDropped.Value()
	}
	return 0
}

// unread returns the bytes c received in order that its reader has not
// read yet.
func (c *tcpConn) unread() int {
	n, err := c.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
	if err != nil {
		return 0
	}
	return n
}

// rebalanceLocked recomputes the shares, updates the stack options when the
// light one changed, and sets the buffers that must follow. added is the
// connection just added, if any; changed are those that just became bulk
// or light again.
func (b *connBudget) rebalanceLocked(added *tcpConn, changed []*tcpConn) {
	if b.total <= 0 {
		return
	}
	n, nb, dirs := len(b.conns), len(b.bulk), b.bulkDirsLocked()
	light := b.lightFor(n)
	old, oldBulk := b.share, b.bulkShare
	if light > old && b.lightFor(n+n/2+1) <= old {
		// Raise only once the count fell well below where the share was
		// lowered: a count going back and forth across a power of two (a
		// client churning connections) would otherwise cut and raise every
		// connection's buffers at each step. Keeping the light share lower
		// only leaves more to the bulk one.
		light = old
	}
	bulk := b.bulkFor(n, dirs, light)
	if bulk > oldBulk && nb > 0 && len(changed) == 0 {
		// Likewise, raise the bulk share only as far as it would still
		// hold with one light connection more.
		bulk = max(oldBulk, b.bulkFor(n+1, dirs, light))
	}
	b.share, b.bulkShare = light, bulk
	if light != old {
		r, s := b.options(light)
		// Errors are impossible for a valid range (Min <= Default <= Max).
		_ = b.s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &r)
		_ = b.s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &s)
		b.s.fitRoutesToShare(light)
	}
	cut := 0
	if bulk < oldBulk || light < old {
		// Cut the bulk ones first: what the others gain comes from them
		// (and a bulk connection's other direction is at the light share).
		for c, d := range b.bulk {
			cut += b.fitBulk(c, d, bulk, light)
		}
	}
	for _, c := range changed {
		// A connection's class changed by its traffic, not by the budget:
		// not a cut.
		if d, isBulk := b.bulk[c]; isBulk {
			c.quiet = 0
			b.fitBulk(c, d, bulk, light)
		} else {
			b.fitLight(c, light)
		}
	}
	switch {
	case light < old:
		for c := range b.conns {
			if _, isBulk := b.bulk[c]; !isBulk {
				cut += b.fitLight(c, light)
			}
		}
	case light > old:
		// Send buffers not fixed auto-tune up to the new maximum.
		for c := range b.conns {
			if _, isBulk := b.bulk[c]; !isBulk {
				b.fitLight(c, light)
			}
		}
	case added != nil:
		cut += b.fitLight(added, light)
	}
	if bulk > oldBulk || light > old {
		for c, d := range b.bulk {
			b.fitBulk(c, d, bulk, light)
		}
	}
	if cut == 0 {
		return
	}
	b.cuts.Add(uint64(cut))
	if light < old || bulk < oldBulk {
		b.lowered.Add(1)
	}
	now := time.Now().UnixNano()
	if last := b.lastLog.Load(); now-last >= int64(budgetLogEvery) && b.lastLog.CompareAndSwap(last, now) {
		b.s.log.Warn("tcp buffer budget shared out: connection buffers cut, flows slowed by their windows",
			zap.Int("budget_bytes", b.total), zap.Int("share_bytes", light), zap.Int("bulk_share_bytes", bulk),
			zap.Int("count", n), zap.Int("bulk", nb))
	}
}

// fitLight fits a light connection to the light share: its receive buffer
// is the one it started with (gVisor's default for one it dialled,
// tcp.Forwarder's initial window for one it accepted) within the share,
// never more (one that needs a larger window moves enough to be bulk at the
// next check); its send buffer auto-tunes up to the share.
func (b *connBudget) fitLight(c *tcpConn, light int) (cut int) {
	return c.fitBuffers(min(light, c.recvStart), light)
}

// fitBulk fits a bulk connection's bulk directions to the bulk share,
// within the configured maxima, and its others as fitLight does. A bulk
// send buffer is fixed (gVisor's auto-tuning would not grow it in time).
func (b *connBudget) fitBulk(c *tcpConn, d bulkDirs, bulk, light int) (cut int) {
	recv, send := min(light, c.recvStart), light
	if d&bulkIn != 0 {
		recv = min(bulk, b.recvMax)
	}
	if d&bulkOut != 0 {
		send = min(bulk, b.sendMax)
		c.fixed = true
	}
	return c.fitBuffers(recv, send)
}

// fitBuffers sets c's receive buffer to recv, and cuts its send buffer to
// send where larger or sets it to send where fixed (cut before or bulk),
// neither below c's floor; it returns how many buffers it cut. Called with
// the budget's mu held.
func (c *tcpConn) fitBuffers(recv, send int) (cut int) {
	recv, send = max(recv, c.floor), max(send, c.floor)
	ops := c.ep.SocketOptions()
	if cur := int(ops.GetReceiveBufferSize()); cur != recv {
		ops.SetReceiveBufferSize(int64(recv), true)
		if cur > recv {
			cut++
			c.budget.watchCut(c, cur)
		}
	}
	if cur := int(ops.GetSendBufferSize()); cur > send || (c.fixed && cur != send) {
		ops.SetSendBufferSize(int64(send), true)
		if cur > send {
			cut++
		}
		c.fixed = true
	}
	return cut
}

// buffered returns the connections counted and the bytes received on them
// and not read yet (gVisor does not expose its send queues' fill).
func (b *connBudget) buffered() (conns int, bytes uint64) {
	b.mu.Lock()
	list := make([]*tcpConn, 0, len(b.conns))
	for c := range b.conns {
		list = append(list, c)
	}
	b.mu.Unlock()
	for _, c := range list {
		if v, err := c.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption); err == nil && v > 0 {
			bytes += uint64(v)
		}
	}
	return len(list), bytes
}

// currentShares returns the light and the bulk share in force (0: no
// budget) and how many connections are bulk.
func (b *connBudget) currentShares() (light, bulk, bulkConns int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.share, b.bulkShare, len(b.bulk)
}
