//go:build !linux

package rawsock

import (
	"net"
	"net/netip"
	"sync"
	"syscall"
)

// Reader is Linux's only; elsewhere a conn reads through its own Read.
type Reader struct{}

// NewReader is nil off Linux: use the conn's own Read.
func NewReader(net.Conn) *Reader { return nil }

// Read is never called on a nil Reader.
func (*Reader) Read([]byte) (int, error) { panic("rawsock: Reader off Linux") }

// PacketReader reads through the conn's own ReadMsgUDPAddrPort off Linux.
type PacketReader struct{ c *net.UDPConn }

// NewPacketReader is a PacketReader of c.
func NewPacketReader(c *net.UDPConn) (*PacketReader, error) { return &PacketReader{c: c}, nil }

// ReadFrom reads one datagram into p, as on Linux but without the spill: a
// longer one is cut (truncated).
func (r *PacketReader) ReadFrom(p []byte, _ *sync.Pool) (dgram []byte, big *[]byte, truncated bool, from netip.AddrPort, err error) {
	n, _, flags, from, err := r.c.ReadMsgUDPAddrPort(p, nil)
	return p[:n], nil, err == nil && flags&syscall.MSG_TRUNC != 0, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), err
}

// PacketWriter sends through the conn's own WriteToUDPAddrPort off Linux.
type PacketWriter struct{ c *net.UDPConn }

// NewPacketWriter is a PacketWriter of c.
func NewPacketWriter(c *net.UDPConn) (*PacketWriter, error) { return &PacketWriter{c: c}, nil }

// NewBatchConn is c's BatchConn: x/net's PacketConn off Linux.
func NewBatchConn(c *net.UDPConn) BatchConn { return xnetBatchConn(c) }

// WriteTo sends p to dst as one datagram.
func (w *PacketWriter) WriteTo(p []byte, dst netip.AddrPort) error {
	_, err := w.c.WriteToUDPAddrPort(p, dst)
	return err
}
