package testutil

import "syscall"

// SmallSocketBuffers is a net.ListenConfig / net.Dialer Control that makes
// a kernel socket's buffers as small as Linux allows, so a reader that
// stops backs up into natbox instead of the kernel.
func SmallSocketBuffers(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		if serr == nil {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096)
		}
	})
	if err != nil {
		return err
	}
	return serr
}
