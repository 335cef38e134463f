package rawsock

import (
	"net"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// BatchConn sends and receives batches of datagrams with x/net's
// signatures (ipv4.Message and ipv6.Message are one type): on Linux a
// Batch, raw recvmmsg(2) and sendmmsg(2); elsewhere, or for a socket that
// offers no RawConn, x/net's PacketConn of the socket's family.
type BatchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// xnetBatchConn is x/net's PacketConn of c's family.
func xnetBatchConn(c *net.UDPConn) BatchConn {
	if isV6(c) {
		return ipv6.NewPacketConn(c)
	}
	return ipv4.NewPacketConn(c)
}

// isV6 reports whether c is an IPv6 socket: the net package gives an IPv4
// socket's local address as 4 bytes.
func isV6(c *net.UDPConn) bool { return !c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Is4() }
