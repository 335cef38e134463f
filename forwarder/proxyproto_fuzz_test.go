package forwarder

import (
	"bufio"
	"bytes"
	"net/netip"
	"testing"

	proxyproto "github.com/pires/go-proxyproto"
)

// fuzzAddr makes an address from fuzzed bytes: 16 or more give IPv6 (which
// may be IPv4-mapped) with zone, 4 to 15 give IPv4, fewer none.
func fuzzAddr(b []byte, zone string) (netip.Addr, bool) {
	switch {
	case len(b) >= 16:
		return netip.AddrFrom16([16]byte(b)).WithZone(zone), true
	case len(b) >= 4:
		return netip.AddrFrom4([4]byte(b)), true
	}
	return netip.Addr{}, false
}

// FuzzProxyHeader builds v1 and v2 PROXY headers for fuzzed address pairs
// (IPv4, IPv6, IPv4-mapped, zoned, mixed) and parses them with
// github.com/pires/go-proxyproto, an independent implementation of haproxy's
// spec used as the oracle. It must read the same addresses and ports, in the
// family proxyAddrs picks (IPv4 only when both are IPv4), consume exactly the
// header, and v1 must stay within the spec's 107 bytes.
func FuzzProxyHeader(f *testing.F) {
	v4 := func(s string) []byte { a := netip.MustParseAddr(s).As4(); return a[:] }
	v6 := func(s string) []byte { a := netip.MustParseAddr(s).As16(); return a[:] }
	f.Add(v4("192.168.0.1"), uint16(56324), v4("192.168.0.11"), uint16(443), "", false)
	f.Add(v4("255.255.255.255"), uint16(65535), v4("0.0.0.0"), uint16(0), "", true)
	f.Add(v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), uint16(65535), v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), uint16(65535), "", false)
	f.Add(v6("2001:db8::1"), uint16(1234), v4("192.0.2.2"), uint16(443), "eth0", true)
	f.Add(v6("::ffff:192.0.2.1"), uint16(1234), v4("192.0.2.2"), uint16(443), "", false)
	f.Add(v6("::ffff:192.0.2.1"), uint16(1), v6("fe80::1"), uint16(2), "x", false)
	f.Add(v6("::"), uint16(0), v6("::1"), uint16(80), "", true)
	f.Fuzz(func(t *testing.T, srcIP []byte, srcPort uint16, dstIP []byte, dstPort uint16, zone string, udp bool) {
		sa, ok1 := fuzzAddr(srcIP, zone)
		da, ok2 := fuzzAddr(dstIP, "")
		if !ok1 || !ok2 {
			t.Skip("not an address")
		}
		src, dst := netip.AddrPortFrom(sa, srcPort), netip.AddrPortFrom(da, dstPort)

		// What the target must read: both unmapped when both are IPv4, else
		// both as 16-byte IPv6 (an IPv4 one mapped), never a zone.
		ws, wd := sa.Unmap().WithZone(""), da.Unmap().WithZone("")
		family4 := ws.Is4() && wd.Is4()
		if !family4 {
			ws, wd = netip.AddrFrom16(ws.As16()), netip.AddrFrom16(wd.As16())
		}

		prefix := []byte("keep")
		if !udp {
			v1 := appendProxyV1(append([]byte(nil), prefix...), src, dst)
			if !bytes.HasPrefix(v1, prefix) {
				t.Fatalf("v1 overwrote the buffer it appends to: %q", v1)
			}
			v1 = v1[len(prefix):]
			if len(v1) > 107 {
				t.Fatalf("v1 header is %d bytes, over the spec's 107: %q", len(v1), v1)
			}
			want := proxyproto.TCPv6
			if family4 {
				want = proxyproto.TCPv4
			}
			checkOracle(t, "v1", v1, 1, want, ws, srcPort, wd, dstPort)
		}
		v2 := appendProxyV2(append([]byte(nil), prefix...), udp, src, dst)
		if !bytes.HasPrefix(v2, prefix) {
			t.Fatalf("v2 overwrote the buffer it appends to: %x", v2)
		}
		want := map[[2]bool]proxyproto.AddressFamilyAndProtocol{
			{true, false}: proxyproto.TCPv4, {true, true}: proxyproto.UDPv4,
			{false, false}: proxyproto.TCPv6, {false, true}: proxyproto.UDPv6,
		}[[2]bool{family4, udp}]
		checkOracle(t, "v2", v2[len(prefix):], 2, want, ws, srcPort, wd, dstPort)
	})
}

// checkOracle parses hdr, followed by payload, with go-proxyproto and checks
// what it read.
func checkOracle(t *testing.T, name string, hdr []byte, version byte, proto proxyproto.AddressFamilyAndProtocol,
	src netip.Addr, srcPort uint16, dst netip.Addr, dstPort uint16) {
	t.Helper()
	r := bufio.NewReader(bytes.NewReader(append(hdr[:len(hdr):len(hdr)], "payload"...)))
	h, err := proxyproto.Read(r)
	if err != nil {
		t.Fatalf("%s header %q: go-proxyproto: %v", name, hdr, err)
	}
	if h.Version != version || h.Command != proxyproto.PROXY || h.TransportProtocol != proto {
		t.Fatalf("%s header %q read as version %d command %v protocol %v; want %d PROXY %v",
			name, hdr, h.Version, h.Command, h.TransportProtocol, version, proto)
	}
	sIP, dIP, ok := h.IPs()
	sp, dp, _ := h.Ports()
	if !ok {
		t.Fatalf("%s header %q: no addresses", name, hdr)
	}
	gs, _ := netip.AddrFromSlice(sIP)
	gd, _ := netip.AddrFromSlice(dIP)
	if src.Is4() { // net.IP may hold an IPv4 address in 16 bytes
		gs, gd = gs.Unmap(), gd.Unmap()
	}
	if gs != src || gd != dst || sp != int(srcPort) || dp != int(dstPort) {
		t.Fatalf("%s header %q read as %s:%d -> %s:%d; want %s:%d -> %s:%d",
			name, hdr, gs, sp, gd, dp, src, srcPort, dst, dstPort)
	}
	if rest, _ := r.Peek(r.Buffered()); string(rest) != "payload" {
		t.Fatalf("%s header %q: after the header the target reads %q, want the payload", name, hdr, rest)
	}
}
