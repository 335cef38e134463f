package forwarder

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
)

func TestLookup(t *testing.T) {
	t.Parallel()
	disabled := false
	off := mapping("off", conf.TCP, "7000", "127.0.0.1:7000")
	off.Enabled = &disabled
	expired := mapping("expired", conf.TCP, "7001", "127.0.0.1:7001")
	expired.Expires = time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	uplinkOnly := mapping("uplink-only", conf.TCP, "7002", "127.0.0.1:7002")
	uplinkOnly.Ingress = []string{conf.IngressUplink}
	cfg := config(
		mapping("web", conf.TCP, "443", "127.0.0.1:8443"),
		mapping("web-special", conf.TCP, "198.51.100.7:443", "127.0.0.1:9443"),
		mapping("v6only", conf.TCP, "[::]:80", "127.0.0.1:8080"),
		mapping("v4any", conf.TCP, "0.0.0.0:80", "[::1]:8080"),
		mapping("dns", conf.TCPUDP, "53", "127.0.0.1:5353"),
		mapping("game", conf.UDP, "10000-10100", "127.0.0.1:20000"),
		mapping("wide", conf.TCP, "30000-30010", "127.0.0.1:40000-40010"),
		off, expired, uplinkOnly,
	)
	rs, err := Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		ingress string
		proto   conf.Proto
		dst     string
		want    string // "" for no match
		target  string
	}{
		{"single port", "tun", conf.TCP, "203.0.113.1:443", "web", "127.0.0.1:8443"},
		{"listen address wins", "tun", conf.TCP, "198.51.100.7:443", "web-special", "127.0.0.1:9443"},
		{"v4-mapped dst", "tun", conf.TCP, "[::ffff:198.51.100.7]:443", "web-special", "127.0.0.1:9443"},
		{"wrong proto", "tun", conf.UDP, "203.0.113.1:443", "", ""},
		{"v6 public to v4 target", "tun", conf.TCP, "[2001:db8::1]:80", "v6only", "127.0.0.1:8080"},
		{"v4 public to v6 target", "tun", conf.TCP, "203.0.113.1:80", "v4any", "[::1]:8080"},
		{"tcp+udp serves tcp", "tun", conf.TCP, "203.0.113.1:53", "dns", "127.0.0.1:5353"},
		{"tcp+udp serves udp", "uplink", conf.UDP, "203.0.113.1:53", "dns", "127.0.0.1:5353"},
		{"range low end", "tun", conf.UDP, "203.0.113.1:10000", "game", "127.0.0.1:20000"},
		{"range start port maps 1:1", "tun", conf.UDP, "203.0.113.1:10042", "game", "127.0.0.1:20042"},
		{"range high end", "tun", conf.UDP, "203.0.113.1:10100", "game", "127.0.0.1:20100"},
		{"past range", "tun", conf.UDP, "203.0.113.1:10101", "", ""},
		{"range to range", "tun", conf.TCP, "203.0.113.1:30005", "wide", "127.0.0.1:40005"},
		{"below everything", "tun", conf.TCP, "203.0.113.1:1", "", ""},
		{"disabled", "tun", conf.TCP, "203.0.113.1:7000", "", ""},
		{"expired", "tun", conf.TCP, "203.0.113.1:7001", "", ""},
		{"ingress listed", "uplink", conf.TCP, "203.0.113.1:7002", "uplink-only", "127.0.0.1:7002"},
		{"ingress not listed", "tun", conf.TCP, "203.0.113.1:7002", "", ""},
		{"top port", "tun", conf.TCP, "203.0.113.1:65535", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := rs.Lookup(tt.ingress, tt.proto, netip.MustParseAddrPort(tt.dst), now)
			got := ""
			if r != nil {
				got = r.Name
			}
			if got != tt.want {
				t.Fatalf("Lookup(%s %s) = %q, want %q", tt.proto.String(), tt.dst, got, tt.want)
			}
			if r != nil {
				if tgt := r.targetHostPort(netip.MustParseAddrPort(tt.dst).Port()); tgt != tt.target {
					t.Fatalf("target = %s, want %s", tgt, tt.target)
				}
			}
		})
	}
	// The expired mapping matches before its expiry.
	if r := rs.Lookup("tun", conf.TCP, netip.MustParseAddrPort("203.0.113.1:7001"), time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC)); r == nil {
		t.Fatal("mapping did not match before it expired")
	}
}

func TestAdmits(t *testing.T) {
	t.Parallel()
	m := mapping("ssh", conf.TCP, "22", "127.0.0.1:22")
	m.Allow = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/32")}
	m.Deny = []netip.Prefix{netip.MustParsePrefix("192.0.2.66/32")}
	open := mapping("open", conf.TCP, "23", "127.0.0.1:23")
	open.Deny = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	rs, err := Compile(config(m, open))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		rule, client string
		want         refusal
	}{
		{"ssh", "192.0.2.1", refusalNone},
		{"ssh", "::ffff:192.0.2.1", refusalNone},
		{"ssh", "2001:db8::5", refusalNone},
		{"ssh", "192.0.2.66", refusedDenied},
		{"ssh", "203.0.113.9", refusedNotAllowed},
		{"ssh", "2001:db9::1", refusedNotAllowed},
		{"open", "203.0.113.9", refusalNone},
		{"open", "198.51.100.3", refusedDenied},
	}
	for _, tt := range tests {
		r, _ := rs.Rule(tt.rule)
		if got := r.admits(netip.MustParseAddr(tt.client)); got != tt.want {
			t.Errorf("%s admits %s = %v, want %v", tt.rule, tt.client, got, tt.want)
		}
	}
}

func TestCompileErrors(t *testing.T) {
	t.Parallel()
	badProxy := mapping("p", conf.TCP, "80", "127.0.0.1:80")
	badProxy.ProxyProtocol = "v3"
	badIngress := mapping("i", conf.TCP, "80", "127.0.0.1:80")
	badIngress.Ingress = []string{"carrier-pigeon"}
	udpV1 := mapping("u", conf.UDP, "80", "127.0.0.1:80")
	udpV1.ProxyProtocol = "v1"
	tests := []struct {
		name string
		ms   []conf.Mapping
		want string
	}{
		{"duplicate", []conf.Mapping{mapping("a", conf.TCP, "80", "127.0.0.1:80"), mapping("a", conf.TCP, "81", "127.0.0.1:81")}, "defined twice"},
		{"width", []conf.Mapping{mapping("w", conf.TCP, "80-90", "127.0.0.1:80-82")}, "target range"},
		{"past 65535", []conf.Mapping{mapping("w", conf.TCP, "80-90", "127.0.0.1:65530")}, "past 65535"},
		{"proxy", []conf.Mapping{badProxy}, "proxy_protocol"},
		{"udp v1", []conf.Mapping{udpV1}, "v1 cannot carry udp"},
		{"ingress", []conf.Mapping{badIngress}, "unknown ingress"},
		{"no name", []conf.Mapping{mapping("", conf.TCP, "80", "127.0.0.1:80")}, "no name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(config(tt.ms...))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Compile error = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}
