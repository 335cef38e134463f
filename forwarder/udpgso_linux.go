package forwarder

import (
	"encoding/binary"
	"net"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/natbox/natbox/internal/rawsock"
)

// udpGSO: Linux sends a run of datagrams as one buffer with UDP_SEGMENT
// (since 4.18; an older kernel refuses it and the writer falls back).
const udpGSO = true

// appendUDPSegment appends a UDP_SEGMENT control message carrying size, the
// size of each datagram the kernel cuts the buffer into.
func appendUDPSegment(b []byte, size uint16) []byte {
	n := len(b)
	b = append(b, make([]byte, unix.CmsgSpace(2))...)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[n]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[n+unix.CmsgLen(0):], size)
	return b
}

// rawBatchConn sends a batch with one raw sendmmsg(2): a datagram that
// wakes an idle natbox wakes no sysmon thread too (internal/rawsock).
type rawBatchConn struct{ b *rawsock.Batch }

func (c rawBatchConn) WriteBatch(ms []ipv4.Message, _ int) (int, error) { return c.b.Send(ms) }

// newBatchConn is the batchConn of conn, a socket of the family v4 says.
func newBatchConn(conn *net.UDPConn, v4 bool) batchConn {
	rc, err := conn.SyscallConn()
	if err != nil {
		return xnetBatchConn(conn, v4)
	}
	return rawBatchConn{rawsock.NewBatch(rc, !v4)}
}
