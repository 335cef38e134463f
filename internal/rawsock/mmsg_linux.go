package rawsock

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Batch sends and receives x/net's messages (ipv4.Message and
// ipv6.Message are the same type) on a UDP socket with one raw
// recvmmsg(2) or sendmmsg(2), as ipv6.PacketConn's ReadBatch and
// WriteBatch do through syscall.Syscall. It keeps the headers, iovecs and
// addresses between calls; one goroutine uses a Batch at a time.
type Batch struct {
	rc     syscall.RawConn
	v6     bool // the socket's family: the addresses it takes and gives
	hdrs   []unix.Mmsghdr
	iovs   []unix.Iovec
	names  []unix.RawSockaddrInet6 // room for either family
	n      int
	errno  error
	recvFn func(fd uintptr) bool // bound once: a call allocates nothing
	sendFn func(fd uintptr) bool
}

// NewBatch is a Batch on the UDP socket rc, of the family v6 says.
func NewBatch(rc syscall.RawConn, v6 bool) *Batch {
	b := &Batch{rc: rc, v6: v6}
	b.recvFn, b.sendFn = b.recv, b.send
	return b
}

// NewBatchConn is c's BatchConn: a Batch of the socket's family.
func NewBatchConn(c *net.UDPConn) BatchConn {
	rc, err := c.SyscallConn()
	if err != nil {
		return xnetBatchConn(c)
	}
	return NewBatch(rc, isV6(c))
}

// ReadBatch is Recv with x/net's signature (flags unused).
func (b *Batch) ReadBatch(msgs []ipv6.Message, _ int) (int, error) { return b.Recv(msgs) }

// WriteBatch is Send with x/net's signature (flags unused).
func (b *Batch) WriteBatch(msgs []ipv6.Message, _ int) (int, error) { return b.Send(msgs) }

// ready lays out headers for msgs: their buffers, their control room, and
// an address room each (filled from msg.Addr when send is set).
func (b *Batch) ready(msgs []ipv6.Message, send bool) error {
	if cap(b.hdrs) < len(msgs) {
		b.hdrs = make([]unix.Mmsghdr, len(msgs))
		b.names = make([]unix.RawSockaddrInet6, len(msgs))
	}
	b.hdrs, b.names = b.hdrs[:len(msgs)], b.names[:len(msgs)]
	iovs := 0
	for i := range msgs {
		iovs += len(msgs[i].Buffers)
	}
	if cap(b.iovs) < iovs {
		b.iovs = make([]unix.Iovec, iovs)
	}
	b.iovs = b.iovs[:iovs]
	iov := b.iovs
	for i := range msgs {
		m, h := &msgs[i], &b.hdrs[i]
		*h = unix.Mmsghdr{}
		k := 0
		for _, buf := range m.Buffers {
			if len(buf) == 0 {
				continue
			}
			iov[k] = unix.Iovec{Base: &buf[0]}
			iov[k].SetLen(len(buf))
			k++
		}
		if k > 0 {
			h.Hdr.Iov = &iov[0]
			h.Hdr.SetIovlen(k)
		}
		iov = iov[k:]
		if len(m.OOB) > 0 {
			h.Hdr.Control = &m.OOB[0]
			h.Hdr.SetControllen(len(m.OOB))
		}
		name := &b.names[i]
		h.Hdr.Name = (*byte)(unsafe.Pointer(name))
		h.Hdr.Namelen = unix.SizeofSockaddrInet6
		if !send {
			continue
		}
		if m.Addr == nil {
			h.Hdr.Name, h.Hdr.Namelen = nil, 0 // a connected socket
			continue
		}
		ua, ok := m.Addr.(*net.UDPAddr)
		if !ok {
			return &net.AddrError{Err: "not a UDP address", Addr: m.Addr.String()}
		}
		namelen, err := b.putAddr(name, ua)
		if err != nil {
			return err
		}
		h.Hdr.Namelen = namelen
	}
	return nil
}

// putAddr writes ua as the socket family's sockaddr into name.
func (b *Batch) putAddr(name *unix.RawSockaddrInet6, ua *net.UDPAddr) (uint32, error) {
	ip, ok := netip.AddrFromSlice(ua.IP)
	if !ok {
		return 0, &net.AddrError{Err: "not an IP address", Addr: ua.String()}
	}
	return putAddrPort(name, netip.AddrPortFrom(ip.WithZone(ua.Zone), uint16(ua.Port)), b.v6)
}

// putAddrPort writes ap into name as the sockaddr of a socket of the
// family v6 says: an IPv4 address as itself or, on an IPv6 socket, mapped;
// a zone as its interface index.
func putAddrPort(name *unix.RawSockaddrInet6, ap netip.AddrPort, v6 bool) (uint32, error) {
	port := (*[2]byte)(unsafe.Pointer(&name.Port))
	binary.BigEndian.PutUint16(port[:], ap.Port())
	ip := ap.Addr()
	if !v6 {
		if !ip.Unmap().Is4() {
			return 0, &net.AddrError{Err: "not an IPv4 address", Addr: ap.String()}
		}
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(name))
		sa.Family = unix.AF_INET
		sa.Addr = ip.Unmap().As4()
		sa.Zero = [8]uint8{}
		return unix.SizeofSockaddrInet4, nil
	}
	name.Family = unix.AF_INET6
	name.Flowinfo = 0
	name.Addr = ip.As16()
	name.Scope_id = 0
	if zone := ip.Zone(); zone != "" {
		if i, err := strconv.Atoi(zone); err == nil {
			name.Scope_id = uint32(i)
		} else if ifi, err := net.InterfaceByName(zone); err == nil {
			name.Scope_id = uint32(ifi.Index)
		}
	}
	return unix.SizeofSockaddrInet6, nil
}

// addr is the UDP address a received sockaddr holds (nil for another
// family): an IPv4 one as 4 bytes, as x/net gives it (a 4in6 address would
// send the answer to the IPv6 socket), a scope as its interface index.
func addr(name *unix.RawSockaddrInet6) *net.UDPAddr {
	ap := sockaddrAddrPort(name)
	if !ap.IsValid() {
		return nil
	}
	return net.UDPAddrFromAddrPort(ap)
}

// Recv reads what the socket holds, up to len(msgs) datagrams, waiting
// until it holds one. Each message read gets N, NN, Flags and Addr, as
// ReadBatch sets them.
func (b *Batch) Recv(msgs []ipv6.Message) (int, error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	b.ready(msgs, false)
	b.n, b.errno = 0, nil
	if err := b.rc.Read(b.recvFn); err != nil {
		return 0, err
	}
	if b.errno != nil {
		return 0, os.NewSyscallError("recvmmsg", b.errno)
	}
	for i := range msgs[:b.n] {
		h := &b.hdrs[i]
		m := &msgs[i]
		m.N, m.NN, m.Flags = int(h.Len), int(h.Hdr.Controllen), int(h.Hdr.Flags)
		m.Addr = addr(&b.names[i])
	}
	return b.n, nil
}

func (b *Batch) recv(fd uintptr) bool { return b.mmsg(unix.SYS_RECVMMSG, fd) }

// mmsg is one raw recvmmsg(2) or sendmmsg(2) (trap) of b's headers, the
// RawConn callback of Recv and Send: false (EAGAIN) waits in the netpoller.
func (b *Batch) mmsg(trap, fd uintptr) bool {
	n, e := call(trap, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(len(b.hdrs)), 0, 0, 0)
	switch e {
	case 0:
		b.n = int(n)
	case unix.EAGAIN:
		return false
	default:
		b.errno = e
	}
	return true
}

// Send sends msgs, as many as the socket takes at once (at least one, or
// an error), waiting for room; it returns how many went.
func (b *Batch) Send(msgs []ipv6.Message) (int, error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	if err := b.ready(msgs, true); err != nil {
		return 0, err
	}
	b.n, b.errno = 0, nil
	if err := b.rc.Write(b.sendFn); err != nil {
		return 0, err
	}
	if b.errno != nil {
		return 0, os.NewSyscallError("sendmmsg", b.errno)
	}
	for i := range msgs[:b.n] {
		msgs[i].N = int(b.hdrs[i].Len)
	}
	return b.n, nil
}

func (b *Batch) send(fd uintptr) bool { return b.mmsg(unix.SYS_SENDMMSG, fd) }
