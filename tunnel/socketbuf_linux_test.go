package tunnel_test

import (
	"net"

	"golang.org/x/sys/unix"
)

// roomyBuffers gives a test socket 4 MiB each way, past net.core.[rw]mem_max
// where the test may (root), so a loaded host does not drop at the test's
// own sockets what the test did not mean to lose.
func roomyBuffers(c *net.UDPConn) {
	c.SetReadBuffer(4 << 20)
	c.SetWriteBuffer(4 << 20)
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4<<20)
		})
	}
}
