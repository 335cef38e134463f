//go:build !linux

package tunnel

import "net/netip"

// kernelPathMTU is unknown off Linux: the uplink probes only over the TCP
// transport there.
func kernelPathMTU(netip.AddrPort) int { return 0 }
