package rawsock

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PacketReader reads a UDP socket one datagram at a time with raw
// recvfrom(2)s, waiting in the netpoller and honouring the socket's read
// deadline, as the conn's ReadMsgUDPAddrPort does. One goroutine reads at a
// time; a read allocates nothing.
type PacketReader struct {
	c       *net.UDPConn
	rc      syscall.RawConn
	p       []byte
	n       int
	from    unix.RawSockaddrInet6 // room for either family
	fromLen uint32
	err     error
	read    func(fd uintptr) bool // r.step, bound once
}

// NewPacketReader is a PacketReader of c.
func NewPacketReader(c *net.UDPConn) (*PacketReader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &PacketReader{c: c, rc: rc}
	r.read = r.step
	return r, nil
}

// ReadFrom reads one datagram into p, waiting until one is queued: the
// bytes it put in p, whether the datagram was longer than p (the rest is
// lost, as with MSG_TRUNC), and its sender, with an IPv4 sender as a
// 4-byte address. Errors read as the conn's would: a *net.OpError "read",
// whose deadline error is a timeout and whose closed conn is net.ErrClosed.
func (r *PacketReader) ReadFrom(p []byte) (n int, truncated bool, from netip.AddrPort, err error) {
	r.p, r.n, r.err = p, 0, nil
	err = asOp(r.rc.Read(r.read), "read")
	r.p = nil
	switch {
	case err != nil:
		return 0, false, netip.AddrPort{}, err
	case r.err != nil:
		return 0, false, netip.AddrPort{}, &net.OpError{Op: "read", Net: "udp", Source: r.c.LocalAddr(), Err: os.NewSyscallError("recvfrom", r.err)}
	}
	n = min(r.n, len(p))
	return n, r.n > len(p), sockaddrAddrPort(&r.from), nil
}

// step is ReadFrom's RawConn callback: one recvfrom(2) with MSG_TRUNC, so
// that it returns the datagram's whole length; false (EAGAIN) waits.
func (r *PacketReader) step(fd uintptr) bool {
	var ptr unsafe.Pointer
	if len(r.p) > 0 {
		ptr = unsafe.Pointer(&r.p[0])
	}
	r.fromLen = unix.SizeofSockaddrInet6
	n, e := call(unix.SYS_RECVFROM, fd, uintptr(ptr), uintptr(len(r.p)), unix.MSG_TRUNC,
		uintptr(unsafe.Pointer(&r.from)), uintptr(unsafe.Pointer(&r.fromLen)))
	switch e {
	case 0:
		r.n = int(n)
	case unix.EAGAIN:
		return false
	default:
		r.err = e
	}
	return true
}

// sockaddrAddrPort is the address and port a received sockaddr holds
// (the zero AddrPort for another family); an IPv6 scope is kept as its
// interface index.
func sockaddrAddrPort(name *unix.RawSockaddrInet6) netip.AddrPort {
	port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&name.Port))[:])
	switch name.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(name))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port)
	case unix.AF_INET6:
		ip := netip.AddrFrom16(name.Addr)
		if name.Scope_id != 0 {
			ip = ip.WithZone(strconv.FormatUint(uint64(name.Scope_id), 10))
		}
		return netip.AddrPortFrom(ip, port)
	}
	return netip.AddrPort{}
}

// PacketWriter sends datagrams on a UDP socket with raw sendto(2)s,
// waiting in the netpoller for room and honouring the write deadline.
// Unlike a Batch, any number of goroutines may send at once.
type PacketWriter struct {
	c    *net.UDPConn
	rc   syscall.RawConn
	v6   bool // the socket's family
	pool sync.Pool
}

// sendTo is the state of one WriteTo, pooled so that a send allocates
// nothing.
type sendTo struct {
	p       []byte
	name    unix.RawSockaddrInet6
	namelen uint32
	err     error
	send    func(fd uintptr) bool // s.step, bound once
}

// NewPacketWriter is a PacketWriter of c.
func NewPacketWriter(c *net.UDPConn) (*PacketWriter, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	w := &PacketWriter{c: c, rc: rc, v6: isV6(c)}
	w.pool.New = func() any { s := &sendTo{}; s.send = s.step; return s }
	return w, nil
}

// WriteTo sends p to dst as one datagram. Errors read as the conn's
// WriteToUDPAddrPort would put them (a *net.OpError "write").
func (w *PacketWriter) WriteTo(p []byte, dst netip.AddrPort) error {
	s := w.pool.Get().(*sendTo)
	defer w.pool.Put(s)
	namelen, err := putAddrPort(&s.name, dst, w.v6)
	if err != nil {
		return &net.OpError{Op: "write", Net: "udp", Source: w.c.LocalAddr(), Err: err}
	}
	s.p, s.namelen, s.err = p, namelen, nil
	err = asOp(w.rc.Write(s.send), "write")
	s.p = nil
	switch {
	case err != nil:
		return err
	case s.err != nil:
		return &net.OpError{Op: "write", Net: "udp", Source: w.c.LocalAddr(), Addr: net.UDPAddrFromAddrPort(dst), Err: os.NewSyscallError("sendto", s.err)}
	}
	return nil
}

// step is WriteTo's RawConn callback: false (EAGAIN) waits for room.
func (s *sendTo) step(fd uintptr) bool {
	var ptr unsafe.Pointer
	if len(s.p) > 0 {
		ptr = unsafe.Pointer(&s.p[0])
	}
	switch _, e := call(unix.SYS_SENDTO, fd, uintptr(ptr), uintptr(len(s.p)), 0,
		uintptr(unsafe.Pointer(&s.name)), uintptr(s.namelen)); e {
	case 0:
	case unix.EAGAIN:
		return false
	default:
		s.err = e
	}
	return true
}
