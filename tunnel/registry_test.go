package tunnel

import (
	"strings"
	"testing"

	"github.com/natbox/natbox/conf"
)

func spec(t *testing.T, s string) conf.PortSpec {
	t.Helper()
	var ps conf.PortSpec
	if err := ps.UnmarshalText([]byte(s)); err != nil {
		t.Fatal(err)
	}
	return ps
}

func TestRegistryCheck(t *testing.T) {
	t.Parallel()
	allowA := []conf.PortSpec{spec(t, "tcp/443"), spec(t, "tcp+udp/8000-8010"), spec(t, "udp/10000-10100")}
	g := newRegistry()
	g.take("b", portKey{conf.TCP, 8005})
	g.take("a", portKey{conf.TCP, 443})

	tests := []struct {
		name string
		want string
		spec string
	}{
		{"allowed single port", "", "tcp/443"},
		{"own port stays available", "", "tcp/443"},
		{"allowed range", "", "udp/10000-10100"},
		{"protocol not allowed", reasonNotAllowed, "udp/443"},
		{"port not allowed", reasonNotAllowed, "tcp/22"},
		{"range partly outside", reasonNotAllowed, "udp/10090-10110"},
		{"range over two allowances", "", "udp/8000-8010"},
		{"range with a port another peer holds", `held by peer "b"`, "tcp/8000-8010"},
	}
	for _, tt := range tests {
		if got := g.check("a", allowA, spec(t, tt.spec)); got != tt.want {
			t.Errorf("%s: check(%s) = %q, want %q", tt.name, tt.spec, got, tt.want)
		}
	}

	// b cannot take a's port; once a releases it, b may (if allowed).
	allowB := []conf.PortSpec{spec(t, "tcp/443")}
	if got := g.check("b", allowB, spec(t, "tcp/443")); got != `held by peer "a"` {
		t.Fatalf("b took a's port: %q", got)
	}
	g.release("b", portKey{conf.TCP, 443}) // not b's: no effect
	if got := g.check("b", allowB, spec(t, "tcp/443")); got == "" {
		t.Fatal("release by a non-owner freed the port")
	}
	g.release("a", portKey{conf.TCP, 443})
	if got := g.check("b", allowB, spec(t, "tcp/443")); got != "" {
		t.Fatalf("after release: %q", got)
	}
}

func TestCompressKeys(t *testing.T) {
	t.Parallel()
	keys := []portKey{{conf.UDP, 5}, {conf.TCP, 443}, {conf.UDP, 3}, {conf.UDP, 4}, {conf.TCP, 80}, {conf.UDP, 7}}
	got := strings.Join(specStrings(compressKeys(keys)), " ")
	if want := "tcp/80 tcp/443 udp/3-5 udp/7"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
