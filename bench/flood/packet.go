package main

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"slices"
)

const (
	ipv4HeaderLen = 20
	udpHeaderLen  = 8
	// tcpSYNOptions is what a Linux client puts in a SYN, minus timestamps:
	// MSS 1460, NOP, window scale 7, SACK permitted, NOP, NOP.
	tcpSYNHeaderLen = 20 + 12

	protoTCP = 6
	protoUDP = 17
)

var tcpSYNOptions = [12]byte{2, 4, 0x05, 0xb4, 1, 3, 3, 7, 4, 2, 1, 1}

// portRange is an inclusive range of ports.
type portRange struct{ lo, hi uint16 }

func (p portRange) pick(rng *rand.Rand) uint16 {
	return p.lo + uint16(rng.IntN(int(p.hi-p.lo)+1))
}

// spoofer picks random source addresses inside a prefix and random
// ephemeral source ports. Not safe for concurrent use.
type spoofer struct {
	prefix netip.Prefix
	rng    *rand.Rand
}

// addr returns a random address of the prefix, skipping the all-zeros and
// all-ones host parts where the prefix has more than two addresses.
func (s *spoofer) addr() netip.Addr {
	base := s.prefix.Masked().Addr().As4()
	b := binary.BigEndian.Uint32(base[:])
	hostBits := 32 - s.prefix.Bits()
	if hostBits == 0 {
		return s.prefix.Addr()
	}
	span := uint64(1) << hostBits
	var host uint64
	if span > 2 {
		host = 1 + s.rng.Uint64N(span-2)
	} else {
		host = s.rng.Uint64N(span)
	}
	var out [4]byte
	binary.BigEndian.PutUint32(out[:], b|uint32(host))
	return netip.AddrFrom4(out)
}

func (s *spoofer) port() uint16 { return uint16(1024 + s.rng.IntN(65536-1024)) }

// grow extends b by n zeroed bytes and returns b and the new bytes.
func grow(b []byte, n int) ([]byte, []byte) {
	b = slices.Grow(b, n)
	b = b[:len(b)+n]
	t := b[len(b)-n:]
	clear(t)
	return b, t
}

// appendIPv4Header appends a 20-byte IPv4 header with a valid checksum for a
// payload of payloadLen bytes. DF is set, as Linux sets it on TCP and on UDP
// datagrams under the path MTU.
func appendIPv4Header(b []byte, proto uint8, src, dst netip.Addr, payloadLen int, id uint16) []byte {
	b, h := grow(b, ipv4HeaderLen)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(ipv4HeaderLen+payloadLen))
	binary.BigEndian.PutUint16(h[4:], id)
	binary.BigEndian.PutUint16(h[6:], 0x4000)
	h[8] = 64
	h[9] = proto
	s, d := src.As4(), dst.As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	binary.BigEndian.PutUint16(h[10:], ^fold(sum(0, h)))
	return b
}

// buildSYN writes one IPv4 TCP SYN from src to dst, with valid checksums,
// over b (reusing its storage) and returns it.
func buildSYN(b []byte, src, dst netip.AddrPort, seq uint32, id uint16) []byte {
	b = appendIPv4Header(b[:0], protoTCP, src.Addr(), dst.Addr(), tcpSYNHeaderLen, id)
	b, t := grow(b, tcpSYNHeaderLen)
	binary.BigEndian.PutUint16(t[0:], src.Port())
	binary.BigEndian.PutUint16(t[2:], dst.Port())
	binary.BigEndian.PutUint32(t[4:], seq)
	t[12] = tcpSYNHeaderLen / 4 << 4
	t[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(t[14:], 64240)
	copy(t[20:], tcpSYNOptions[:])
	binary.BigEndian.PutUint16(t[16:], ^fold(sum(pseudoHeaderSum(src.Addr(), dst.Addr(), protoTCP, len(t)), t)))
	return b
}

// buildUDP writes one IPv4 UDP datagram from src to dst carrying payload,
// with valid checksums, over b and returns it.
func buildUDP(b []byte, src, dst netip.AddrPort, payload []byte, id uint16) []byte {
	n := udpHeaderLen + len(payload)
	b = appendIPv4Header(b[:0], protoUDP, src.Addr(), dst.Addr(), n, id)
	b, u := grow(b, n)
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(n))
	copy(u[udpHeaderLen:], payload)
	c := ^fold(sum(pseudoHeaderSum(src.Addr(), dst.Addr(), protoUDP, n), u))
	if c == 0 {
		c = 0xffff // 0 means "no checksum" in UDP
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return b
}

// pseudoHeaderSum is the unfolded one's-complement sum of the IPv4 pseudo
// header that TCP and UDP checksums cover.
func pseudoHeaderSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	s, d := src.As4(), dst.As4()
	var ph [12]byte
	copy(ph[0:4], s[:])
	copy(ph[4:8], d[:])
	ph[9] = proto
	binary.BigEndian.PutUint16(ph[10:], uint16(length))
	return sum(0, ph[:])
}

// sum adds b to acc as big-endian 16-bit words (RFC 1071), unfolded.
func sum(acc uint32, b []byte) uint32 {
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}
