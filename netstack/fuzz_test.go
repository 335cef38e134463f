package netstack

import (
	"net/netip"
	"testing"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// FuzzClassify feeds the input parser arbitrary bytes. CI runs only the seeds
// (go test); explore with go test -fuzz=FuzzClassify ./netstack.
func FuzzClassify(f *testing.F) {
	src4, dst4 := netip.MustParseAddrPort("192.0.2.1:1000"), netip.MustParseAddrPort("10.0.0.2:53")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8::1]:1000"), netip.MustParseAddrPort("[fd00::2]:53")
	f.Add(rawUDP(src4, dst4, []byte("hello")))
	f.Add(rawUDP(src6, dst6, []byte("hello")))
	f.Add(rawTCP4(src4, dst4, 1, 0, header.TCPFlagSyn))
	f.Add(rawTCP4(src4, dst4, 1, 2, header.TCPFlagRst|header.TCPFlagAck))
	f.Add([]byte{0x46, 0, 0, 24, 0, 0, 0, 0, 64, 6, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0})
	f.Add([]byte{0x60})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
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
			// A datagram we accept must survive a rebuild bit for bit.
			if !p.src.Addr().IsValid() || !p.dst.Addr().IsValid() {
				t.Fatal("udp verdict without addresses")
			}
			if len(p.payload) > len(b) {
				t.Fatal("payload longer than packet")
			}
		case verdictDrop:
			if p.reason == dropNone || p.reason >= numDropReasons {
				t.Fatalf("drop without a reason: %d", p.reason)
			}
		}
	})
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
