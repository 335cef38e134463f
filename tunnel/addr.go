package tunnel

import (
	"net/netip"
)

// ControlPort is the TCP port of the relay's control server, reachable only
// inside the tunnel on the relay's tunnel addresses (IPv4 and derived IPv6).
const ControlPort uint16 = 7

// ula6Prefix is the /64 from which each side's IPv6 tunnel address is
// derived: the prefix, then the IPv4 tunnel address as the last 32 bits.
// "fd6e:6174:626f:78" spells "natbox" in ASCII after the fd ULA marker.
var ula6Prefix = netip.MustParsePrefix("fd6e:6174:626f:7800::/64")

// TunnelAddr6 returns the IPv6 tunnel address derived from an IPv4 tunnel
// address: fd6e:6174:626f:7800::a.b.c.d. It returns the zero Addr when v4 is
// not an IPv4 address.
func TunnelAddr6(v4 netip.Addr) netip.Addr {
	v4 = v4.Unmap()
	if !v4.Is4() {
		return netip.Addr{}
	}
	b := ula6Prefix.Addr().As16()
	a4 := v4.As4()
	copy(b[12:], a4[:])
	return netip.AddrFrom16(b)
}

// TunnelPrefixes returns the host prefixes of one side's tunnel addresses:
// v4/32 and TunnelAddr6(v4)/128. They are a relay peer's WireGuard allowed
// IPs, and the addresses cmd assigns to that side's netstack.
func TunnelPrefixes(v4 netip.Addr) []netip.Prefix {
	v4 = v4.Unmap()
	return []netip.Prefix{netip.PrefixFrom(v4, 32), netip.PrefixFrom(TunnelAddr6(v4), 128)}
}

// tunnelAddrFor returns the tunnel address of a side (given by its IPv4
// address) in the family of client: an IPv6 client must be originated toward
// an IPv6 destination.
func tunnelAddrFor(v4, client netip.Addr) netip.Addr {
	if client.Unmap().Is6() {
		return TunnelAddr6(v4)
	}
	return v4.Unmap()
}
