package tunnel

import (
	"net/netip"

	"github.com/vishvananda/netlink"
)

// onLinkMTU is the MTU of the one link between here and dst when dst is on
// this host or on a directly attached network (no router in between, so
// that link's MTU is the path's): the route's own MTU if it sets one, else
// its interface's. 0 for a routed destination or when the kernel cannot
// say. (Not the socket's IP_MTU: emulators such as qemu-user lack it.)
func onLinkMTU(dst netip.AddrPort) int {
	routes, err := netlink.RouteGet(dst.Addr().AsSlice())
	if err != nil || len(routes) == 0 || routes[0].Gw != nil || routes[0].Via != nil {
		return 0
	}
	if routes[0].MTU > 0 {
		return routes[0].MTU
	}
	link, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return 0
	}
	return link.Attrs().MTU
}
