package netstack

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Delayed ACKs. gVisor acknowledges every segment as soon as its processor
// has handled it (it has no delayed ACK), so a request answered a moment
// later costs the peer two packets, a pure ACK and the answer, where a
// kernel server sends one (measured: RR in process ~16 % CPU and ~9 %
// latency). The link holds the pure ACK of a small request for up to
// delayedACKHold (tunnelDelayedACKHold on a tunnel's stack) and drops it
// when a segment of the same connection that acknowledges as much leaves
// first; otherwise it leaves when the hold ends. Only a request's ACK is held: the input pump notes each data
// segment and where it ends, and a pure ACK ending exactly there, without
// SACK blocks, is the one, if that segment was small and the first of its
// connection or acknowledges data the Stack sent since the last one (a
// conversation, not a stream: bulk data in is never held up, whatever its
// segment sizes). Duplicate ACKs end elsewhere, and at most one ACK per
// connection waits (the next one goes at once, as a kernel acknowledges
// every second segment).
//
// A peer's FIN is noted the same way unless this side sent its own FIN
// already: the ACK of the FIN waits for the FIN the close it brings on
// sends (a relayed connection's close then costs one packet less each
// time one side waits for the other), as a kernel's delayed ACK merges
// them.
//
// delayedACKHold is how long a request's ACK waits for the answer (a
// variable only so tests can make a busy machine's scheduling irrelevant).
// It bounds the classic delayed-ACK stall of a peer whose Nagle holds its
// next small segment for our ACK.
var delayedACKHold = 500 * time.Microsecond

// tunnelDelayedACKHold is the hold on a tunnel's stack (a Direct link). Its
// peer is always the other natbox's gVisor, which runs without Nagle, so
// nothing there waits for the ACK, and the answers it waits for are slower:
// a warm stream's first request is answered once the appliance has dialed
// the target, and the relay's ACK of that answer leaves with its FIN once
// the public client closed. At 500 µs both missed most of the time (about
// two pure ACKs per relayed connection, one each way); 10 ms catches them
// and stays far below the peer's retransmission timeout (200 ms at least;
// with RACK the probe timeout of a lone request adds 200 ms too). A
// variable only for tests.
var tunnelDelayedACKHold = 10 * time.Millisecond

const (
	// delackMaxRequest is the largest segment whose ACK may wait.
	delackMaxRequest = 1024
	// delackSlots bounds the ACKs held at once (one per slot).
	delackSlots = 256
	// delackMaxHeader: a TCP header with timestamps at most, no SACK.
	delackMaxHeader = header.TCPMinimumSize + 12
)

// delayedACKEnabled is a variable only so tests and benchmarks can compare.
var delayedACKEnabled = true

type delayedACKs struct {
	hold  time.Duration
	start time.Time // clock origin: now() is monotonic
	send  func(*outBuf)
	drop  func(*outBuf)
	held  atomic.Int32 // slots holding an ACK: output skips the lookup at 0

	// Counters (Stats.AcksHeld, AcksSuppressed).
	heldTotal, suppressed atomic.Uint64

	mu sync.Mutex
	// mu guards the following fields.
	slots  [delackSlots]delackSlot
	timer  *time.Timer
	armed  bool
	closed bool
}

type delackSlot struct {
	id      stack.TransportEndpointID
	end     uint32 // where the noted request ended (the ACK number that acknowledges it)
	noted   int64  // when it was noted; 0: nothing noted (or not a request)
	peerAck uint32 // the ACK number of the last segment noted
	finSent bool   // this side's FIN of connection id left
	b       *outBuf
	ack     uint32
	due     int64
}

func newDelayedACKs(hold time.Duration, send, drop func(*outBuf)) *delayedACKs {
	d := &delayedACKs{hold: hold, start: time.Now(), send: send, drop: drop}
	d.timer = time.AfterFunc(time.Hour, d.fire)
	d.timer.Stop()
	return d
}

func (d *delayedACKs) now() int64 { return int64(time.Since(d.start)) }

func delackSlotOf(id *stack.TransportEndpointID) int {
	h := uint32(id.LocalPort)<<16 | uint32(id.RemotePort)
	r := id.RemoteAddress.AsSlice()
	h ^= binary.BigEndian.Uint32(r[len(r)-4:])
	h *= 0x9e3779b1
	return int(h >> 24) // delackSlots == 256
}

// note records a data or FIN segment of connection id that ends at end (a
// FIN's sequence number counted) and acknowledges ack; if it is small (and
// a request, see above), or a FIN, its ACK may wait. Called by the input
// pumps before gVisor sees the segment.
func (d *delayedACKs) note(id stack.TransportEndpointID, end, ack uint32, small, fin bool) {
	i := delackSlotOf(&id)
	now := d.now()
	d.mu.Lock()
	defer d.mu.Unlock()
	s := &d.slots[i]
	if s.b != nil && s.id != id {
		// Another connection's ACK waits here: it keeps the slot (this
		// one's ACK will not wait), and the input pump never writes.
		return
	}
	answered := s.id != id || ack != s.peerAck
	if s.id != id {
		s.finSent = false
	}
	s.id, s.end, s.peerAck, s.noted = id, end, ack, 0
	if small && answered || fin && !s.finSent {
		s.noted = now
	}
}

// output looks at an outbound TCP packet (pkt, copied into b) and reports
// whether it was held. A pure ACK of a noted request is held; any other
// segment of a connection whose ACK waits releases it: dropped when the
// segment acknowledges as much (the common case: the answer), dropped too
// on an RST.
func (d *delayedACKs) output(pkt *stack.PacketBuffer, b *outBuf) bool {
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize {
		return false
	}
	flags := th.Flags()
	pure := flags == header.TCPFlagAck && pkt.Data().Size() == 0 && len(th) <= delackMaxHeader
	fin := flags&header.TCPFlagFin != 0
	if !pure && !fin && d.held.Load() == 0 {
		return false
	}
	id, ok := outboundID(pkt, th)
	if !ok {
		return false
	}
	ack := th.AckNumber()
	i := delackSlotOf(&id)
	now := d.now()
	d.mu.Lock()
	s := &d.slots[i]
	if fin && (s.id == id || s.b == nil) {
		// The ACK of the peer's FIN will have nothing to wait for.
		if s.id != id {
			s.id, s.noted = id, 0
		}
		s.finSent = true
	}
	var old *outBuf
	if s.b != nil && s.id == id && (flags&header.TCPFlagRst != 0 || flags&header.TCPFlagAck != 0 && seqGE(ack, s.ack)) {
		old, s.b = s.b, nil
		d.held.Add(-1)
	}
	hold := pure && old == nil && s.b == nil && !d.closed && s.noted != 0 && s.id == id && s.end == ack && now-s.noted <= int64(d.hold)
	if hold {
		s.noted = 0 // one ACK per noted request
		s.b, s.ack, s.due = b, ack, now+int64(d.hold)
		d.held.Add(1)
		if !d.armed {
			d.armed = true
			d.timer.Reset(d.hold)
		}
	}
	d.mu.Unlock()
	if old != nil {
		d.suppressed.Add(1)
		d.drop(old)
	}
	if hold {
		d.heldTotal.Add(1)
	}
	return hold
}

// seqGE reports a >= b in sequence space.
func seqGE(a, b uint32) bool { return int32(a-b) >= 0 }

// outboundID is the connection of an outbound segment, as gVisor names it
// (local: the packet's source).
func outboundID(pkt *stack.PacketBuffer, th header.TCP) (stack.TransportEndpointID, bool) {
	nh := pkt.NetworkHeader().Slice()
	var src, dst tcpip.Address
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return stack.TransportEndpointID{}, false
		}
		ip := header.IPv4(nh)
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return stack.TransportEndpointID{}, false
		}
		ip := header.IPv6(nh)
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		return stack.TransportEndpointID{}, false
	}
	return stack.TransportEndpointID{LocalPort: th.SourcePort(), LocalAddress: src, RemotePort: th.DestinationPort(), RemoteAddress: dst}, true
}

// fire sends the ACKs whose hold ended.
func (d *delayedACKs) fire() {
	var due [delackSlots]*outBuf
	n := 0
	now := d.now()
	d.mu.Lock()
	next := int64(-1)
	for i := range d.slots {
		s := &d.slots[i]
		if s.b == nil {
			continue
		}
		if s.due <= now || d.closed {
			due[n], s.b = s.b, nil
			n++
			d.held.Add(-1)
		} else if next < 0 || s.due < next {
			next = s.due
		}
	}
	d.armed = next >= 0 && !d.closed
	if d.armed {
		d.timer.Reset(time.Duration(next - now))
	}
	d.mu.Unlock()
	for _, b := range due[:n] {
		d.send(b)
	}
}

// close stops holding and sends what waits.
func (d *delayedACKs) close() {
	d.mu.Lock()
	d.closed = true
	d.timer.Stop()
	d.mu.Unlock()
	d.fire()
}
