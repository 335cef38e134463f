package forwarder

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// PROXY protocol headers (haproxy's proxy-protocol.txt) that tell a target
// the real client address. src is the client, dst the public address it
// reached. Both come from one inbound flow, so they share a family except
// when one arrives IPv4-mapped; then both are written as IPv6.

// proxyV2Sig is the v2 signature: \r\n\r\n\0\r\nQUIT\n.
var proxyV2Sig = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

const (
	proxyV2VersionProxy = 0x21 // version 2, command PROXY
	proxyV2TCP4         = 0x11 // AF_INET, STREAM
	proxyV2UDP4         = 0x12 // AF_INET, DGRAM
	proxyV2TCP6         = 0x21 // AF_INET6, STREAM
	proxyV2UDP6         = 0x22 // AF_INET6, DGRAM
)

// proxyAddrs unmaps both addresses when both are IPv4 (v4 reports true) and
// otherwise returns both as 16-byte IPv6 addresses.
func proxyAddrs(src, dst netip.AddrPort) (s, d netip.Addr, v4 bool) {
	s, d = src.Addr().Unmap().WithZone(""), dst.Addr().Unmap().WithZone("")
	if s.Is4() && d.Is4() {
		return s, d, true
	}
	return netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16()), false
}

// appendProxyV1 appends a v1 (text) header for a TCP connection.
func appendProxyV1(b []byte, src, dst netip.AddrPort) []byte {
	s, d, v4 := proxyAddrs(src, dst)
	b = append(b, "PROXY TCP6 "...)
	if v4 {
		b[len(b)-2] = '4'
	}
	b = s.AppendTo(b)
	b = append(b, ' ')
	b = d.AppendTo(b)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, '\r', '\n')
}

// appendProxyV2 appends a v2 (binary) PROXY header; udp selects DGRAM.
func appendProxyV2(b []byte, udp bool, src, dst netip.AddrPort) []byte {
	s, d, v4 := proxyAddrs(src, dst)
	b = append(b, proxyV2Sig[:]...)
	b = append(b, proxyV2VersionProxy)
	switch {
	case v4 && !udp:
		b = append(b, proxyV2TCP4, 0, 12)
	case v4 && udp:
		b = append(b, proxyV2UDP4, 0, 12)
	case !udp:
		b = append(b, proxyV2TCP6, 0, 36)
	default:
		b = append(b, proxyV2UDP6, 0, 36)
	}
	b = append(b, s.AsSlice()...)
	b = append(b, d.AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}
