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

// connBudget shares TCPConfig.BufferBudget among the stack's TCP
// connections. gVisor's auto-tuning grows each connection's receive and send
// buffers towards the stack-wide maximum, reading it at every step, and never
// shrinks them. So the budget sets that maximum to each connection's share
// (budget / 2 / connections, rounded down to a power of two so it changes
// only when the count crosses one, between minConnBuf and the configured
// maxima) and cuts the buffers of connections that grew past a lowered
// share to it. A cut connection keeps a fixed buffer (gVisor has no way back
// to auto-tuning), raised again with the share. The receive buffer bounds
// what the peer may send (the window), the send buffer what a writer may
// queue, so the bytes gVisor holds for the connections stay within the
// budget and a flow that would need more is slowed by its window instead.
type connBudget struct {
	s                *Stack
	total            int // 0: no budget, the connections are only counted
	recvMax, sendMax int // the configured maxima

	// mu guards the following fields, and is held while buffers are set so
	// that the last share decided is the one applied. Setting a buffer may
	// send a window update, which waits while the outward queue is full
	// (the output pump drains it; it never takes mu).
	mu    sync.Mutex
	conns map[*tcpConn]struct{} // handed out and not closed
	share int                   // per connection and direction; 0: no budget

	lowered atomic.Uint64 // times the share fell
	cuts    atomic.Uint64 // buffers set below their size
	lastLog atomic.Int64  // unix nanos of the last warning
}

func (b *connBudget) init(s *Stack) {
	b.s = s
	b.total = s.cfg.TCP.BufferBudget
	b.recvMax, b.sendMax = s.cfg.TCP.RecvBufMax, s.cfg.TCP.SendBufMax
	b.conns = make(map[*tcpConn]struct{})
	if b.total > 0 {
		b.share = b.shareFor(1)
	}
}

// shareFor returns the per-connection, per-direction share for n
// connections.
func (b *connBudget) shareFor(n int) int {
	share := b.total / 2 / max(n, 1)
	p := minConnBuf
	for p*2 <= share {
		p *= 2
	}
	return min(p, max(b.recvMax, b.sendMax))
}

// options returns the stack's buffer options for share (0: the configured
// ones); configure sets them for the initial share.
func (b *connBudget) options(share int) (tcpip.TCPReceiveBufferSizeRangeOption, tcpip.TCPSendBufferSizeRangeOption) {
	rmax, smax := b.recvMax, b.sendMax
	if share > 0 {
		rmax, smax = min(rmax, share), min(smax, share)
	}
	return tcpip.TCPReceiveBufferSizeRangeOption{Min: defaultBufMin, Default: min(defaultBufDefault, rmax), Max: rmax},
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

// add counts c and fits it, and under a lowered share everyone, to the
// share.
func (b *connBudget) add(c *tcpConn) {
	c.budget = b
	// Two segments at the MTU the connection's handshake had (its MSS is
	// at most that, less the IPv4 and TCP headers): cuts stop there.
	c.floor = 2 * (b.s.routeMTUSince(c.routeGen) - header.IPv4MinimumSize - header.TCPMinimumSize)
	b.mu.Lock()
	b.conns[c] = struct{}{}
	b.rebalanceLocked(c)
	b.mu.Unlock()
	b.s.timeWait.check(false)
}

// remove forgets c; the others may get a larger share.
func (b *connBudget) remove(c *tcpConn) {
	b.mu.Lock()
	_, ok := b.conns[c]
	if ok {
		delete(b.conns, c)
		b.rebalanceLocked(nil)
	}
	b.mu.Unlock()
	if ok {
		b.s.timeWait.check(true)
	}
}

// rebalanceLocked recomputes the share, updates the stack options when it
// changed, and sets the buffers that must follow. added is the connection
// just added, if any.
func (b *connBudget) rebalanceLocked(added *tcpConn) {
	if b.total <= 0 {
		return
	}
	n := len(b.conns)
	share := b.shareFor(n)
	old := b.share
	if share > old && b.shareFor(n+n/2+1) <= old {
		// Raise only once the count fell well below where the share was
		// lowered: a count going back and forth across a power of two (a
		// client churning connections) would otherwise cut and raise every
		// connection's buffers at each step.
		share = old
	}
	b.share = share
	if share != old {
		r, s := b.options(share)
		// Errors are impossible for a valid range (Min <= Default <= Max).
		_ = b.s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &r)
		_ = b.s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &s)
		b.s.fitRoutesToShare(share)
	}
	cut := 0
	switch {
	case share < old:
		for c := range b.conns {
			cut += c.fitBuffers(share)
		}
	case share > old:
		// Raise the fixed ones; the others auto-tune up to the new maximum.
		for c := range b.conns {
			if c.fixed {
				c.fitBuffers(share)
			}
		}
	case added != nil:
		cut += added.fitBuffers(share)
	}
	if cut == 0 {
		return
	}
	b.cuts.Add(uint64(cut))
	if share < old {
		b.lowered.Add(1)
	}
	now := time.Now().UnixNano()
	if last := b.lastLog.Load(); now-last >= int64(budgetLogEvery) && b.lastLog.CompareAndSwap(last, now) {
		b.s.log.Warn("tcp buffer budget shared out: connection buffers cut, flows slowed by their windows",
			zap.Int("budget_bytes", b.total), zap.Int("share_bytes", share), zap.Int("count", n))
	}
}

// fitBuffers cuts c's receive and send buffers to share where they are
// larger, and sets them to share where they are fixed (cut before), never
// below c's floor; it returns how many it cut. A cut buffer stays fixed: it
// no longer auto-tunes (gVisor offers no way back). Called with the
// budget's mu held.
func (c *tcpConn) fitBuffers(share int) (cut int) {
	share = max(share, c.floor)
	ops := c.ep.SocketOptions()
	if cur := int(ops.GetReceiveBufferSize()); cur > share || (c.fixed && cur != share) {
		ops.SetReceiveBufferSize(int64(share), true)
		if cur > share {
			cut++
		}
		c.fixed = true
	}
	if cur := int(ops.GetSendBufferSize()); cur > share || (c.fixed && cur != share) {
		ops.SetSendBufferSize(int64(share), true)
		if cur > share {
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

// currentShare returns the share in force (0: no budget).
func (b *connBudget) currentShare() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.share
}
