package netstack

import (
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// timeWaitCap bounds the endpoints a stack keeps closing, as Linux's
// tcp_max_tw_buckets does: past TCPConfig.MaxClosing of them, connections
// that enter TIME_WAIT leave it at once. gVisor keeps a whole endpoint (~6
// KiB with its timers and tables) for each TIME_WAIT connection, so under
// churn TIME_WAIT, not buffers, made natbox's peak memory (5 000 conn/s held
// 1 s each: ~33 MiB live). What TIME_WAIT still does here is answer a
// retransmitted last FIN with an ACK instead of an RST (a SYN reopens the
// 4-tuple anyway, see reopenTimeWait), and the peer that receives that RST
// is in LAST-ACK, done with the connection: nothing of value is lost.
//
// gVisor reads the stack's TIME_WAIT timeout when an endpoint enters
// TIME_WAIT, so the cap switches that option between TCPConfig.TimeWait and
// zero. It is checked whenever a connection opens or closes (churn is
// exactly that), and lets go at half the bound, so it does not flap.
type timeWaitCap struct {
	st        *Stack
	max       uint64
	normal    time.Duration
	connected *tcpip.StatCounter // gVisor's CurrentConnected
	estab     *tcpip.StatCounter // gVisor's CurrentEstablished

	mu sync.Mutex // serializes switching the option
	// on is set while TIME_WAIT is skipped.
	on atomic.Bool
	// engaged counts the times the cap took effect; skipped the
	// connections closed meanwhile (the ones whose TIME_WAIT, if they had
	// one, ended at once).
	engaged, skipped atomic.Uint64
}

func (c *timeWaitCap) init(s *Stack) {
	c.st = s
	if s.cfg.TCP.MaxClosing > 0 {
		c.max = uint64(s.cfg.TCP.MaxClosing)
	}
	c.normal = s.cfg.TCP.TimeWait
	if c.normal <= 0 {
		c.normal = tcp.DefaultTCPTimeWaitTimeout
	}
	tcpStats := s.stack.Stats().TCP
	c.connected, c.estab = tcpStats.CurrentConnected, tcpStats.CurrentEstablished
}

// closing is how many endpoints are past ESTABLISHED and not gone yet.
func (c *timeWaitCap) closing() uint64 {
	conn, est := c.connected.Value(), c.estab.Value()
	return conn - min(conn, est)
}

// check switches TIME_WAIT off at max closing endpoints and back on below
// half of it; closed says a connection is closing now.
func (c *timeWaitCap) check(closed bool) {
	if c.max == 0 {
		return
	}
	on := c.on.Load()
	if closed && on {
		c.skipped.Add(1)
	}
	n := c.closing()
	if want := n >= c.max || (on && n > c.max/2); want != on {
		c.set(want)
	}
}

func (c *timeWaitCap) set(on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.on.Load() == on {
		return
	}
	d := c.normal
	if on {
		d = 0
		c.engaged.Add(1)
	}
	opt := tcpip.TCPTimeWaitTimeoutOption(d)
	if err := c.st.stack.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); err != nil {
		return // cannot happen: configure set the same option
	}
	c.on.Store(on)
}

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}
