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
