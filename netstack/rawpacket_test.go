package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// rawTCP4 builds an IPv4 TCP segment without options or payload.
func rawTCP4(src, dst netip.AddrPort, seq, ack uint32, flags header.TCPFlags) []byte {
	b := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)),
		TTL:         64,
		Protocol:    uint8(header.TCPProtocolNumber),
		SrcAddr:     tcpip.AddrFrom4(src.Addr().As4()),
		DstAddr:     tcpip.AddrFrom4(dst.Addr().As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	tcp := header.TCP(b[header.IPv4MinimumSize:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    src.Port(),
		DstPort:    dst.Port(),
		SeqNum:     seq,
		AckNum:     ack,
		DataOffset: header.TCPMinimumSize,
		Flags:      flags,
		WindowSize: 65535,
	})
	s, d := src.Addr().As4(), dst.Addr().As4()
	binary.BigEndian.PutUint16(tcp[16:18], ^l4Checksum(header.TCPProtocolNumber, s[:], d[:], tcp))
	return b
}

// rawTCP6 builds an IPv6 TCP segment without options or payload.
func rawTCP6(src, dst netip.AddrPort, seq, ack uint32, flags header.TCPFlags) []byte {
	b := make([]byte, header.IPv6MinimumSize+header.TCPMinimumSize)
	header.IPv6(b).Encode(&header.IPv6Fields{
		PayloadLength:     header.TCPMinimumSize,
		TransportProtocol: header.TCPProtocolNumber,
		HopLimit:          64,
		SrcAddr:           tcpip.AddrFrom16(src.Addr().As16()),
		DstAddr:           tcpip.AddrFrom16(dst.Addr().As16()),
	})
	tcp := header.TCP(b[header.IPv6MinimumSize:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    src.Port(),
		DstPort:    dst.Port(),
		SeqNum:     seq,
		AckNum:     ack,
		DataOffset: header.TCPMinimumSize,
		Flags:      flags,
		WindowSize: 65535,
	})
	s, d := src.Addr().As16(), dst.Addr().As16()
	binary.BigEndian.PutUint16(tcp[16:18], ^l4Checksum(header.TCPProtocolNumber, s[:], d[:], tcp))
	return b
}

// rawTCP builds an IPv4 or IPv6 TCP segment, by src's family.
func rawTCP(src, dst netip.AddrPort, seq, ack uint32, flags header.TCPFlags) []byte {
	if src.Addr().Is4() {
		return rawTCP4(src, dst, seq, ack, flags)
	}
	return rawTCP6(src, dst, seq, ack, flags)
}

// rawUDP builds a UDP datagram with buildUDP.
func rawUDP(src, dst netip.AddrPort, payload []byte) []byte {
	b := make([]byte, udpPacketLen(src.Addr().Is4(), len(payload)))
	buildUDP(b, src, dst, payload)
	return b
}

// withIPv4Options returns the IPv4 packet p with 4 bytes of NOP options
// added to its header (checksums recomputed, the TCP one unchanged).
func withIPv4Options(p []byte) []byte {
	hl := int(p[0]&0x0f) * 4
	b := make([]byte, 0, len(p)+4)
	b = append(b, p[:hl]...)
	b = append(b, 1, 1, 1, 1)
	b = append(b, p[hl:]...)
	b[0] = 0x40 | byte((hl+4)/4)
	ip := header.IPv4(b)
	ip.SetTotalLength(uint16(len(b)))
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())
	return b
}

// withIPv6DestOpts returns the IPv6 packet p with an 8-byte destination
// options header (PadN) before its transport header.
func withIPv6DestOpts(p []byte) []byte {
	b := make([]byte, 0, len(p)+8)
	b = append(b, p[:header.IPv6MinimumSize]...)
	b = append(b, p[6], 0, 1, 4, 0, 0, 0, 0) // next header, length 0, PadN(4)
	b = append(b, p[header.IPv6MinimumSize:]...)
	b[6] = ipv6DestOpts
	binary.BigEndian.PutUint16(b[4:6], uint16(len(b)-header.IPv6MinimumSize))
	return b
}

// ipv4Fragments splits the IPv4 packet p (no options) into two fragments,
// the first carrying 8 bytes of its payload.
func ipv4Fragments(p []byte, id uint16) [][]byte {
	payload := p[header.IPv4MinimumSize:]
	frag := func(off int, data []byte, more bool) []byte {
		b := append(append([]byte(nil), p[:header.IPv4MinimumSize]...), data...)
		ip := header.IPv4(b)
		ip.SetTotalLength(uint16(len(b)))
		ip.SetID(id)
		flags := uint8(0)
		if more {
			flags = header.IPv4FlagMoreFragments
		}
		ip.SetFlagsFragmentOffset(flags, uint16(off))
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		return b
	}
	return [][]byte{frag(0, payload[:8], true), frag(8, payload[8:], false)}
}

// corruptTCP flips a bit of the TCP checksum of packet p (no options,
// no extension headers).
func corruptTCP(p []byte) []byte {
	b := append([]byte(nil), p...)
	off := header.IPv6MinimumSize
	if b[0]>>4 == 4 {
		off = header.IPv4MinimumSize
	}
	b[off+16] ^= 0x01
	return b
}
