package conf

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
)

func TestKeys(t *testing.T) {
	t.Parallel()
	// RFC 7748 section 6.1, Alice.
	priv, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	pub, _ := hex.DecodeString("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
	var k Key
	copy(k[:], priv)
	if got := k.Public(); !bytes.Equal(got[:], pub) {
		t.Errorf("Public() = %x, want %x", got, pub)
	}

	for range 20 {
		k, err := GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		if k[0]&7 != 0 || k[31]&128 != 0 || k[31]&64 == 0 {
			t.Fatalf("key %x is not clamped", k)
		}
		want, err := curve25519.X25519(k[:], curve25519.Basepoint)
		if err != nil {
			t.Fatal(err)
		}
		if p := k.Public(); !bytes.Equal(p[:], want) {
			t.Fatalf("Public() = %x, want %x", p, want)
		}
		back, err := ParseKey(k.String())
		if err != nil || back != k {
			t.Fatalf("ParseKey(String()) = %v, %v; want %v", back, err, k)
		}
		text, _ := k.MarshalText()
		var un Key
		if err := un.UnmarshalText(text); err != nil || un != k {
			t.Fatalf("text round trip = %v, %v", un, err)
		}
		if h := k.Hex(); h != hex.EncodeToString(k[:]) || strings.ToLower(h) != h {
			t.Fatalf("Hex() = %q", h)
		}
	}
	if a, b := mustGen(t), mustGen(t); a == b {
		t.Error("two generated keys are equal")
	}
	for _, bad := range []string{"", "c2VjcmV0", "!!!!", strings.Repeat("A", 42) + "=="} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

func mustGen(t *testing.T) Key {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestValueText(t *testing.T) {
	t.Parallel()
	type textValue interface {
		UnmarshalText([]byte) error
		String() string
	}
	tests := []struct {
		in   string
		v    textValue
		want string // String() after parsing; "" means the same as in
	}{
		{"tcp", new(Proto), ""},
		{"udp", new(Proto), ""},
		{"tcp+udp", new(Proto), ""},
		{"udp+tcp", new(Proto), "tcp+udp"},
		{"443", new(Listen), ""},
		{"10000-10100", new(Listen), ""},
		{"198.51.100.1:8443", new(Listen), ""},
		{"[2001:db8::1]:80-90", new(Listen), ""},
		{"[::ffff:198.51.100.1]:80", new(Listen), "198.51.100.1:80"},
		{"10.0.0.5:443", new(Target), ""},
		{"backend.lan:10000-10100", new(Target), ""},
		{"[fd00::5]:22", new(Target), ""},
		{"tcp/443", new(PortSpec), ""},
		{"udp/10000-10100", new(PortSpec), ""},
		{"tcp+udp/53", new(PortSpec), ""},
		{"90s", new(Duration), "1m30s"},
		{"2h", new(Duration), "2h0m0s"},
	}
	for _, tt := range tests {
		if err := tt.v.UnmarshalText([]byte(tt.in)); err != nil {
			t.Errorf("%T %q: %v", tt.v, tt.in, err)
			continue
		}
		want := tt.want
		if want == "" {
			want = tt.in
		}
		if got := tt.v.String(); got != want {
			t.Errorf("%T %q: String() = %q, want %q", tt.v, tt.in, got, want)
		}
	}
	for _, bad := range []struct {
		in string
		v  textValue
	}{
		{"TCP", new(Proto)}, {"", new(Listen)}, {"1-2-3", new(Listen)}, {"[::1]", new(Listen)},
		{"host:", new(Target)}, {":80", new(Target)}, {"::1:80", new(Target)}, {"tcp/0", new(PortSpec)},
		{"-1s", new(Duration)}, {"soon", new(Duration)},
	} {
		if err := bad.v.UnmarshalText([]byte(bad.in)); err == nil {
			t.Errorf("%T accepted %q as %v", bad.v, bad.in, bad.v)
		}
	}
}

func TestListenMatching(t *testing.T) {
	t.Parallel()
	l := func(s string) Listen {
		var v Listen
		if err := v.UnmarshalText([]byte(s)); err != nil {
			t.Fatal(err)
		}
		return v
	}
	a := netip.MustParseAddr
	if !l("80").MatchesAddr(a("2001:db8::1")) || !l("0.0.0.0:80").MatchesAddr(a("203.0.113.1")) ||
		l("0.0.0.0:80").MatchesAddr(a("2001:db8::1")) || !l("[::]:80").MatchesAddr(a("2001:db8::1")) ||
		!l("203.0.113.1:80").MatchesAddr(a("::ffff:203.0.113.1")) || l("203.0.113.1:80").MatchesAddr(a("203.0.113.2")) {
		t.Error("MatchesAddr")
	}
	tgt := Target{Host: "h", Ports: PortRange{20000, 20000}}
	if got := tgt.Port(l("10000-10100"), 10005); got != 20005 {
		t.Errorf("Target.Port = %d", got)
	}
}

func TestScanKeyLines(t *testing.T) {
	t.Parallel()
	src := `# comment [not.a.table]
title = "x" # key = "not a key"
multi = """
[[mapping]]
fake = 1
"""
arr = [
  "a", # [[mapping]]
  { x = 1 },
]
"quoted key" = 1
a.b = 2
[[mapping]]
name = 'one'
[mapping.extra]
k = 1
[[mapping]]
name = "two"
  listen  =  "443"
[[mapping.sub]]
x = 1
[[mapping.sub]]
x = 2
`
	got := scanKeyLines(src)
	want := map[string]int{
		"title": 2, "multi": 3, "arr": 7, "quoted key": 11, "a": 12, "a.b": 12,
		"mapping[0]": 13, "mapping[0].name": 14, "mapping[0].extra": 15, "mapping[0].extra.k": 16,
		"mapping[1]": 17, "mapping[1].name": 18, "mapping[1].listen": 19,
		"mapping[1].sub[0]": 20, "mapping[1].sub[0].x": 21, "mapping[1].sub[1]": 22, "mapping[1].sub[1].x": 23,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("scanKeyLines:\n got %v\nwant %v", got, want)
	}
}

// TestByteOrderMark checks that a file starting with a byte order mark, which
// BurntSushi/toml skips, still has its problems reported at the right lines.
func TestByteOrderMark(t *testing.T) {
	t.Parallel()
	mapping := func(name, listen string) string {
		return "[[mapping]]\nname = \"" + name + "\"\nowner = \"x\"\nprotocol = \"tcp\"\nlisten = " + listen + "\ntarget = \"10.0.0.5:80\"\n"
	}
	body := mapping("a", `"99999" # <-`) + mapping("b", `"81"`) + tunBase
	for _, bom := range []string{"\xef\xbb\xbf", "\xff\xfe", "\xfe\xff"} {
		src := bom + body
		_, _, err := ParseAt("t.toml", []byte(src), clock)
		wantOneError(t, src, err, `mapping "a" (mapping[0]).listen: port 99999 is out of range; use 1-65535`)
		if got := scanKeyLines(src); got["mapping[0]"] != 1 || got["mapping[1]"] != 7 || got["tun.addresses"] != 14 {
			t.Errorf("bom %x: lines %v", bom, got)
		}
	}
}

func TestErrorFormat(t *testing.T) {
	t.Parallel()
	tests := []struct {
		e    Error
		want string
	}{
		{Error{Path: "n.toml", Line: 3, Key: "tun.mtu", Msg: "bad", Fix: "fix it"}, "n.toml:3: tun.mtu: bad; fix it"},
		{Error{Path: "n.toml", Key: "limits", Msg: "bad"}, "n.toml: limits: bad"},
		{Error{Path: "n.toml", Line: 2, Msg: "bad", Fix: "fix"}, "n.toml:2: bad; fix"},
		{Error{Msg: "bad"}, "bad"},
	}
	for _, tt := range tests {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("%#v: %q, want %q", tt.e, got, tt.want)
		}
	}
	if s := (Warning{Path: "n.toml", Line: 9, Key: "mapping[0]", Msg: "no owner"}).String(); s != "n.toml:9: mapping[0]: no owner" {
		t.Errorf("warning: %q", s)
	}
}

func TestExamples(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"natbox.toml", "natbox-uplink.toml", "natbox-two-relays.toml"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join("..", "examples", name)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg, warns, err := ParseAt(path, data, clock)
			if err != nil {
				t.Fatalf("example does not validate:\n%v", err)
			}
			if len(warns) > 0 {
				t.Errorf("example has warnings: %v", warns)
			}
			if len(cfg.EnabledMappings(clock)) == 0 {
				t.Error("example serves no mapping")
			}
			if name == "natbox.toml" {
				assertEveryKeyDocumented(t, string(data), reflect.TypeFor[Config]())
			}
		})
	}
	t.Run("relay.toml", func(t *testing.T) {
		t.Parallel()
		cfg, warns, err := LoadRelay(filepath.Join("..", "examples", "relay.toml"))
		if err != nil || len(warns) > 0 {
			t.Fatalf("relay example: %v %v", err, warns)
		}
		if len(cfg.Peers) == 0 {
			t.Error("relay example has no peers")
		}
	})
	t.Run("uplink matches relay", func(t *testing.T) {
		t.Parallel()
		relay, _, err := LoadRelay(filepath.Join("..", "examples", "relay.toml"))
		if err != nil {
			t.Fatal(err)
		}
		up, _, err := Load(filepath.Join("..", "examples", "natbox-uplink.toml"))
		if err != nil {
			t.Fatal(err)
		}
		if up.Uplinks[0].RelayPublicKey != relay.Relay.PrivateKey.Public() {
			t.Error("uplink example's relay_public_key is not the relay example's public key")
		}
		p, ok := relay.PeerByKey(up.Uplinks[0].PrivateKey.Public())
		if !ok || p.Address != up.Uplinks[0].Address || up.Uplinks[0].RelayAddress != relay.Relay.Address {
			t.Errorf("uplink example is not a peer of the relay example: %+v %v", p, ok)
		}
	})
}

// assertEveryKeyDocumented checks that each key of t appears in src as
// "key =", possibly commented out, so the example shows the whole schema.
func assertEveryKeyDocumented(t *testing.T, src string, typ reflect.Type) {
	t.Helper()
	for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice {
		typ = typ.Elem()
	}
	if typ.Kind() != reflect.Struct || typ == reflect.TypeFor[time.Time]() || typ.PkgPath() != reflect.TypeFor[Config]().PkgPath() {
		return
	}
	for name, i := range tomlFields(typ) {
		f := typ.Field(i)
		ft := f.Type
		for ft.Kind() == reflect.Pointer || ft.Kind() == reflect.Slice {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() == typ.PkgPath() && ft.NumField() > 0 && ft.Field(0).Tag.Get("toml") != "" {
			if !regexp.MustCompile(`(?m)^#? ?\[\[?` + name + `\]\]?`).MatchString(src) {
				t.Errorf("example has no [%s] table", name)
			}
			assertEveryKeyDocumented(t, src, ft)
			continue
		}
		if !regexp.MustCompile(`(?m)^#? ?` + name + ` =`).MatchString(src) {
			t.Errorf("example does not show key %q", name)
		}
	}
}

func TestErrorsUnwrap(t *testing.T) {
	t.Parallel()
	errs := &Errors{List: []Error{{Msg: "a"}, {Msg: "b"}}}
	var e Error
	if !errors.As(error(errs), &e) || e.Msg != "a" {
		t.Errorf("errors.As = %+v", e)
	}
	if errs.Error() != "a\nb" {
		t.Errorf("Error() = %q", errs.Error())
	}
}

// TestRiskyExposure: a risky service counts on a listen or a target port,
// only while everyone may connect (no allow list, or a /0), and never with
// acknowledge_risk.
func TestRiskyExposure(t *testing.T) {
	parse := func(listen, target string) (Listen, Target) {
		var l Listen
		var tg Target
		if err := l.UnmarshalText([]byte(listen)); err != nil {
			t.Fatal(err)
		}
		if err := tg.UnmarshalText([]byte(target)); err != nil {
			t.Fatal(err)
		}
		return l, tg
	}
	tests := []struct {
		name           string
		listen, target string
		allow          []netip.Prefix
		ack            string
		want           []uint16
	}{
		{"listen port", "3389", "10.0.0.2:13389", nil, "", []uint16{3389}},
		{"target port", "13389", "10.0.0.2:3389", nil, "", []uint16{3389}},
		{"both, sorted", "5900", "10.0.0.2:445", nil, "", []uint16{445, 5900}},
		{"allow /0 is everyone", "3389", "10.0.0.2:3389", []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, "", []uint16{3389}},
		{"allow list", "3389", "10.0.0.2:3389", []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, "", nil},
		{"acknowledged", "3389", "10.0.0.2:3389", nil, "lab box", nil},
		{"harmless", "443", "10.0.0.2:443", nil, "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, tg := parse(tt.listen, tt.target)
			m := Mapping{Listen: l, Target: tg, Allow: tt.allow, AcknowledgeRisk: tt.ack}
			if got := m.RiskyExposure(); !slices.Equal(got, tt.want) {
				t.Fatalf("RiskyExposure() = %v, want %v", got, tt.want)
			}
		})
	}
}
