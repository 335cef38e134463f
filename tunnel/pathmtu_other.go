//go:build !linux

package tunnel

import "net/netip"

// onLinkMTU is unknown off Linux: the uplink probes only over the TCP
// transport there.
func onLinkMTU(netip.AddrPort) int { return 0 }
