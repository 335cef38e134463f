package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// v2 builds a PROXY v2 PROXY-command header for src -> dst (written by hand
// from the spec, so the e2e assertions do not trust natbox's own encoder).
func v2(src, dst netip.AddrPort, udp bool) []byte {
	fam := byte(0x11)
	if src.Addr().Is6() {
		fam = 0x21
	}
	if udp {
		fam++
	}
	var addrs []byte
	addrs = append(addrs, src.Addr().AsSlice()...)
	addrs = append(addrs, dst.Addr().AsSlice()...)
	addrs = binary.BigEndian.AppendUint16(addrs, src.Port())
	addrs = binary.BigEndian.AppendUint16(addrs, dst.Port())
	b := append([]byte{}, proxyV2Sig...)
	b = append(b, 0x21, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(len(addrs)))
	return append(b, addrs...)
}

func TestReadProxyHeader(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("198.18.2.2:40000"), netip.MustParseAddrPort("198.18.0.1:8080")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8::2]:40000"), netip.MustParseAddrPort("[2001:db8::1]:443")
	tests := []struct {
		name    string
		stream  []byte
		want    proxyHeader
		wantErr bool
	}{
		{"none", []byte("whoami\n"), proxyHeader{}, false},
		{"v1 tcp4", []byte("PROXY TCP4 198.18.2.2 198.18.0.1 40000 8080\r\nwhoami\n"), proxyHeader{1, src4, dst4}, false},
		{"v2 tcp4", append(v2(src4, dst4, false), "whoami\n"...), proxyHeader{2, src4, dst4}, false},
		{"v2 tcp6", append(v2(src6, dst6, false), "whoami\n"...), proxyHeader{2, src6, dst6}, false},
		{"v1 garbage", []byte("PROXY TCP4 nope\r\nwhoami\n"), proxyHeader{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := bufio.NewReader(bytes.NewReader(tt.stream))
			got, err := readProxyHeader(br)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if tt.wantErr {
				return
			}
			if got != tt.want {
				t.Errorf("header = %+v, want %+v", got, tt.want)
			}
			if rest, _ := br.ReadString('\n'); rest != "whoami\n" {
				t.Errorf("after the header the stream holds %q, want the request line", rest)
			}
		})
	}
}

func TestParseProxyV2Datagram(t *testing.T) {
	src, dst := netip.MustParseAddrPort("198.18.2.2:42000"), netip.MustParseAddrPort("198.18.0.1:9000")
	h, rest, err := parseProxyV2(append(v2(src, dst, true), "hi"...))
	if err != nil || h != (proxyHeader{2, src, dst}) || string(rest) != "hi" {
		t.Fatalf("got %+v %q %v", h, rest, err)
	}
	h, rest, err = parseProxyV2([]byte("plain"))
	if err != nil || h.Version != 0 || string(rest) != "plain" {
		t.Fatalf("datagram without a header: got %+v %q %v", h, rest, err)
	}
	if _, _, err := parseProxyV2(v2(src, dst, true)[:20]); err == nil {
		t.Fatal("truncated header accepted")
	}
}

func TestWhoamiLine(t *testing.T) {
	peer := netip.MustParseAddrPort("10.77.0.1:5555")
	local := netip.MustParseAddrPort("10.77.0.2:7010")
	h := proxyHeader{2, netip.MustParseAddrPort("198.18.2.2:1"), netip.MustParseAddrPort("198.18.0.1:2")}
	line := whoamiLine(h, addr(peer), addr(local), "x")
	for _, want := range []string{"src=198.18.2.2:1", "dst=198.18.0.1:2", "proxy=v2", "peer=10.77.0.1:5555", "local=10.77.0.2:7010", "msg=x"} {
		if !strings.Contains(line, want) {
			t.Errorf("%q lacks %q", line, want)
		}
	}
}

func addr(ap netip.AddrPort) net.Addr { return net.TCPAddrFromAddrPort(ap) }
