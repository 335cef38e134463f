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
// recvmsg(2)s, waiting in the netpoller and honouring the socket's read
// deadline, as the conn's ReadMsgUDPAddrPort does. One goroutine reads at a
// time; a read allocates nothing.
type PacketReader struct {
	c     *net.UDPConn
	rc    syscall.RawConn
	p     []byte
	spill *sync.Pool
	big   *[]byte // the spill buffer of the read in progress
	n     int
	from  unix.RawSockaddrInet6 // room for either family
	iov   [2]unix.Iovec
	msg   unix.Msghdr
	err   error
	read  func(fd uintptr) bool // r.step, bound once
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

// ReadFrom reads one datagram, waiting until one is queued, and returns it
// and its sender, with an IPv4 sender as a 4-byte address. It is read into
// p when it fits. A longer one is read whole, the part past p into a
// buffer taken from spill (a pool of *[]byte) only for the system call, so
// a reader that waits pins nothing more than p, at the offset it has in
// the datagram; p's part is copied in front, the datagram returned there,
// and big is that buffer, which the caller puts back. A datagram longer than that too (or than p, with a nil spill)
// is cut, and truncated says so. Errors read as the conn's would: a
// *net.OpError "read", whose deadline error is a timeout and whose closed
// conn is net.ErrClosed.
func (r *PacketReader) ReadFrom(p []byte, spill *sync.Pool) (dgram []byte, big *[]byte, truncated bool, from netip.AddrPort, err error) {
	r.p, r.spill, r.n, r.err = p, spill, 0, nil
	err = asOp(r.rc.Read(r.read), "read")
	r.p, r.spill = nil, nil
	switch {
	case err != nil:
		return nil, nil, false, netip.AddrPort{}, err
	case r.err != nil:
		return nil, nil, false, netip.AddrPort{}, &net.OpError{Op: "read", Net: "udp", Source: r.c.LocalAddr(), Err: os.NewSyscallError("recvmsg", r.err)}
	}
	from = sockaddrAddrPort(&r.from)
	if r.big == nil {
		n := min(r.n, len(p))
		return p[:n], nil, r.n > n, from, nil
	}
	big, r.big = r.big, nil
	b := *big
	n := min(r.n, len(b)) // the spill took b[len(p):]: n <= len(b)
	copy(b, p)
	return b[:n], big, r.n > n, from, nil
}

// step is ReadFrom's RawConn callback: one recvmsg(2) with MSG_TRUNC, so
// that it returns the datagram's whole length; false (EAGAIN) waits.
func (r *PacketReader) step(fd uintptr) bool {
	iovs := r.iov[:0]
	if len(r.p) > 0 {
		r.iov[0].Base = &r.p[0]
		r.iov[0].SetLen(len(r.p))
		iovs = r.iov[:1]
	}
	if r.spill != nil {
		r.big = r.spill.Get().(*[]byte)
		if tail := (*r.big)[min(len(r.p), len(*r.big)):]; len(tail) > 0 {
			r.iov[len(iovs)].Base = &tail[0]
			r.iov[len(iovs)].SetLen(len(tail))
			iovs = r.iov[:len(iovs)+1]
		}
	}
	r.msg = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&r.from)), Namelen: unix.SizeofSockaddrInet6}
	if len(iovs) > 0 {
		r.msg.Iov = &iovs[0]
		r.msg.SetIovlen(len(iovs))
	}
	n, e := call(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&r.msg)), unix.MSG_TRUNC, 0, 0, 0)
	r.iov, r.msg = [2]unix.Iovec{}, unix.Msghdr{} // keep no pointer into p or the spill
	if e == 0 {
		r.n = int(n)
	} else {
		r.err = e
	}
	if r.big != nil && (e != 0 || r.n <= len(r.p)) {
		r.spill.Put(r.big) // not needed: the datagram fit in p, or none came
		r.big = nil
	}
	if e == unix.EAGAIN {
		r.err = nil
		return false
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
