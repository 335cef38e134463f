package forwarder

import (
	"bytes"
	"encoding/hex"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

func unhex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// Expected bytes follow haproxy's proxy-protocol.txt (sections 2.1 and 2.2).
func TestProxyV1(t *testing.T) {
	t.Parallel()
	tests := []struct{ src, dst, want string }{
		{"192.168.0.1:56324", "192.168.0.11:443", "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"},
		{"255.255.255.255:65535", "255.255.255.255:65535", "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"},
		{"[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
			"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"},
		{"[2001:db8::1]:1234", "[2001:db8::2]:443", "PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n"},
		{"[::ffff:192.0.2.1]:1234", "192.0.2.2:443", "PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n"},
		{"192.0.2.1:1234", "[2001:db8::2]:443", "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1234 443\r\n"},
	}
	for _, tt := range tests {
		got := string(appendProxyV1(nil, netip.MustParseAddrPort(tt.src), netip.MustParseAddrPort(tt.dst)))
		if got != tt.want {
			t.Errorf("v1(%s, %s) = %q, want %q", tt.src, tt.dst, got, tt.want)
		}
		if len(got) > 107 {
			t.Errorf("v1 header is %d bytes, the spec allows 107", len(got))
		}
	}
}

func TestProxyV2(t *testing.T) {
	t.Parallel()
	const sig = "0d0a0d0a000d0a515549540a"
	tests := []struct {
		name     string
		udp      bool
		src, dst string
		want     string
	}{
		{"tcp4", false, "192.168.0.1:56324", "192.168.0.11:443",
			sig + "21 11 000c c0a80001 c0a8000b dc04 01bb"},
		{"udp4", true, "192.0.2.1:1234", "198.51.100.1:53",
			sig + "21 12 000c c0000201 c6336401 04d2 0035"},
		{"tcp6", false, "[2001:db8::1]:1234", "[2001:db8::2]:443",
			sig + "21 21 0024 20010db8000000000000000000000001 20010db8000000000000000000000002 04d2 01bb"},
		{"udp6", true, "[2001:db8::1]:1234", "[2001:db8::2]:53",
			sig + "21 22 0024 20010db8000000000000000000000001 20010db8000000000000000000000002 04d2 0035"},
		{"mixed families as v6", false, "192.0.2.1:1234", "[2001:db8::2]:443",
			sig + "21 21 0024 00000000000000000000ffffc0000201 20010db8000000000000000000000002 04d2 01bb"},
	}
	for _, tt := range tests {
		got := appendProxyV2(nil, tt.udp, netip.MustParseAddrPort(tt.src), netip.MustParseAddrPort(tt.dst))
		if want := unhex(tt.want); !bytes.Equal(got, want) {
			t.Errorf("%s: v2 = %x, want %x", tt.name, got, want)
		}
	}
}

// TestProxyTCPAtTarget: the header arrives at the target first, then the
// client's bytes. The v6 client reaches a v4 target; the header keeps the
// client's family.
func TestProxyTCPAtTarget(t *testing.T) {
	t.Parallel()
	tests := []struct {
		version, src, dst string
		want              []byte
	}{
		{"v1", "192.0.2.1:40000", "198.51.100.1:80", []byte("PROXY TCP4 192.0.2.1 198.51.100.1 40000 80\r\n")},
		{"v2", "[2001:db8::7]:40000", "[2001:db8::80]:80",
			unhex("0d0a0d0a000d0a515549540a 21 21 0024 20010db8000000000000000000000007 20010db8000000000000000000000080 9c40 0050")},
	}
	for _, tt := range tests {
		t.Run(tt.version, func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan []byte, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- nil
					return
				}
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				b, _ := io.ReadAll(c)
				got <- b
			}()
			m := mapping("pp", conf.TCP, "80", "127.0.0.1:"+itoa(uint16(ln.Addr().(*net.TCPAddr).Port)))
			m.ProxyProtocol = tt.version
			e := newEngine(t, config(m), Options{})
			f := startTCP(t, e, newIngress(conf.IngressTUN), tt.src, tt.dst)
			if f.wait(t) != "accepted" {
				t.Fatal("rejected")
			}
			f.client.Write([]byte("GET /"))
			f.client.(*net.TCPConn).CloseWrite()
			want := append(append([]byte(nil), tt.want...), "GET /"...)
			if b := <-got; !bytes.Equal(b, want) {
				t.Fatalf("target read %q, want %q", b, want)
			}
			<-f.done
		})
	}
}

func TestProxyUDPAtTarget(t *testing.T) {
	t.Parallel()
	target, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	m := mapping("pp", conf.UDP, "53", "127.0.0.1:"+itoa(uint16(target.LocalAddr().(*net.UDPAddr).Port)))
	m.ProxyProtocol = "v2"
	e := newEngine(t, config(m), Options{})
	tun := newIngress(conf.IngressTUN)
	e.HandleUDP(tun, netip.MustParseAddrPort("192.0.2.1:1234"), netip.MustParseAddrPort("198.51.100.1:53"), []byte("query"))
	buf := make([]byte, 1500)
	target.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := target.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	want := append(unhex("0d0a0d0a000d0a515549540a 21 12 000c c0000201 c6336401 04d2 0035"), "query"...)
	if !bytes.Equal(buf[:n], want) {
		t.Fatalf("target got %x, want %x", buf[:n], want)
	}
	target.WriteToUDPAddrPort([]byte("answer"), from)
	if r := tun.next(t); r.payload != "answer" {
		t.Fatalf("client got %q, want the reply unchanged", r.payload)
	}
}
