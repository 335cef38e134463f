//go:build !linux

package forwarder

import "net"

// udpGSO: no UDP GSO here; runs go out with one send per datagram.
const udpGSO = false

func appendUDPSegment(b []byte, size uint16) []byte { return b }

// newBatchConn is the batchConn of conn, a socket of the family v4 says.
func newBatchConn(conn *net.UDPConn, v4 bool) batchConn { return xnetBatchConn(conn, v4) }
