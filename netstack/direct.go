package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// Direct returns a connected pair like Pipe, for a Stack and a wireguard-go
// device: give stackSide to New and outerSide to device.NewDevice. Instead
// of a rendezvous between two pumps it joins them directly:
//
//   - outerSide.Read pulls the stack's outbound packets off its link queue
//     on wireguard-go's reader goroutine (no output pump). The link keeps
//     gVisor's packets by reference and advertises host GSO, so TCP hands
//     over segments of up to 64 KiB; Read cuts them into MSS-sized packets
//     with their headers and checksums written straight into wireguard-go's
//     buffers: one copy instead of three (link buffer, Pipe, device). The
//     TCP checksum is left 0 for destinations whose stacks said they do
//     not verify it (SetChecksumsOptional).
//   - outerSide.Write classifies the decrypted packets and delivers them
//     through GRO on the caller's goroutine (no input pump), one copy into
//     gVisor's buffers. wireguard-go calls it from one goroutine per peer,
//     so deliveries of different peers run concurrently. What it delivers
//     left WireGuard, which authenticated every packet whole (Poly1305), so
//     their TCP and UDP checksums are not verified again: the kernel's
//     WireGuard marks its packets CHECKSUM_UNNECESSARY for the same reason.
//     (The IPv4 header, which gVisor's routing reads, still is.)
//
// Both wait until the Stack's Run (the lifecycle: no packet reaches the
// Handler before Run), as a Pipe's pumps would: what wireguard-go decrypts
// before then is held in its caller, not dropped, and the stack's sends
// stay queued. Stack.Close waits for running deliveries.
//
// Close on either end closes both: Read and Write fail with os.ErrClosed,
// and the stack's sends fail from then on. stackSide serves only New.
func Direct(mtu int) (stackSide, outerSide tun.Device) {
	d := &directShared{
		mtu:      mtu,
		closed:   make(chan struct{}),
		attached: make(chan struct{}),
		started:  make(chan struct{}),
	}
	for i := range d.events {
		d.events[i] = make(chan tun.Event, 1)
		d.events[i] <- tun.EventUp
	}
	return &directStackEnd{d}, &directOuter{d}
}

// directShared is the state of one Direct pair.
type directShared struct {
	mtu      int
	events   [2]chan tun.Event
	once     sync.Once
	closed   chan struct{}
	attached chan struct{} // closed by attach (New)
	started  chan struct{} // closed by start (Run); after attached
	s        *Stack        // set before attached is closed

	// deliverMu is held (read) by every Write delivering into the stack;
	// Stack.Close takes it to wait for them (quiesce).
	deliverMu sync.RWMutex

	// rmu guards the reader's state: outbound items taken off the queue
	// and not yet fully read.
	rmu     sync.Mutex
	pending []*outBuf
	next    int // first pending item not fully read
	seg     int // first segment of pending[next] not read
	spare   []*outBuf
	outDone sync.Once // closes s.outputDone
}

// attach binds s to the pair (New). The stack's link then keeps packets by
// reference for outerSide.Read, with host GSO (New set link.byRef).
func (d *directShared) attach(s *Stack) {
	s.direct = d
	d.s = s
	d.spare = make([]*outBuf, 0, s.cfg.QueueLen)
	close(d.attached)
}

// start lets the reader and writers in (Stack.Run, once).
func (d *directShared) start() { close(d.started) }

// stack waits for the attached Stack's Run; nil once the pair is closed.
func (d *directShared) stack() *Stack {
	select {
	case <-d.started:
		select {
		case <-d.closed:
			return nil
		default:
			return d.s
		}
	case <-d.closed:
		return nil
	}
}

func (d *directShared) close() {
	d.once.Do(func() {
		close(d.closed)
		for _, ev := range d.events {
			close(ev)
		}
		select {
		case <-d.attached:
		default:
			return
		}
		// Sends fail from now on instead of filling a queue nobody reads;
		// what is queued is released.
		q := &d.s.link.q
		q.close()
		q.mu.Lock()
		items := q.items
		q.items, q.used = nil, 0
		q.mu.Unlock()
		for _, b := range items {
			d.s.link.putBuf(b)
		}
		d.rmu.Lock()
		d.releasePending()
		d.rmu.Unlock()
		d.finishOutput()
	})
}

// finishOutput tells Stack.Close that the outward queue is flushed.
func (d *directShared) finishOutput() {
	d.outDone.Do(func() { close(d.s.outputDone) })
}

// flushedOnClose ends the flush at once when nothing is left to read after
// the queue closed: a reader that is not there (no device yet) would
// otherwise hold Stack.Close for the flush timeout.
func (d *directShared) flushedOnClose() {
	d.rmu.Lock()
	defer d.rmu.Unlock()
	q := &d.s.link.q
	q.mu.Lock()
	empty := len(q.items) == 0
	q.mu.Unlock()
	if empty && d.next == len(d.pending) {
		d.finishOutput()
	}
}

// quiesce waits for running deliveries; Stack.Close calls it after setting
// closing, so no new delivery starts.
func (d *directShared) quiesce() {
	d.deliverMu.Lock()
	d.deliverMu.Unlock() //nolint:staticcheck // an empty critical section: waiting is the point
}

// releasePending drops the reader's unread items. d.rmu must be held.
func (d *directShared) releasePending() {
	for i := d.next; i < len(d.pending); i++ {
		d.s.link.putBuf(d.pending[i])
		d.pending[i] = nil
	}
	d.pending, d.next, d.seg = nil, 0, 0
}

// directStackEnd is the placeholder New recognises; the Stack's Close
// closes the pair through it.
type directStackEnd struct{ d *directShared }

func (e *directStackEnd) File() *os.File { return nil }

// Read blocks until the pair closes: the stack side is never read.
func (e *directStackEnd) Read([][]byte, []int, int) (int, error) {
	<-e.d.closed
	return 0, os.ErrClosed
}

func (e *directStackEnd) Write([][]byte, int) (int, error) {
	return 0, errors.New("netstack: the stack side of Direct is only for New")
}
func (e *directStackEnd) MTU() (int, error)        { return e.d.mtu, nil }
func (e *directStackEnd) Name() (string, error)    { return "direct-stack", nil }
func (e *directStackEnd) Events() <-chan tun.Event { return e.d.events[0] }
func (e *directStackEnd) BatchSize() int           { return pipeBatchSize }
func (e *directStackEnd) Close() error {
	e.d.close()
	return nil
}

// directOuter is the tun.Device wireguard-go drives.
type directOuter struct{ d *directShared }

func (o *directOuter) File() *os.File           { return nil }
func (o *directOuter) MTU() (int, error)        { return o.d.mtu, nil }
func (o *directOuter) Name() (string, error)    { return "direct", nil }
func (o *directOuter) Events() <-chan tun.Event { return o.d.events[1] }
func (o *directOuter) BatchSize() int           { return pipeBatchSize }
func (o *directOuter) Close() error {
	o.d.close()
	return nil
}

// Read implements tun.Device: it fills bufs (at offset) with the stack's
// next outbound packets, segmenting GSO packets, and blocks while there are
// none.
func (o *directOuter) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	d := o.d
	s := d.stack()
	if s == nil {
		return 0, os.ErrClosed
	}
	q := &s.link.q
	for {
		n, open := d.fill(bufs, sizes, offset)
		if n > 0 {
			return n, nil
		}
		if !open {
			// Flushed after Stack.Close; the pair closes next.
			d.finishOutput()
			<-d.closed
			return 0, os.ErrClosed
		}
		select {
		case <-q.wake:
		case <-d.closed:
			return 0, os.ErrClosed
		}
	}
}

// fill reads as many packets as fit into bufs without blocking. open is
// false once the queue is closed and empty.
func (d *directShared) fill(bufs [][]byte, sizes []int, offset int) (n int, open bool) {
	d.rmu.Lock()
	defer d.rmu.Unlock()
	select {
	case <-d.closed:
		return 0, false
	default:
	}
	s := d.s
	var bytes uint64
	for n < len(bufs) {
		if d.next == len(d.pending) {
			if d.pending != nil {
				clear(d.pending)
				d.spare = d.pending[:0]
			}
			d.pending, d.next, d.seg = nil, 0, 0
			items, ok := s.link.q.takeNow(d.spare)
			if len(items) == 0 {
				open = ok
				break
			}
			d.pending = items
		}
		b := d.pending[d.next]
		k, done := s.link.readOut(b, d.seg, bufs[n:], sizes[n:], offset)
		for _, sz := range sizes[n : n+k] {
			bytes += uint64(sz)
		}
		n += k
		d.seg += k
		if done {
			s.link.putBuf(b)
			d.pending[d.next] = nil
			d.next++
			d.seg = 0
		}
		open = true
	}
	if n > 0 {
		s.stats.writeBatches.Add(1)
		s.stats.packetsOut.Add(uint64(n))
		s.stats.bytesOut.Add(bytes)
	}
	return n, open
}

// takeNow swaps out what is queued without waiting (Direct's reader; no
// output pump runs then). ok is false once the queue is closed and empty.
func (q *outQueue) takeNow(spare []*outBuf) (items []*outBuf, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 {
		return nil, !q.closed
	}
	items, q.items = q.items, spare[:0]
	q.used = 0
	q.notFull.Broadcast()
	return items, true
}

// Write implements tun.Device: it delivers bufs (packets at offset) to the
// stack on the caller's goroutine. Packets longer than the MTU are dropped
// (counted in ReadErrors) and reported with ErrPacketTooBig, as by a Pipe.
func (o *directOuter) Write(bufs [][]byte, offset int) (int, error) {
	d := o.d
	s := d.stack()
	if s == nil {
		return 0, os.ErrClosed
	}
	d.deliverMu.RLock()
	defer d.deliverMu.RUnlock()
	if s.closing.Load() {
		return 0, os.ErrClosed
	}
	tooBig := s.deliverBatch(bufs, offset)
	if tooBig > 0 {
		s.stats.readErrors.Add(uint64(tooBig))
		return len(bufs) - tooBig, fmt.Errorf("%d of %d packets dropped: %w", tooBig, len(bufs), ErrPacketTooBig)
	}
	return len(bufs), nil
}

// directInput is one delivery's scratch state, pooled: Writes of several
// peers run at once.
type directInput struct {
	g    gro.GRO
	cd   countingDispatcher
	info packetInfo
}

var directInputs = sync.Pool{New: func() any {
	in := &directInput{}
	in.g.Init(groEnabled)
	return in
}}

// deliverBatch is runInput's loop body for packets in the caller's buffers:
// each packet for gVisor is copied into a gVisor view. It returns how many
// packets exceeded the MTU.
func (s *Stack) deliverBatch(bufs [][]byte, offset int) (tooBig int) {
	disp := s.link.getDispatcher()
	if disp == nil {
		return 0
	}
	in := directInputs.Get().(*directInput)
	in.cd.NetworkDispatcher, in.cd.n = disp, 0
	in.g.Dispatcher = &in.cd
	var bytesIn uint64
	for _, b := range bufs {
		pkt := b[offset:]
		if len(pkt) > s.cfg.MTU {
			tooBig++
			continue
		}
		bytesIn += uint64(len(pkt))
		classifyTrusting(pkt, &in.info, true) // authenticated: see Direct
		if !s.admitInput(&in.info) {
			continue
		}
		if in.info.packet != nil {
			pkt = in.info.packet // trimmed to the IP length
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: inboundBuffer(pkt, &in.info, nil)})
		pb.NetworkProtocolNumber = in.info.proto
		pb.RXChecksumValidated = in.info.tcpChecked
		in.g.Enqueue(pb)
		pb.DecRef()
	}
	flushGRO(&in.g, &in.cd)
	s.stats.readBatches.Add(1)
	s.stats.packetsIn.Add(uint64(len(bufs) - tooBig))
	s.stats.bytesIn.Add(bytesIn)
	s.stats.groDelivered.Add(in.cd.n)
	in.cd.NetworkDispatcher, in.g.Dispatcher = nil, nil
	in.info = packetInfo{}
	directInputs.Put(in)
	return tooBig
}

// writeRef queues pkt by reference (Direct): outerSide.Read copies it out.
// TCP packets may be GSO packets of up to 64 KiB; anything else must fit the
// MTU.
func (e *linkEndpoint) writeRef(pkt *stack.PacketBuffer) tcpip.Error {
	size := pkt.Size()
	if size > int(e.mtu) && !isTCPGSO(pkt) {
		e.stats.oversize.Add(1)
		return &tcpip.ErrMessageTooLong{}
	}
	b := e.refPool.Get().(*outBuf)
	b.pkt = pkt.IncRef()
	b.n = size
	b.slots = e.slotsFor(size) // a GSO packet: its size in queue units
	if e.acks != nil && pkt.TransportProtocolNumber == header.TCPProtocolNumber && e.acks.output(pkt, b) {
		return nil // a request's ACK, waiting for the answer (delack.go)
	}
	if !e.q.push(b) {
		e.putBuf(b)
		return &tcpip.ErrClosedForSend{}
	}
	return nil
}

func isTCPGSO(pkt *stack.PacketBuffer) bool {
	t := pkt.GSOOptions.Type
	return t == stack.GSOTCPv4 || t == stack.GSOTCPv6
}

// maxL34Header bounds the IP and TCP headers of a GSO packet (60 + 60 for
// IPv4; IPv6 extension headers included, gVisor's TCP adds at most one).
const maxL34Header = 256

// readOut copies b's packet into bufs at offset, from segment seg on: one
// packet for a copied buffer or a plain packet, MSS-sized segments for a
// TCP GSO packet (with the TCP checksum gVisor left partial). It returns how
// many bufs it filled and whether b is done. A packet that cannot be cut
// (malformed headers, too big for the caller's buffers) is dropped and
// counted in Oversize.
func (e *linkEndpoint) readOut(b *outBuf, seg int, bufs [][]byte, sizes []int, offset int) (n int, done bool) {
	if b.pkt == nil {
		p := b.packet()
		if len(p) > len(bufs[0])-offset {
			e.stats.oversize.Add(1)
			return 0, true
		}
		sizes[0] = copy(bufs[0][offset:], p)
		return 1, true
	}
	pkt := b.pkt
	if !isTCPGSO(pkt) {
		if b.n > len(bufs[0])-offset {
			e.stats.oversize.Add(1)
			return 0, true
		}
		var c viewCursor
		c.start(pkt)
		sizes[0] = c.read(bufs[0][offset : offset+b.n])
		return 1, true
	}
	l3 := len(pkt.NetworkHeader().Slice())
	hl := l3 + len(pkt.TransportHeader().Slice())
	data := b.n - hl
	mss := int(pkt.GSOOptions.MSS)
	if mss <= 0 || data <= mss {
		mss = max(data, 1)
	}
	if hl > maxL34Header || l3 < header.IPv4MinimumSize || hl-l3 < header.TCPMinimumSize || hl+mss > int(e.mtu) && data > mss {
		e.stats.oversize.Add(1)
		return 0, true
	}
	nseg := max((data+mss-1)/mss, 1)
	fill := e.checksumWanted(pkt)
	var hdr [maxL34Header]byte
	var c viewCursor
	c.start(pkt)
	c.read(hdr[:hl])
	c.skip(seg * mss)
	for ; seg < nseg && n < len(bufs); seg++ {
		plen := min(mss, data-seg*mss)
		dst := bufs[n][offset:]
		if hl+plen > len(dst) {
			e.stats.oversize.Add(1)
			return n, true
		}
		dst = dst[:hl+plen]
		copy(dst, hdr[:hl])
		c.read(dst[hl:])
		finishSegment(dst, l3, seg, nseg, mss, fill)
		sizes[n] = len(dst)
		n++
	}
	return n, seg == nseg
}

// finishSegment fixes the headers of segment seg of nseg in p (the IP and
// TCP headers of the GSO packet, then this segment's payload): lengths, the
// IPv4 ID and header checksum, the sequence number, the flags only the
// first (CWR) or the last (FIN, PSH) segment keeps, and the TCP checksum,
// or 0 there unless fill.
func finishSegment(p []byte, l3, seg, nseg, mss int, fill bool) {
	tcp := p[l3:]
	var src, dst []byte
	if p[0]>>4 == 4 {
		ihl := int(p[0]&0x0f) * 4
		binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
		if seg > 0 {
			binary.BigEndian.PutUint16(p[4:6], binary.BigEndian.Uint16(p[4:6])+uint16(seg))
		}
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:12], ^checksum.Checksum(p[:ihl], 0))
		src, dst = p[12:16], p[16:20]
	} else {
		binary.BigEndian.PutUint16(p[4:6], uint16(len(p)-header.IPv6MinimumSize))
		src, dst = p[8:24], p[24:40]
	}
	if seg > 0 {
		seq := binary.BigEndian.Uint32(tcp[4:8])
		binary.BigEndian.PutUint32(tcp[4:8], seq+uint32(seg*mss))
		tcp[tcpFlagsOffset] &^= uint8(header.TCPFlagCwr)
	}
	if seg < nseg-1 {
		tcp[tcpFlagsOffset] &^= uint8(header.TCPFlagFin | header.TCPFlagPsh)
	}
	tcp[16], tcp[17] = 0, 0
	if fill {
		binary.BigEndian.PutUint16(tcp[16:18], ^l4Checksum(header.TCPProtocolNumber, src, dst, tcp))
	}
}

// SetChecksumsOptional tells a Direct pair's reader which destinations'
// stacks do not verify the TCP checksums of what the tunnel carries (a
// natbox peer that said so: see Direct): the segments it cuts from gVisor's
// GSO packets for them leave the checksum 0 instead of summing every
// payload byte. nil (the default) fills every one. Other links ignore it.
func (s *Stack) SetChecksumsOptional(dsts []netip.Prefix) {
	if len(dsts) == 0 {
		s.link.unchecked.Store(nil)
		return
	}
	dsts = slices.Clone(dsts)
	s.link.unchecked.Store(&dsts)
}

// checksumWanted reports whether pkt's destination verifies TCP checksums.
func (e *linkEndpoint) checksumWanted(pkt *stack.PacketBuffer) bool {
	dsts := e.unchecked.Load()
	if dsts == nil {
		return true
	}
	var dst netip.Addr
	switch h := pkt.NetworkHeader().Slice(); {
	case len(h) >= header.IPv4MinimumSize && h[0]>>4 == 4:
		dst = netip.AddrFrom4([4]byte(h[16:20]))
	case len(h) >= header.IPv6MinimumSize && h[0]>>4 == 6:
		dst = netip.AddrFrom16([16]byte(h[24:40]))
	default:
		return true
	}
	for _, p := range *dsts {
		if p.Contains(dst) {
			return false
		}
	}
	return true
}

// viewCursor reads a PacketBuffer's bytes (headers, then data) in order.
type viewCursor struct {
	v   *buffer.View
	off int // into v's slice
}

func (c *viewCursor) start(pkt *stack.PacketBuffer) {
	vl, off := pkt.AsViewList()
	c.v, c.off = vl.Front(), off
}

// read copies the next len(dst) bytes (fewer if the packet ends) into dst.
func (c *viewCursor) read(dst []byte) int {
	w := 0
	for w < len(dst) && c.v != nil {
		s := c.v.AsSlice()
		if c.off >= len(s) {
			c.v, c.off = c.v.Next(), c.off-len(s)
			continue
		}
		k := copy(dst[w:], s[c.off:])
		w += k
		c.off += k
	}
	return w
}

// skip advances by n bytes.
func (c *viewCursor) skip(n int) {
	for n > 0 && c.v != nil {
		s := c.v.AsSlice()
		if rest := len(s) - c.off; n < rest {
			c.off += n
			return
		} else {
			n -= rest
		}
		c.v, c.off = c.v.Next(), 0
	}
}
