package app

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/natbox/natbox/admin"
)

// tunTxQueueLen is the kernel's queue of packets waiting for natbox to read
// them from the TUN. The kernel's default for a TUN, 500, overflowed while
// natbox forwarded UDP at 1 Gbit/s (2-4 % of datagrams dropped before natbox
// saw them); with 2000 three runs dropped 0.0-1.7 % (BENCHMARKS.md). At
// 1 Gbit/s a full queue is about 20 ms of traffic, bounded.
const tunTxQueueLen = 2000

// tunLink brings the TUN link up with its MTU and installs the kernel routes
// that send public traffic into it. undo removes exactly the routes it added,
// so a route the operator installed by hand survives natbox's exit.
func tunLink(name string, mtu int, routes []netip.Prefix) (undo func() error, err error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find TUN link %q: %w", name, err)
	}
	if err := netlink.LinkSetMTU(link, mtu); err != nil {
		return nil, fmt.Errorf("set MTU %d on %s: %w", mtu, name, err)
	}
	if err := netlink.LinkSetTxQLen(link, tunTxQueueLen); err != nil {
		return nil, fmt.Errorf("set txqueuelen %d on %s: %w", tunTxQueueLen, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("bring %s up: %w", name, err)
	}
	var added []*netlink.Route
	undo = func() error {
		var errs []error
		for _, r := range added {
			if err := netlink.RouteDel(r); err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, syscall.ENODEV) {
				errs = append(errs, fmt.Errorf("remove route %s dev %s: %w", r.Dst, name, err))
			}
		}
		added = nil
		return errors.Join(errs...)
	}
	for _, p := range routes {
		r := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())},
			Scope:     netlink.SCOPE_LINK,
		}
		if err := netlink.RouteAdd(r); err != nil {
			if errors.Is(err, syscall.EEXIST) {
				// Already there (the operator's or a previous run's): use it, leave it.
				continue
			}
			_ = undo()
			return nil, fmt.Errorf("add route %s dev %s: %w", p, name, err)
		}
		added = append(added, r)
	}
	return undo, nil
}

// tunStatus reads the kernel's counters of the TUN link, seen from natbox:
// what the kernel handed natbox is "in".
func tunStatus(name string) (admin.TUN, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return admin.TUN{Name: name}, fmt.Errorf("find TUN link %q: %w", name, err)
	}
	at := link.Attrs()
	st := admin.TUN{
		Name:       name,
		Up:         at.Flags&net.FlagUp != 0,
		MTU:        at.MTU,
		TxQueueLen: at.TxQLen,
	}
	if s := at.Statistics; s != nil {
		st.PacketsIn, st.BytesIn = s.TxPackets, s.TxBytes
		st.PacketsOut, st.BytesOut = s.RxPackets, s.RxBytes
		st.DroppedIn = s.TxDropped
	}
	return st, nil
}
