package tunnel

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// onLinkMTU is the MTU of the one link between here and dst when dst is on
// this host or on a directly attached network (no router in between, so
// that link's MTU is the path's), read from a connected UDP socket that
// sends nothing; 0 for a routed destination or when it cannot be read.
func onLinkMTU(dst netip.AddrPort) int {
	routes, err := netlink.RouteGet(dst.Addr().AsSlice())
	if err != nil || len(routes) == 0 || routes[0].Gw != nil || routes[0].Via != nil {
		return 0
	}
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
