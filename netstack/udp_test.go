package netstack

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
	"time"
)

type datagram struct {
	src, dst netip.AddrPort
	payload  []byte
}

func TestUDPRequestReply(t *testing.T) {
	replies := make(chan datagram, 4)
	var server *Stack
	var client *Stack
	client, server = newPair(t,
		funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
			replies <- datagram{src, dst, bytes.Clone(p)}
		}},
		funcHandler{udp: func(src, dst netip.AddrPort, p []byte) {
			// Reply from the address the client sent to, reversed payload.
			r := make([]byte, len(p))
			for i := range p {
				r[len(p)-1-i] = p[i]
			}
			if err := server.WriteUDP(dst, src, r); err != nil {
				t.Errorf("server WriteUDP: %v", err)
			}
		}})
	for _, tc := range []struct{ src, dst string }{
		{"10.0.0.1:5353", "198.51.100.53:53"},
		{"[fd00::1]:5353", "[2001:db8::53]:53"},
		{"[::ffff:10.0.0.1]:5000", "[::ffff:198.51.100.53]:53"}, // mapped = IPv4
	} {
		t.Run(tc.dst, func(t *testing.T) {
			src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
			// Every byte value, odd length (checksum padding), max size for the MTU.
			for _, n := range []int{0, 1, 255, 1001} {
				payload := make([]byte, n)
				for i := range payload {
					payload[i] = byte(i * 7)
				}
				if err := client.WriteUDP(src, dst, payload); err != nil {
					t.Fatalf("client WriteUDP: %v", err)
				}
				select {
				case d := <-replies:
					want := make([]byte, n)
					for i := range payload {
						want[n-1-i] = payload[i]
					}
					unmap := func(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
					if d.src != unmap(dst) || d.dst != unmap(src) || !bytes.Equal(d.payload, want) {
						t.Fatalf("reply %s -> %s %x, want %s -> %s %x", d.src, d.dst, d.payload, dst, src, want)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("no reply to a %d-byte datagram", n)
				}
			}
		})
	}
	// The last reply can reach the client before the server's WriteUDP
	// returns and counts it.
	waitUntil(t, "the server to count its last reply", func() bool { return server.Stats().UDPSent >= 12 })
	if st := server.Stats(); st.UDPFastPath != 12 || st.UDPSent != 12 {
		t.Fatalf("server UDPFastPath=%d UDPSent=%d, want 12 and 12", st.UDPFastPath, st.UDPSent)
	}
}

func TestWriteUDPLimits(t *testing.T) {
	client, _ := newPair(t, funcHandler{}, funcHandler{})
	src4, dst4 := netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:2")
	src6, dst6 := netip.MustParseAddrPort("[fd00::1]:1"), netip.MustParseAddrPort("[fd00::2]:2")
	if err := client.WriteUDP(src4, dst4, make([]byte, 1500-28)); err != nil {
		t.Fatalf("largest IPv4 datagram: %v", err)
	}
	if err := client.WriteUDP(src4, dst4, make([]byte, 1500-27)); !errors.Is(err, ErrMessageTooLong) {
		t.Fatalf("IPv4 datagram over the MTU: %v, want ErrMessageTooLong", err)
	}
	if err := client.WriteUDP(src6, dst6, make([]byte, 1500-48)); err != nil {
		t.Fatalf("largest IPv6 datagram: %v", err)
	}
	if err := client.WriteUDP(src6, dst6, make([]byte, 1500-47)); !errors.Is(err, ErrMessageTooLong) {
		t.Fatalf("IPv6 datagram over the MTU: %v, want ErrMessageTooLong", err)
	}
	if err := client.WriteUDP(src4, dst6, nil); err == nil {
		t.Fatal("mixed families accepted")
	}
	client.Close()
	if err := client.WriteUDP(src4, dst4, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("WriteUDP after Close: %v, want ErrClosed", err)
	}
}
