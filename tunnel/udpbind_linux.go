package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/natbox/natbox/internal/rawsock"
)

// newUDPBind returns the conn.Bind of the tunnel's UDP sockets. On Linux it
// is udpBind, natbox's own; elsewhere wireguard-go's standard bind.
func newUDPBind() conn.Bind { return &udpBind{} }

// udpBind is conn.StdNetBind's sockets with natbox's batch: IPv4 and IPv6
// on one port, 7 MiB socket buffers, sticky source addresses (IP_PKTINFO:
// a multi-homed relay answers from the address a peer wrote to), UDP GSO
// on send and GRO on receive. What it does differently (tunnel/BENCH.md,
// "own bind"):
//   - its batch is deviceBatch, and plain reads go into wireguard-go's
//     buffers themselves: no adapter, and nothing resets 128 messages per
//     call (the standard bind's cost on a paced WAN line, where a call
//     returns one or two datagrams);
//   - a GSO send gives the kernel each packet as an iovec of one message
//     instead of copying the packets into one buffer first;
//   - a receive reads datagrams straight into wireguard-go's buffers;
//     only the segments of a GRO-coalesced datagram move (receiver).
type udpBind struct {
	mu    sync.RWMutex
	socks []*udpSocket // [IPv4, IPv6] while open, nil entries for a family the host lacks; nil when closed
}

// The sizes the kernel holds to (include/linux/udp.h, UDP_MAX_SEGMENTS;
// the largest UDP payload of an IPv4 packet and of an IPv6 one).
const (
	maxGSOSegments = 64
	maxUDPPayload4 = 1<<16 - 1 - 20 - 8
	maxUDPPayload6 = 1<<16 - 1 - 8
	// tunnelSocketBuffer: conn.StdNetBind's, set with SO_*BUFFORCE where
	// CAP_NET_ADMIN allows going past net.core.[rw]mem_max.
	tunnelSocketBuffer = 7 << 20
)

// controlSize holds what a message carries besides its data: the sticky
// source (IPv6's pktinfo is the larger) and a segment size (UDP_GRO's int
// received, UDP_SEGMENT's uint16 sent).
var controlSize = unix.CmsgSpace(unix.SizeofInet6Pktinfo) + unix.CmsgSpace(4)

// udpSocket is one family's socket.
type udpSocket struct {
	conn  *net.UDPConn
	rc    syscall.RawConn // recvmmsg and sendmmsg go through it raw (internal/rawsock)
	v6    bool
	gro   bool        // UDP_GRO on: a read may return coalesced datagrams
	gso   atomic.Bool // UDP_SEGMENT works; cleared when the kernel refuses it (EIO)
	sends sync.Pool   // *sendBatch
}

func (b *udpBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.socks != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	var v4, v6 *udpSocket
	actual := int(port)
	for tries := 0; ; tries++ {
		var err error
		v4, actual, err = listenUDP("udp4", int(port))
		if err != nil && !errors.Is(err, syscall.EAFNOSUPPORT) {
			return nil, 0, err
		}
		// IPv6 on the port IPv4 got; when the OS picked one, IPv6 may have
		// it taken: pick again (as conn.StdNetBind does).
		v6, actual, err = listenUDP("udp6", actual)
		if port == 0 && errors.Is(err, syscall.EADDRINUSE) && tries < 100 {
			v4.close()
			continue
		}
		if err != nil && !errors.Is(err, syscall.EAFNOSUPPORT) {
			v4.close()
			return nil, 0, err
		}
		break
	}
	if v4 == nil && v6 == nil {
		return nil, 0, syscall.EAFNOSUPPORT
	}
	b.socks = []*udpSocket{v4, v6}
	var fns []conn.ReceiveFunc
	for _, s := range b.socks {
		if s != nil {
			fns = append(fns, newReceiver(s).receive)
		}
	}
	return fns, uint16(actual), nil
}

// listenUDP opens network's socket on port; it returns the port it got, or
// port and the error.
func listenUDP(network string, port int) (*udpSocket, int, error) {
	s := &udpSocket{v6: network == "udp6"}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		cerr := c.Control(func(fd uintptr) {
			f := int(fd)
			for _, opt := range []int{unix.SO_RCVBUF, unix.SO_SNDBUF, unix.SO_RCVBUFFORCE, unix.SO_SNDBUFFORCE} {
				_ = unix.SetsockoptInt(f, unix.SOL_SOCKET, opt, tunnelSocketBuffer) // best effort, as the standard bind
			}
			if s.v6 {
				if err = unix.SetsockoptInt(f, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1); err == nil {
					err = unix.SetsockoptInt(f, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
				}
			} else {
				err = unix.SetsockoptInt(f, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
			}
			s.gro = unix.SetsockoptInt(f, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
			_, serr := unix.GetsockoptInt(f, unix.IPPROTO_UDP, unix.UDP_SEGMENT)
			s.gso.Store(serr == nil)
		})
		return errors.Join(cerr, err)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, ":"+strconv.Itoa(port))
	if err != nil {
		return nil, port, err
	}
	s.conn = pc.(*net.UDPConn)
	if s.rc, err = s.conn.SyscallConn(); err != nil {
		s.conn.Close()
		return nil, port, err
	}
	s.sends.New = func() any { return &sendBatch{raw: rawsock.NewBatch(s.rc, s.v6)} }
	return s, s.conn.LocalAddr().(*net.UDPAddr).Port, nil
}

func (s *udpSocket) close() error {
	if s == nil {
		return nil
	}
	return s.conn.Close()
}

func (b *udpBind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	for _, s := range b.socks {
		errs = append(errs, s.close())
	}
	b.socks = nil
	return errors.Join(errs...)
}

func (b *udpBind) SetMark(mark uint32) error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, s := range b.socks {
		if s == nil {
			continue
		}
		rc, err := s.conn.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return serr
		}
	}
	return nil
}

func (b *udpBind) BatchSize() int { return deviceBatch }

func (b *udpBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &udpEndpoint{dst: ap}, nil
}

// udpEndpoint is a peer's address and, once the peer wrote to us, the
// local address and interface it wrote to: sends go out from there.
type udpEndpoint struct {
	dst     netip.AddrPort
	src     netip.Addr // invalid: routing picks the source
	ifindex int32
}

func (e *udpEndpoint) ClearSrc()           { e.src, e.ifindex = netip.Addr{}, 0 }
func (e *udpEndpoint) SrcToString() string { return addrString(e.src) }
func (e *udpEndpoint) DstToString() string { return e.dst.String() }
func (e *udpEndpoint) DstIP() netip.Addr   { return e.dst.Addr() }
func (e *udpEndpoint) SrcIP() netip.Addr   { return e.src }

func (e *udpEndpoint) DstToBytes() []byte {
	b, _ := e.dst.MarshalBinary()
	return b
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// socketFor is the open socket for dst's family.
func (b *udpBind) socketFor(dst netip.Addr) (*udpSocket, error) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.socks == nil {
		return nil, net.ErrClosed
	}
	s := b.socks[0]
	if dst.Is6() {
		s = b.socks[1]
	}
	if s == nil {
		return nil, syscall.EAFNOSUPPORT
	}
	return s, nil
}

func (b *udpBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	e, ok := ep.(*udpEndpoint)
	if !ok {
		return conn.ErrWrongEndpointType
	}
	s, err := b.socketFor(e.dst.Addr())
	if err != nil {
		return err
	}
	sb := s.sends.Get().(*sendBatch)
	defer s.sends.Put(sb)
	sb.setAddr(e.dst)
	var tooBig error
	for len(bufs) > 0 {
		gso := s.gso.Load()
		n, used := sb.pack(bufs, e, s.v6, gso)
		sent, err := sb.write(n)
		sb.reset(n)
		if err != nil && gso && errors.Is(err, unix.EIO) {
			// The route's device cannot checksum segments (the standard
			// bind's fallback too): send the rest datagram by datagram.
			s.gso.Store(false)
			bufs = bufs[sb.bufsIn(sent):]
			continue
		}
		if err != nil && errors.Is(err, unix.EMSGSIZE) {
			// A datagram larger than the route takes (a path MTU probe,
			// whose loss is its answer) fails alone: the rest of the
			// batch, and what shared its GSO run, still goes. The error
			// is still reported, as wireguard-go logs it.
			tooBig = err
			at := sb.bufsIn(sent)
			run := bufs[at : at+sb.counts[sent]]
			for i := range run {
				n, _ := sb.pack(run[i:i+1], e, s.v6, false)
				_, err := sb.write(n)
				sb.reset(n)
				if err != nil && !errors.Is(err, unix.EMSGSIZE) {
					return err
				}
			}
			bufs = bufs[at+len(run):]
			continue
		}
		if err != nil {
			return err
		}
		bufs = bufs[used:]
	}
	return tooBig
}

// write sends sb's first n messages, all of them unless an error stops it;
// it returns how many messages went.
func (sb *sendBatch) write(n int) (int, error) {
	msgs := sb.msgs[:n]
	sent := 0
	for sent < len(msgs) {
		n, err := sb.raw.Send(msgs[sent:])
		if err != nil {
			return sent, err
		}
		sent += n
	}
	return sent, nil
}

// sendBatch is one Send's messages (pooled per socket: wireguard-go sends
// from several goroutines at once).
type sendBatch struct {
	raw    *rawsock.Batch
	msgs   []ipv6.Message
	counts []int // bufs per message, for bufsIn
	addr   net.UDPAddr
	ip     [16]byte
	src    []byte // the sticky source's control message, built once per pack
}

func (sb *sendBatch) setAddr(dst netip.AddrPort) {
	a := dst.Addr()
	if a.Is4() {
		v := a.As4()
		sb.addr.IP = append(sb.ip[:0], v[:]...)
	} else {
		v := a.As16()
		sb.addr.IP = append(sb.ip[:0], v[:]...)
	}
	sb.addr.Port = int(dst.Port())
}

// pack lays bufs out in messages from the front: with gso, runs of equal
// sizes (a shorter one may end a run) up to the kernel's limits share one
// message, one iovec each, cut by the kernel at the run's size; without,
// one datagram each. It returns how many messages it filled and how many
// bufs they carry.
func (sb *sendBatch) pack(bufs [][]byte, e *udpEndpoint, v6, gso bool) (msgs, used int) {
	if sb.src == nil {
		sb.src = make([]byte, 0, controlSize)
	}
	sb.src = appendPktinfo(sb.src[:0], e, v6)
	maxPayload := maxUDPPayload4
	if v6 {
		maxPayload = maxUDPPayload6
	}
	for used < len(bufs) {
		if msgs == len(sb.msgs) {
			sb.msgs = append(sb.msgs, ipv6.Message{OOB: make([]byte, 0, controlSize)})
			sb.counts = append(sb.counts, 0)
		}
		m := &sb.msgs[msgs]
		m.Addr = &sb.addr
		m.OOB = append(m.OOB[:0], sb.src...)
		size := len(bufs[used])
		m.Buffers = append(m.Buffers[:0], bufs[used])
		total, k := size, 1
		for gso && used+k < len(bufs) && k < maxGSOSegments {
			next := len(bufs[used+k])
			if next > size || next == 0 || total+next > maxPayload {
				break
			}
			m.Buffers = append(m.Buffers, bufs[used+k])
			total += next
			k++
			if next < size {
				break // a shorter datagram ends the run
			}
		}
		if k > 1 {
			m.OOB = appendSegmentSize(m.OOB, uint16(size))
		}
		sb.counts[msgs] = k
		used += k
		msgs++
	}
	return msgs, used
}

// bufsIn is how many bufs the first n messages of the last pack carried.
func (sb *sendBatch) bufsIn(n int) int {
	k := 0
	for _, c := range sb.counts[:n] {
		k += c
	}
	return k
}

// reset drops the first n messages' references to wireguard-go's buffers.
func (sb *sendBatch) reset(n int) {
	for i := range sb.msgs[:n] {
		m := &sb.msgs[i]
		clear(m.Buffers)
		m.Buffers, m.OOB, m.Addr, m.N, m.NN, m.Flags = m.Buffers[:0], m.OOB[:0], nil, 0, 0, 0
	}
}

// appendCmsg appends one control message to b, within b's capacity (the
// callers size it with controlSize). The header is written in place as
// the kernel lays it out (unix.Cmsghdr: its Len differs by word size).
func appendCmsg(b []byte, level, typ int32, data []byte) []byte {
	off, space := len(b), unix.CmsgSpace(len(data))
	if cap(b)-off < space {
		return b
	}
	b = b[:off+space]
	clear(b[off:])
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[off]))
	h.Level, h.Type = level, typ
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[off+unix.CmsgLen(0):], data)
	return b
}

// appendPktinfo asks for e's sticky source, when it has one.
func appendPktinfo(b []byte, e *udpEndpoint, v6 bool) []byte {
	src := e.src
	if !src.IsValid() || src.Is6() != v6 {
		return b
	}
	if v6 {
		var info [unix.SizeofInet6Pktinfo]byte // Addr [16]byte, Ifindex uint32
		a := src.As16()
		copy(info[:16], a[:])
		binary.NativeEndian.PutUint32(info[16:], uint32(e.ifindex))
		return appendCmsg(b, unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, info[:])
	}
	var info [unix.SizeofInet4Pktinfo]byte // Ifindex int32, Spec_dst, Addr [4]byte
	binary.NativeEndian.PutUint32(info[0:4], uint32(e.ifindex))
	a := src.As4()
	copy(info[4:8], a[:])
	return appendCmsg(b, unix.IPPROTO_IP, unix.IP_PKTINFO, info[:])
}

func appendSegmentSize(b []byte, size uint16) []byte {
	var v [2]byte
	binary.NativeEndian.PutUint16(v[:], size)
	return appendCmsg(b, unix.IPPROTO_UDP, unix.UDP_SEGMENT, v[:])
}

// parseControl reads a received message's control data: the local address
// and interface the datagram came to, and the segment size of a
// coalesced one (0: one datagram).
func parseControl(oob []byte) (src netip.Addr, ifindex int32, segment int) {
	for len(oob) >= unix.SizeofCmsghdr {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return
		}
		oob = rest
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			ifindex = int32(binary.NativeEndian.Uint32(data[0:4]))
			src = netip.AddrFrom4([4]byte(data[4:8])) // ipi_spec_dst
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			src = netip.AddrFrom16([16]byte(data[:16]))
			ifindex = int32(binary.NativeEndian.Uint32(data[16:20]))
		case h.Level == unix.IPPROTO_UDP && h.Type == unix.UDP_GRO && len(data) >= 2:
			if len(data) >= 4 {
				segment = int(binary.NativeEndian.Uint32(data[:4]))
			} else {
				segment = int(binary.NativeEndian.Uint16(data[:2]))
			}
		}
	}
	return
}

// receiver is one ReceiveFunc's state; wireguard-go calls each from one
// goroutine. It reads in one of two ways:
//   - plain: up to plainMessages datagrams straight into the caller's
//     buffers (no copy). A GRO-coalesced datagram that arrives
//     anyway lands whole in one buffer; its segments move to the buffers
//     after it, and what does not fit spills to the next calls.
//   - landing, once coalesced datagrams arrive: up to groLanding of them
//     into the receiver's own 64 KiB buffers, each segment copied into a
//     caller's buffer (as the standard bind does). Coalesced datagrams
//     cannot go to the caller's buffers without filling all 64 KiB of
//     each, which wireguard-go's pooled buffers would then keep resident
//     (measured: +11-22 % peak RSS in RelayTCPThroughput / RelayTCP4Flows).
//     After plainAfter reads without a coalesced datagram, plain again.
type receiver struct {
	s        *udpSocket
	raw      *rawsock.Batch
	msgs     []ipv6.Message
	segs     []segment // per message of the last plain read
	landing  bool
	plainRun int                // landing reads in a row without a coalesced datagram
	land     [groLanding][]byte // allocated on the first landing read
	pending  pending
}

const (
	groLanding = 2
	plainAfter = 8
	// plainMessages is the most datagrams a plain read takes. 32 (the
	// whole batch) moved more on a 20 ms line, but in 6 of 21 four-flow
	// repetitions it settled at half or a tenth of the rate for the rest
	// of the run; 8 (0 of 9) and 2 (0 of 15) never did, and 8 moved a
	// little more than 2 (tunnel/BENCH.md, change 10). The likely cause,
	// gVisor's GRO leaving packets of flows that share a bucket behind, is
	// mended since (flushGRO, change 13); 32 then still retransmitted in
	// one run of three, so 8 stays.
	plainMessages = 8
)

// segment is where message i's datagrams go: count of them, size each (the
// last may be shorter), from index first of the caller's buffers.
type segment struct {
	count, size, first int
	ep                 *udpEndpoint
}

// pending holds datagrams read but not yet handed over, in order: slices of
// the landing buffers, or of copies (a plain read's overflow).
type pending struct {
	copies []byte
	dgrams [][]byte
	eps    []*udpEndpoint
	next   int
}

func newReceiver(s *udpSocket) *receiver {
	r := &receiver{s: s, raw: rawsock.NewBatch(s.rc, s.v6), msgs: make([]ipv6.Message, plainMessages), segs: make([]segment, plainMessages)}
	for i := range r.msgs {
		r.msgs[i].Buffers = make([][]byte, 1)
		r.msgs[i].OOB = make([]byte, controlSize)
	}
	return r
}

func (r *receiver) receive(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	if r.pending.left() {
		return r.pending.handOver(bufs, sizes, eps), nil
	}
	if r.landing {
		return r.receiveLanding(bufs, sizes, eps)
	}
	msgs := r.read(bufs[:min(len(bufs), plainMessages)])
	n, err := r.raw.Recv(msgs)
	if err != nil || n == 0 {
		return 0, err
	}
	total, most := 0, 1
	for i := range msgs[:n] {
		count, size, ep := parseMessage(&msgs[i])
		r.segs[i] = segment{count: count, size: size, first: total, ep: ep}
		total += count
		most = max(most, count)
	}
	if most > 1 {
		r.landing, r.plainRun = true, 0
	}
	r.place(bufs, sizes, eps, n)
	return min(total, len(bufs)), nil
}

// read readies one message per buffer of bufs.
func (r *receiver) read(bufs [][]byte) []ipv6.Message {
	msgs := r.msgs[:len(bufs)]
	for i := range msgs {
		msgs[i].Buffers[0] = bufs[i]
		msgs[i].OOB = msgs[i].OOB[:cap(msgs[i].OOB)]
	}
	return msgs
}

// parseMessage reads a received message's datagrams: how many, of what
// size (the last may be shorter), and their endpoint. It drops the
// message's references.
func parseMessage(msg *ipv6.Message) (count, size int, ep *udpEndpoint) {
	src, ifindex, size := parseControl(msg.OOB[:msg.NN])
	count = 1
	if size > 0 && msg.N > size {
		count = (msg.N + size - 1) / size
	} else {
		size = msg.N
	}
	ep = &udpEndpoint{src: src, ifindex: ifindex}
	if ua, ok := msg.Addr.(*net.UDPAddr); ok {
		ep.dst = ua.AddrPort()
	}
	msg.Buffers[0], msg.Addr = nil, nil
	return count, size, ep
}

func (r *receiver) receiveLanding(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	for i := range r.land {
		if r.land[i] == nil {
			r.land[i] = make([]byte, maxUDPPayload6)
		}
	}
	msgs := r.read(r.land[:])
	n, err := r.raw.Recv(msgs)
	if err != nil || n == 0 {
		return 0, err
	}
	r.pending.reset(0)
	coalesced := false
	for i := range msgs[:n] {
		count, size, ep := parseMessage(&msgs[i])
		coalesced = coalesced || count > 1
		whole := r.land[i][:msgs[i].N]
		for k := range count {
			r.pending.add(whole[k*size:min((k+1)*size, len(whole))], ep)
		}
	}
	if coalesced {
		r.plainRun = 0
	} else if r.plainRun++; r.plainRun >= plainAfter {
		r.landing = false
	}
	return r.pending.handOver(bufs, sizes, eps), nil
}

// place moves the datagrams of a plain read's first n messages to their
// buffers: each message landed whole in the caller's buffer of its own
// index, and its datagrams go to their place in order from there
// (segment.first), the ones past the caller's buffers to pending. Going
// from the last message back, a buffer is written only once what it held
// has moved: message i's place is at or after index i.
func (r *receiver) place(bufs [][]byte, sizes []int, eps []conn.Endpoint, n int) {
	last := r.segs[n-1]
	if over := last.first + last.count - len(bufs); over > 0 {
		// A capacity hint: a slice taken before copies grows keeps its bytes.
		r.pending.reset(over * last.size)
		r.pending.dgrams = append(r.pending.dgrams, make([][]byte, over)...)
		r.pending.eps = append(r.pending.eps, make([]*udpEndpoint, over)...)
	}
	for i := n - 1; i >= 0; i-- {
		sg := r.segs[i]
		whole := bufs[i][:r.msgs[i].N]
		for k := sg.count - 1; k >= 0; k-- {
			d := whole[k*sg.size : min((k+1)*sg.size, len(whole))]
			switch at := sg.first + k; {
			case at >= len(bufs):
				r.pending.put(at-len(bufs), d, sg.ep)
			case at == i && k == 0:
				sizes[at], eps[at] = len(d), sg.ep // already in place
			default:
				sizes[at], eps[at] = copy(bufs[at], d), sg.ep
			}
		}
	}
}

func (p *pending) left() bool { return p.next < len(p.dgrams) }

// reset empties p, with room for copies of up to n bytes.
func (p *pending) reset(n int) {
	clear(p.dgrams)
	clear(p.eps)
	p.dgrams, p.eps, p.next = p.dgrams[:0], p.eps[:0], 0
	if cap(p.copies) < n {
		p.copies = make([]byte, 0, n)
	}
	p.copies = p.copies[:0]
}

// add appends d, which stays where it is until handed over.
func (p *pending) add(d []byte, ep *udpEndpoint) {
	p.dgrams = append(p.dgrams, d)
	p.eps = append(p.eps, ep)
}

// put copies d in as datagram i of those reset made room for.
func (p *pending) put(i int, d []byte, ep *udpEndpoint) {
	off := len(p.copies)
	p.copies = append(p.copies, d...)
	p.dgrams[i], p.eps[i] = p.copies[off:len(p.copies):len(p.copies)], ep
}

// handOver copies pending datagrams, in order, into the caller's buffers.
func (p *pending) handOver(bufs [][]byte, sizes []int, eps []conn.Endpoint) int {
	k := 0
	for ; k < len(bufs) && p.left(); k++ {
		sizes[k] = copy(bufs[k], p.dgrams[p.next])
		eps[k] = p.eps[p.next]
		p.dgrams[p.next], p.eps[p.next] = nil, nil
		p.next++
	}
	if !p.left() && cap(p.copies) > copiesKeep {
		p.copies = nil // a burst's overflow is not kept
	}
	return k
}

// copiesKeep is the overflow capacity kept between reads: one coalesced
// datagram's worth.
const copiesKeep = 64 << 10
