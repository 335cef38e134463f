package tunnel

import (
	"net/netip"
	"testing"
)

func TestTunnelAddr6(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"100.96.0.2", "fd6e:6174:626f:7800::6460:2"},
		{"::ffff:10.0.0.1", "fd6e:6174:626f:7800::a00:1"},
		{"2001:db8::1", "invalid IP"},
	}
	for _, tt := range tests {
		if got := TunnelAddr6(netip.MustParseAddr(tt.in)).String(); got != tt.want {
			t.Errorf("TunnelAddr6(%s) = %s, want %s", tt.in, got, tt.want)
		}
	}
	p := TunnelPrefixes(netip.MustParseAddr("100.96.0.2"))
	if len(p) != 2 || p[0].String() != "100.96.0.2/32" || p[1].String() != "fd6e:6174:626f:7800::6460:2/128" {
		t.Fatalf("TunnelPrefixes = %v", p)
	}
	v4 := netip.MustParseAddr("100.96.0.2")
	if got := tunnelAddrFor(v4, netip.MustParseAddr("::1")); got != TunnelAddr6(v4) {
		t.Errorf("v6 client -> %s", got)
	}
	if got := tunnelAddrFor(v4, netip.MustParseAddr("::ffff:127.0.0.1")); got != v4 {
		t.Errorf("v4-mapped client -> %s", got)
	}
}
