package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// This file is the input parser: it looks at each raw IP packet read from the
// tun.Device before gVisor does, to take UDP off gVisor's data path and to spot
// the few TCP segments the stack needs help with (see classify). It must never
// panic on any input (FuzzClassify).

// verdict is what the input pump does with a packet.
type verdict uint8

const (
	verdictInject verdict = iota // hand to gVisor (GRO first)
	verdictUDP                   // UDP fast path: Handler.HandleUDP, never gVisor
	verdictDrop                  // malformed; counted by dropReason
)

// dropReason says why the parser dropped a packet; it indexes Stats.Invalid.
type dropReason uint8

const (
	dropNone dropReason = iota
	dropIPHeader
	dropIPChecksum
	dropUDPHeader
	dropUDPChecksum
	dropTCPChecksum
	dropVnetHeader // a vnet TUN frame header classifyFrame cannot honour
	numDropReasons
)

const (
	ipProtoTCP = uint8(header.TCPProtocolNumber)
	ipProtoUDP = uint8(header.UDPProtocolNumber)

	tcpFlagsOffset = 13
	tcpFlagSYN     = uint8(header.TCPFlagSyn)
	tcpFlagACK     = uint8(header.TCPFlagAck)
	tcpFlagRST     = uint8(header.TCPFlagRst)
	tcpFlagFIN     = uint8(header.TCPFlagFin)
)

// packetInfo is the parser's result. The slices alias the packet.
type packetInfo struct {
	verdict verdict
	reason  dropReason
	proto   tcpip.NetworkProtocolNumber
	// packet is the IP packet trimmed to its IP total length.
	packet []byte
	// fragment is set for IP fragments (left to gVisor's reassembly).
	fragment bool

	// UDP fast path (verdictUDP).
	src, dst netip.AddrPort
	payload  []byte

	// l4Trusted: the kernel vouched for the transport checksum (see
	// vnetHdr.l4Trusted), so it was not verified.
	l4Trusted bool

	// TCP facts (verdictInject, tcp true): addresses and ports are those of the
	// segment, flags its TCP flags byte.
	tcp              bool
	tcpChecked       bool // the TCP checksum was verified (valid)
	tcpFlags         uint8
	srcAddr, dstAddr tcpip.Address
	srcPort, dstPort uint16
	tcpSeq, tcpAck   uint32
	tcpPayload       int // payload bytes; -1 if the data offset is bad
}

// pureSYN reports whether the packet is a TCP SYN without ACK or RST: a new
// connection attempt.
func (p *packetInfo) pureSYN() bool {
	return p.tcp && p.tcpFlags&(tcpFlagSYN|tcpFlagACK|tcpFlagRST) == tcpFlagSYN
}

// endpointID is the stack's view of a TCP segment's 4-tuple (local = its
// destination).
func (p *packetInfo) endpointID() stack.TransportEndpointID {
	return stack.TransportEndpointID{
		LocalPort:     p.dstPort,
		LocalAddress:  p.dstAddr,
		RemotePort:    p.srcPort,
		RemoteAddress: p.srcAddr,
	}
}

// rst reports whether the packet is a TCP RST.
func (p *packetInfo) rst() bool { return p.tcp && p.tcpFlags&tcpFlagRST != 0 }

// classify parses one raw IP packet. It validates what gVisor would otherwise
// skip because the link advertises RX checksum offload (see linkEndpoint
// Capabilities; the NIC marks every inbound packet checksum-validated, so
// gVisor checks none): the IPv4 header checksum and the checksum of every
// TCP segment it can find (a forged SYN must not start a dial, a corrupt
// segment must not become data). Packets it does not understand well enough
// (other IPv6 extension headers, fragments, other protocols) go to gVisor
// unchanged; of those, SYNs are checked in synChecksumValid.
func classify(b []byte, p *packetInfo) { classifyTrusting(b, p, false) }

// classifyTrusting is classify with the TCP and UDP checksums taken as
// valid when l4Trusted (the kernel vouched for them; a partial checksum
// would not verify). The IPv4 header checksum is checked regardless.
func classifyTrusting(b []byte, p *packetInfo, l4Trusted bool) {
	*p = packetInfo{l4Trusted: l4Trusted}
	if len(b) == 0 {
		p.verdict, p.reason = verdictDrop, dropIPHeader
		return
	}
	switch b[0] >> 4 {
	case 4:
		classify4(b, p)
	case 6:
		classify6(b, p)
	default:
		p.verdict, p.reason = verdictDrop, dropIPHeader
	}
}

func classify4(b []byte, p *packetInfo) {
	p.proto = header.IPv4ProtocolNumber
	if len(b) < header.IPv4MinimumSize {
		p.verdict, p.reason = verdictDrop, dropIPHeader
		return
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:4]))
	if ihl < header.IPv4MinimumSize || total < ihl || total > len(b) {
		p.verdict, p.reason = verdictDrop, dropIPHeader
		return
	}
	b = b[:total]
	p.packet = b
	if checksum.Checksum(b[:ihl], 0) != 0xffff {
		p.verdict, p.reason = verdictDrop, dropIPChecksum
		return
	}
	if binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 { // MF or offset
		p.fragment = true
		return // gVisor reassembles; the UDP transport handler sees the result
	}
	src := [4]byte(b[12:16])
	dst := [4]byte(b[16:20])
	l4 := b[ihl:]
	switch b[9] {
	case ipProtoUDP:
		// A zero checksum means "none" in IPv4 (RFC 768).
		p.setUDP(netip.AddrFrom4(src), netip.AddrFrom4(dst), src[:], dst[:], l4, true)
	case ipProtoTCP:
		if len(l4) < header.TCPMinimumSize {
			return // gVisor counts it as malformed
		}
		p.checkTCP(tcpip.AddrFrom4(src), tcpip.AddrFrom4(dst), src[:], dst[:], l4)
	}
}

func classify6(b []byte, p *packetInfo) {
	p.proto = header.IPv6ProtocolNumber
	if len(b) < header.IPv6MinimumSize {
		p.verdict, p.reason = verdictDrop, dropIPHeader
		return
	}
	plen := int(binary.BigEndian.Uint16(b[4:6]))
	if plen == 0 {
		return // jumbogram or garbage: gVisor decides
	}
	if header.IPv6MinimumSize+plen > len(b) {
		p.verdict, p.reason = verdictDrop, dropIPHeader
		return
	}
	b = b[:header.IPv6MinimumSize+plen]
	p.packet = b
	src := [16]byte(b[8:24])
	dst := [16]byte(b[24:40])
	l4 := b[header.IPv6MinimumSize:]
	next := b[6]
	if next == ipProtoUDP {
		// The UDP checksum is mandatory over IPv6 (RFC 8200 8.1).
		p.setUDP(netip.AddrFrom16(src), netip.AddrFrom16(dst), src[:], dst[:], l4, false)
		return
	}
	// Skip hop-by-hop and destination options to find TCP; they change
	// neither the final destination nor the checksum. Anything else
	// (routing, fragments, ...) goes to gVisor as it is.
	for next == ipv6HopByHop || next == ipv6DestOpts {
		if len(l4) < 8 {
			p.verdict, p.reason = verdictDrop, dropIPHeader
			return
		}
		n := (int(l4[1]) + 1) * 8
		if n > len(l4) {
			p.verdict, p.reason = verdictDrop, dropIPHeader
			return
		}
		next, l4 = l4[0], l4[n:]
	}
	switch next {
	case ipv6Fragment:
		p.fragment = true
	case ipProtoTCP:
		p.checkTCP(tcpip.AddrFrom16(src), tcpip.AddrFrom16(dst), src[:], dst[:], l4)
	}
}

// IPv6 extension header numbers classify6 knows.
const (
	ipv6HopByHop = 0
	ipv6DestOpts = 60
	ipv6Fragment = 44
)

// checkTCP verifies the TCP segment l4's checksum and records its facts; a
// segment too short for a header is left to gVisor, which drops it.
func (p *packetInfo) checkTCP(src, dst tcpip.Address, srcB, dstB, l4 []byte) {
	if len(l4) < header.TCPMinimumSize {
		return
	}
	if !p.l4Trusted && !l4ChecksumValid(header.TCPProtocolNumber, srcB, dstB, l4) {
		p.verdict, p.reason = verdictDrop, dropTCPChecksum
		return
	}
	p.tcpChecked = true // verified, or vouched for by the kernel
	p.setTCP(src, dst, l4)
}

// setUDP classifies the UDP datagram l4 between src and dst (srcB and dstB
// are the same addresses as bytes, for the checksum): its header and length
// must be sound and its checksum valid, or absent when zeroAllowed (IPv4).
func (p *packetInfo) setUDP(src, dst netip.Addr, srcB, dstB, l4 []byte, zeroAllowed bool) {
	if len(l4) < header.UDPMinimumSize {
		p.verdict, p.reason = verdictDrop, dropUDPHeader
		return
	}
	ulen := int(binary.BigEndian.Uint16(l4[4:6]))
	if ulen < header.UDPMinimumSize || ulen > len(l4) {
		p.verdict, p.reason = verdictDrop, dropUDPHeader
		return
	}
	l4 = l4[:ulen]
	absent := zeroAllowed && binary.BigEndian.Uint16(l4[6:8]) == 0
	if !absent && !p.l4Trusted && !l4ChecksumValid(header.UDPProtocolNumber, srcB, dstB, l4) {
		p.verdict, p.reason = verdictDrop, dropUDPChecksum
		return
	}
	p.verdict = verdictUDP
	p.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:2]))
	p.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:4]))
	p.payload = l4[header.UDPMinimumSize:]
}

func (p *packetInfo) setTCP(src, dst tcpip.Address, l4 []byte) {
	p.tcp = true
	p.srcAddr, p.dstAddr = src, dst
	p.srcPort = binary.BigEndian.Uint16(l4[0:2])
	p.dstPort = binary.BigEndian.Uint16(l4[2:4])
	p.tcpFlags = l4[tcpFlagsOffset]
	p.tcpSeq = binary.BigEndian.Uint32(l4[4:8])
	p.tcpAck = binary.BigEndian.Uint32(l4[8:12])
	p.tcpPayload = -1
	if off := int(l4[12]>>4) * 4; off >= header.TCPMinimumSize && off <= len(l4) {
		p.tcpPayload = len(l4) - off
	}
}

// l4ChecksumValid checks a TCP or UDP checksum (header and payload in l4)
// against the IP pseudo-header.
func l4ChecksumValid(proto tcpip.TransportProtocolNumber, src, dst, l4 []byte) bool {
	return l4Checksum(proto, src, dst, l4) == 0xffff
}

// l4Checksum returns the one's complement sum of the pseudo-header and l4
// (not complemented). With the checksum field in place a valid segment sums to
// 0xffff; with the field zeroed, ^sum is the value to store.
func l4Checksum(proto tcpip.TransportProtocolNumber, src, dst, l4 []byte) uint16 {
	var pseudo [4]byte
	pseudo[1] = byte(proto)
	binary.BigEndian.PutUint16(pseudo[2:], uint16(len(l4)))
	sum := checksum.Checksum(src, 0)
	sum = checksum.Checksum(dst, sum)
	sum = checksum.Checksum(pseudo[:], sum)
	return checksum.Checksum(l4, sum)
}

const (
	ipv4TTL      = 64
	ipv6HopLimit = 64
)

// udpPacketLen is the IP packet size for a UDP datagram of payloadLen bytes.
func udpPacketLen(v4 bool, payloadLen int) int {
	if v4 {
		return header.IPv4MinimumSize + header.UDPMinimumSize + payloadLen
	}
	return header.IPv6MinimumSize + header.UDPMinimumSize + payloadLen
}

// buildUDP writes an IPv4 or IPv6 + UDP packet into b, which must be exactly
// udpPacketLen bytes. src and dst must be the same family (unmapped).
func buildUDP(b []byte, src, dst netip.AddrPort, payload []byte) {
	var l4 []byte
	var s, d []byte
	if src.Addr().Is4() {
		ip := b[:header.IPv4MinimumSize]
		ip[0] = 0x45
		ip[1] = 0
		binary.BigEndian.PutUint16(ip[2:4], uint16(len(b)))
		// ID 0 with DF: an atomic datagram (RFC 6864 4.1), never fragmented here.
		binary.BigEndian.PutUint16(ip[4:6], 0)
		binary.BigEndian.PutUint16(ip[6:8], 0x4000)
		ip[8] = ipv4TTL
		ip[9] = ipProtoUDP
		ip[10], ip[11] = 0, 0
		s4, d4 := src.Addr().As4(), dst.Addr().As4()
		copy(ip[12:16], s4[:])
		copy(ip[16:20], d4[:])
		binary.BigEndian.PutUint16(ip[10:12], ^checksum.Checksum(ip, 0))
		s, d = ip[12:16], ip[16:20]
		l4 = b[header.IPv4MinimumSize:]
	} else {
		ip := b[:header.IPv6MinimumSize]
		ip[0], ip[1], ip[2], ip[3] = 0x60, 0, 0, 0
		binary.BigEndian.PutUint16(ip[4:6], uint16(len(b)-header.IPv6MinimumSize))
		ip[6] = ipProtoUDP
		ip[7] = ipv6HopLimit
		s16, d16 := src.Addr().As16(), dst.Addr().As16()
		copy(ip[8:24], s16[:])
		copy(ip[24:40], d16[:])
		s, d = ip[8:24], ip[24:40]
		l4 = b[header.IPv6MinimumSize:]
	}
	binary.BigEndian.PutUint16(l4[0:2], src.Port())
	binary.BigEndian.PutUint16(l4[2:4], dst.Port())
	binary.BigEndian.PutUint16(l4[4:6], uint16(len(l4)))
	l4[6], l4[7] = 0, 0
	copy(l4[header.UDPMinimumSize:], payload)
	sum := ^l4Checksum(header.UDPProtocolNumber, s, d, l4)
	if sum == 0 {
		sum = 0xffff // zero means "no checksum" (RFC 768)
	}
	binary.BigEndian.PutUint16(l4[6:8], sum)
}
