package netstack

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// FuzzClassify feeds the input parser arbitrary bytes. It must never panic,
// its result slices must alias the packet, a UDP datagram it accepts must
// rebuild (buildUDP, from the addresses and payload it read) into a packet it
// classifies the same, its UDP verdicts must agree with gVisor's own check,
// and its verdict and drop reason must not depend on the bytes after the IP
// total length (link padding). CI runs the seeds with go
// test and a few seconds of fuzzing (.ci/run); explore with
// go test -run '^$' -fuzz '^FuzzClassify$' -fuzztime 60s ./netstack.
func FuzzClassify(f *testing.F) {
	src4, dst4 := netip.MustParseAddrPort("192.0.2.1:1000"), netip.MustParseAddrPort("10.0.0.2:53")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8::1]:1000"), netip.MustParseAddrPort("[fd00::2]:53")
	f.Add(rawUDP(src4, dst4, []byte("hello")))
	f.Add(rawUDP(src6, dst6, []byte("hello")))
	f.Add(rawUDP(netip.MustParseAddrPort("[::ffff:192.0.2.1]:0"), dst6, nil))
	f.Add(append(rawUDP(src4, dst4, []byte("padded")), 0, 0, 0, 0))
	f.Add(rawTCP4(src4, dst4, 1, 0, header.TCPFlagSyn))
	f.Add(rawTCP4(src4, dst4, 1, 2, header.TCPFlagRst|header.TCPFlagAck))
	f.Add([]byte{0x46, 0, 0, 24, 0, 0, 0, 0, 64, 6, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0})
	f.Add([]byte{0x60})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		checkClassify(t, b)
		// Mutations rarely keep a checksum right; the same bytes with their
		// checksums recomputed reach the paths behind them.
		if fixed, ok := fixChecksums(b); ok {
			checkClassify(t, fixed)
		}
	})
}

// fixChecksums returns a copy of b with the IPv4 header checksum and the
// UDP or TCP checksum recomputed wherever classify would check them.
func fixChecksums(b []byte) ([]byte, bool) {
	b = append([]byte(nil), b...)
	var l4, src, dst []byte
	var proto uint8
	switch {
	case len(b) >= header.IPv4MinimumSize && b[0]>>4 == 4:
		ihl, total := int(b[0]&0x0f)*4, int(binary.BigEndian.Uint16(b[2:4]))
		if ihl < header.IPv4MinimumSize || total < ihl || total > len(b) {
			return nil, false
		}
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:12], ^checksum.Checksum(b[:ihl], 0))
		l4, src, dst, proto = b[ihl:total], b[12:16], b[16:20], b[9]
	case len(b) >= header.IPv6MinimumSize && b[0]>>4 == 6:
		plen := int(binary.BigEndian.Uint16(b[4:6]))
		if header.IPv6MinimumSize+plen > len(b) {
			return nil, false
		}
		l4, src, dst, proto = b[header.IPv6MinimumSize:header.IPv6MinimumSize+plen], b[8:24], b[24:40], b[6]
	default:
		return nil, false
	}
	switch {
	case proto == ipProtoUDP && len(l4) >= header.UDPMinimumSize:
		if n := int(binary.BigEndian.Uint16(l4[4:6])); n >= header.UDPMinimumSize && n <= len(l4) {
			l4 = l4[:n]
			l4[6], l4[7] = 0, 0
			sum := ^l4Checksum(header.UDPProtocolNumber, src, dst, l4)
			if sum == 0 {
				sum = 0xffff
			}
			binary.BigEndian.PutUint16(l4[6:8], sum)
		}
	case proto == ipProtoTCP && len(l4) >= header.TCPMinimumSize:
		l4[16], l4[17] = 0, 0
		binary.BigEndian.PutUint16(l4[16:18], ^l4Checksum(header.TCPProtocolNumber, src, dst, l4))
	}
	return b, true
}

// checkClassify classifies b and checks the result (see FuzzClassify).
func checkClassify(t *testing.T, b []byte) {
	t.Helper()
	var p packetInfo
	classify(b, &p)
	within := func(s []byte) bool {
		if len(s) == 0 {
			return true
		}
		lo := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
		x := uintptr(unsafe.Pointer(unsafe.SliceData(s)))
		return x >= lo && x+uintptr(len(s)) <= lo+uintptr(len(b))
	}
	if !within(p.packet) || !within(p.payload) {
		t.Fatal("result slices escape the packet")
	}
	switch p.verdict {
	case verdictUDP:
		if !p.src.Addr().IsValid() || !p.dst.Addr().IsValid() || p.src.Addr().Is4() != p.dst.Addr().Is4() {
			t.Fatalf("udp verdict with addresses %s -> %s", p.src, p.dst)
		}
		// A datagram we accept must survive a rebuild from what we read.
		var q packetInfo
		rebuilt := rawUDP(p.src, p.dst, p.payload)
		classify(rebuilt, &q)
		if q.verdict != verdictUDP || q.src != p.src || q.dst != p.dst || !bytes.Equal(q.payload, p.payload) {
			t.Fatalf("udp %s -> %s (%d bytes) rebuilt as %x, which classifies as verdict %d reason %d %s -> %s (%d bytes)",
				p.src, p.dst, len(p.payload), rebuilt, q.verdict, q.reason, q.src, q.dst, len(q.payload))
		}
	case verdictDrop:
		if p.reason == dropNone || p.reason >= numDropReasons {
			t.Fatalf("drop without a reason: %d", p.reason)
		}
	default:
		if p.reason != dropNone {
			t.Fatalf("verdict %d with drop reason %d", p.verdict, p.reason)
		}
	}
	if p.packet == nil {
		return
	}
	checkUDPOracle(t, &p)
	// The packet cut at its total length, and with more padding, read the same.
	for _, pad := range [][]byte{nil, {0xde, 0xad, 0xbe, 0xef, 0x45, 0x11}} {
		v := append(append([]byte(nil), p.packet...), pad...)
		var q packetInfo
		classify(v, &q)
		if q.verdict != p.verdict || q.reason != p.reason || q.proto != p.proto || len(q.packet) != len(p.packet) ||
			q.src != p.src || q.dst != p.dst || !bytes.Equal(q.payload, p.payload) ||
			q.tcp != p.tcp || q.tcpFlags != p.tcpFlags || q.srcAddr != p.srcAddr || q.dstAddr != p.dstAddr ||
			q.srcPort != p.srcPort || q.dstPort != p.dstPort {
			t.Fatalf("%d bytes of padding change the result:\n got %+v\nwant %+v", len(pad), q, p)
		}
	}
}

// checkUDPOracle checks the UDP verdict of a packet whose IP header classify
// accepted against gVisor's own check (header.UDPValid), which the fast path
// stands in for: the same datagrams pass, and refusals have the same cause.
func checkUDPOracle(t *testing.T, p *packetInfo) {
	t.Helper()
	b := p.packet
	var l4 []byte
	var src, dst tcpip.Address
	switch {
	case p.proto == header.IPv4ProtocolNumber && p.reason != dropIPChecksum:
		if b[9] != ipProtoUDP || binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 {
			return
		}
		l4 = b[int(b[0]&0x0f)*4:]
		src, dst = tcpip.AddrFrom4([4]byte(b[12:16])), tcpip.AddrFrom4([4]byte(b[16:20]))
	case p.proto == header.IPv6ProtocolNumber:
		if b[6] != ipProtoUDP {
			return
		}
		l4 = b[header.IPv6MinimumSize:]
		src, dst = tcpip.AddrFrom16([16]byte(b[8:24])), tcpip.AddrFrom16([16]byte(b[24:40]))
	default:
		return
	}
	want := verdictUDP
	var reason dropReason
	if len(l4) < header.UDPMinimumSize {
		want, reason = verdictDrop, dropUDPHeader
	} else {
		u := header.UDP(l4)
		lengthOK, sumOK := header.UDPValid(u, func() uint16 {
			return checksum.Checksum(l4[header.UDPMinimumSize:u.Length()], 0)
		}, uint16(len(l4)-header.UDPMinimumSize), p.proto, src, dst, false)
		switch {
		case !lengthOK:
			want, reason = verdictDrop, dropUDPHeader
		case !sumOK:
			want, reason = verdictDrop, dropUDPChecksum
		}
	}
	if p.verdict != want || p.reason != reason {
		t.Fatalf("udp verdict %d reason %d; gVisor's UDPValid says verdict %d reason %d", p.verdict, p.reason, want, reason)
	}
}

// TestBuildUDPRoundTrip checks that what WriteUDP builds the parser accepts
// with the same addresses and payload, for both families.
func TestBuildUDPRoundTrip(t *testing.T) {
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.1:1", "198.51.100.2:65535"},
		{"[2001:db8::1]:4242", "[2001:db8::2]:53"},
	} {
		src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
		for _, n := range []int{0, 1, 2, 1000, 1001} {
			payload := make([]byte, n)
			for i := range payload {
				payload[i] = byte(i*31 + 7)
			}
			var p packetInfo
			classify(rawUDP(src, dst, payload), &p)
			if p.verdict != verdictUDP || p.src != src || p.dst != dst || string(p.payload) != string(payload) {
				t.Fatalf("%s->%s %d bytes: verdict %d reason %d %s->%s", src, dst, n, p.verdict, p.reason, p.src, p.dst)
			}
		}
	}
}

// FuzzVnetFrame feeds the vnet frame parser (a kernel TUN's virtio-net
// header and packet) arbitrary bytes. It must never panic; a header that
// vouches for nothing must classify exactly as classify does; a USO frame's
// datagrams must tile its payload in gsoSize pieces; completing a partial
// checksum may write only the two checksum bytes; and a header must survive
// encode and decode. CI fuzzes it briefly (.ci/run).
func FuzzVnetFrame(f *testing.F) {
	src4, dst4 := netip.MustParseAddrPort("192.0.2.1:1000"), netip.MustParseAddrPort("10.0.0.2:53")
	hdr := func(h vnetHdr) []byte {
		b := make([]byte, vnetHdrLen)
		h.encode(b)
		return b
	}
	syn := rawTCP4(src4, dst4, 1, 0, header.TCPFlagSyn)
	f.Add(hdr(vnetHdr{}), syn)
	f.Add(hdr(vnetHdr{flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 16}), syn)
	f.Add(hdr(vnetHdr{flags: vnetFlagDataValid, gsoType: vnetGSOTCPv4, gsoSize: 1448, hdrLen: 52}), syn)
	f.Add(hdr(vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOUDPL4, gsoSize: 3, csumStart: 20, csumOffset: 6}), rawUDP(src4, dst4, []byte("0123456789")))
	f.Add(hdr(vnetHdr{gsoType: 0x7f}), rawUDP(src4, dst4, nil))
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, hb, b []byte) {
		if len(hb) < vnetHdrLen {
			hb = append(hb, make([]byte, vnetHdrLen-len(hb))...)
		}
		h := decodeVnetHdr(hb)
		var back [vnetHdrLen]byte
		h.encode(back[:])
		if !bytes.Equal(back[:], hb[:vnetHdrLen]) {
			t.Fatalf("header %x encodes back as %x", hb[:vnetHdrLen], back)
		}
		var p, plain packetInfo
		classifyFrame(h, b, &p)
		if !h.l4Trusted() && h.gso() == vnetGSONone {
			classify(b, &plain)
			if p.verdict != plain.verdict || p.reason != plain.reason {
				t.Fatalf("untrusted frame: verdict %d/%d, classify says %d/%d", p.verdict, p.reason, plain.verdict, plain.reason)
			}
		}
		if p.verdict == verdictUDP {
			total, n := 0, 0
			k := udpSegments(h, &p, func(seg []byte) {
				if h.gso() == vnetGSOUDPL4 && len(seg) > int(h.gsoSize) {
					t.Fatalf("datagram of %d bytes, gso size %d", len(seg), h.gsoSize)
				}
				total += len(seg)
				n++
			})
			if total != len(p.payload) || k != n || k < 1 {
				t.Fatalf("%d datagrams of %d bytes in all (reported %d) from a %d-byte payload", n, total, k, len(p.payload))
			}
		}
		orig := append([]byte(nil), b...)
		completeChecksum(h, b)
		at := int(h.csumStart) + int(h.csumOffset)
		for i := range b {
			if b[i] != orig[i] && (i < at || i >= at+2) {
				t.Fatalf("completeChecksum wrote byte %d (checksum at %d)", i, at)
			}
		}
	})
}
