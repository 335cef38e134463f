package tunnel

import (
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// kernelPathMTU is the kernel's path MTU toward dst (the first hop's, or
// less once a router said so), read from a connected UDP socket that sends
// nothing; 0 when it cannot be read.
func kernelPathMTU(dst netip.AddrPort) int {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
	if err != nil {
		return 0
	}
	defer c.Close()
	raw, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	level, opt := unix.IPPROTO_IP, unix.IP_MTU
	if dst.Addr().Is6() {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_MTU
	}
	mtu := 0
	raw.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), level, opt); err == nil {
			mtu = v
		}
	})
	return mtu
}
