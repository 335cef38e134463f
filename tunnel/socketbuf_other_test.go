//go:build !linux

package tunnel_test

import "net"

// roomyBuffers gives a test socket 4 MiB each way where the host allows.
func roomyBuffers(c *net.UDPConn) {
	c.SetReadBuffer(4 << 20)
	c.SetWriteBuffer(4 << 20)
}
