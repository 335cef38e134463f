package netstack

import (
	"encoding/binary"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gVisor's TCP sender makes one segment of each Write (as much as fits the
// send buffer), merges whole queued segments up to its GSO limit
// (GSOMaxSize less the largest headers: 65375 bytes) but never splits one
// to fill a packet, and the GSO packet is then cut into MSS-sized packets.
// A bulk copy writing 64 KiB at a time on a 32000-byte tunnel therefore sent
// four packets per write (31920, 31920, 1535 and the 161 bytes past the GSO
// limit) where two carry it, and each packet costs a WireGuard message, a
// UDP datagram and a segment for the receiving stack. WriteChunk tells a
// writer the size that leaves as whole segments; the link learns each
// connection's segment size from its GSO packets, as gVisor exposes no MSS.

// segSizes remembers the segment payload size of the TCP flows whose GSO
// packets left the link, in a small table indexed by their ports (lock-free;
// a collision only loses the information, never gives a wrong size for a
// flow the caller could not tell apart: the ports are checked).
type segSizes [256]atomic.Uint64 // ports << 32 | segment payload size

// portsKey packs a flow's local (source) and remote ports.
func portsKey(local, remote uint16) uint64 { return uint64(local)<<16 | uint64(remote) }

func (t *segSizes) slot(key uint64) *atomic.Uint64 {
	return &t[(key^key>>8^key>>16)&uint64(len(t)-1)]
}

// note records pkt's segment size; pkt is an outbound TCP GSO packet. Only
// data counts: a handshake's packets carry an MSS before it is agreed.
func (t *segSizes) note(pkt *stack.PacketBuffer) {
	th := pkt.TransportHeader().Slice()
	mss := uint64(pkt.GSOOptions.MSS)
	if len(th) < header.TCPMinimumSize || mss == 0 || pkt.Data().Size() == 0 {
		return
	}
	v := portsKey(binary.BigEndian.Uint16(th[0:2]), binary.BigEndian.Uint16(th[2:4]))<<32 | mss
	if s := t.slot(v >> 32); s.Load() != v {
		s.Store(v)
	}
}

// size returns the segment payload size last seen for the flow, 0 if none.
func (t *segSizes) size(local, remote uint16) int {
	key := portsKey(local, remote)
	v := t.slot(key).Load()
	if v>>32 != key {
		return 0
	}
	return int(uint32(v))
}

// gsoPayloadLimit is the most payload gVisor puts in one GSO packet
// (tcp/snd.go sendData).
func (e *linkEndpoint) gsoPayloadLimit() int {
	return int(e.GSOMaxSize()) - header.TCPTotalHeaderMaximumSize - 1
}

// WriteChunk returns the write size the connection sends as whole segments:
// the largest multiple of its segment payload that fits one GSO packet, or 0
// while that is unknown (no GSO packet of it left yet, or a link without
// host GSO). A bulk writer that writes in such chunks while it has them
// sends no short segments in between.
func (c *tcpConn) WriteChunk() int {
	if c.budget == nil || c.budget.s == nil {
		return 0
	}
	id := c.ep.Info().(*stack.TransportEndpointInfo).ID
	l := c.budget.s.link
	mss := l.segs.size(id.LocalPort, id.RemotePort)
	if mss <= 0 {
		return 0
	}
	return max(l.gsoPayloadLimit()/mss, 1) * mss
}
