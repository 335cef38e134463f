package conf

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
)

// Two more relay keys for configs with several uplinks.
const (
	testRelayPub2 = "yZUZKbuCSZ4FC4s8CsN5TFecmNcqXpVO4A6f4wUTxmw="
	testRelayPub3 = "vy5dwlz/pj80EBiof6odA+0YCxlQsqB4vQ+SkggT2Es="
)

// uplinkArray renders one [[uplink]] table; extra lines are appended as is.
func uplinkArray(relay, relayPub, address string, extra ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[[uplink]]\nrelay = %q\nrelay_public_key = %q\nprivate_key = %q\naddress = %q\n", relay, relayPub, testPriv, address)
	for _, e := range extra {
		b.WriteString(e + "\n")
	}
	return b.String()
}

func TestUplinkShapes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		src       string
		relays    []string
		keys      []string // Uplink.Key of each
		lines     []int    // Uplink.Line of each
		addresses []string
	}{
		{"one table", uplinkTable, []string{"relay.example.net:51820"}, []string{"uplink"}, []int{1}, []string{"10.77.0.2"}},
		{"one array element", uplinkArray("relay.example.net:51820", testRelayPub, "10.77.0.2"),
			[]string{"relay.example.net:51820"}, []string{"uplink[0]"}, []int{1}, []string{"10.77.0.2"}},
		{"two array elements",
			uplinkArray("a.example.net:51820", testRelayPub, "10.77.0.2") + "\n" +
				uplinkArray("b.example.net:51820", testRelayPub2, "10.78.0.2", `keepalive = "10s"`),
			[]string{"a.example.net:51820", "b.example.net:51820"}, []string{"uplink[0]", "uplink[1]"}, []int{1, 7}, []string{"10.77.0.2", "10.78.0.2"}},
		{"same tunnel address on two relays", // each relay has its own tunnel and stack
			uplinkArray("a.example.net:51820", testRelayPub, "10.77.0.2") +
				uplinkArray("b.example.net:51820", testRelayPub2, "10.77.0.2"),
			[]string{"a.example.net:51820", "b.example.net:51820"}, []string{"uplink[0]", "uplink[1]"}, []int{1, 6}, []string{"10.77.0.2", "10.77.0.2"}},
		{"inline array", `uplink = [
  { relay = "a.example.net:51820", relay_public_key = "` + testRelayPub + `", private_key = "` + testPriv + `", address = "10.77.0.2" },
  { relay = "b.example.net:51820", relay_public_key = "` + testRelayPub2 + `", private_key = "` + testPriv + `", address = "10.78.0.2" },
]`, []string{"a.example.net:51820", "b.example.net:51820"}, []string{"uplink[0]", "uplink[1]"}, []int{0, 0}, []string{"10.77.0.2", "10.78.0.2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, _, err := ParseAt("t.toml", []byte(tt.src), clock)
			if err != nil {
				t.Fatal(err)
			}
			if len(cfg.Uplinks) != len(tt.relays) {
				t.Fatalf("%d uplinks, want %d", len(cfg.Uplinks), len(tt.relays))
			}
			for i, u := range cfg.Uplinks {
				if u.Relay != tt.relays[i] || u.Key != tt.keys[i] || u.Line != tt.lines[i] || u.Address.String() != tt.addresses[i] {
					t.Errorf("uplink %d = relay %q key %q line %d address %s, want %q %q %d %s",
						i, u.Relay, u.Key, u.Line, u.Address, tt.relays[i], tt.keys[i], tt.lines[i], tt.addresses[i])
				}
				// Defaults apply to each table.
				if u.Keepalive == 0 || u.MTU != DefaultTunnelMTU || !u.RelayAddress.IsValid() || u.PrivateKey.String() != testPriv {
					t.Errorf("uplink %d defaults: %+v", i, u)
				}
				if u.Name() != u.Relay {
					t.Errorf("uplink %d name %q", i, u.Name())
				}
			}
			if !cfg.HasIngress(IngressUplink) {
				t.Error("uplink ingress not configured")
			}
		})
	}
}

func TestUplinkErrors(t *testing.T) {
	t.Parallel()
	a := uplinkArray("a.example.net:51820", testRelayPub, "10.77.0.2")
	tests := []struct{ name, src, want string }{
		{"second relay missing", a + `[[uplink]] # <-
relay_public_key = "` + testRelayPub2 + `"
private_key = "` + testPriv + `"
address = "10.78.0.2"`, `uplink[1].relay: relay is required; set the relay's WireGuard host:port, e.g. relay = "relay.example.net:51820"`},
		{"second relay bad", a + `[[uplink]]
relay = "b.example.net" # <-
relay_public_key = "` + testRelayPub2 + `"
private_key = "` + testPriv + `"
address = "10.78.0.2"`, `uplink[1].relay: "b.example.net" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"unknown key in the second", a + `[[uplink]]
relay = "b.example.net:51820"
relay_public_key = "` + testRelayPub2 + `"
private_key = "` + testPriv + `"
adress = "10.78.0.2" # <-`, `uplink[1]: unknown key "adress"; did you mean "address"?`},
		{"second private key missing", a + `[[uplink]] # <-
relay = "b.example.net:51820"
relay_public_key = "` + testRelayPub2 + `"
address = "10.78.0.2"`, `uplink[1].private_key: a private key is required; set private_key_file (create it with: umask 077; wg genkey > FILE) or private_key`},
		{"second mtu", a + uplinkArray("b.example.net:51820", testRelayPub2, "10.78.0.2") + `mtu = 100 # <-`,
			`uplink[1].mtu: mtu 100 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"same relay twice", a + `[[uplink]]
relay = "A.example.net:51820" # <-
relay_public_key = "` + testRelayPub2 + `"
private_key = "` + testPriv + `"
address = "10.78.0.2"`, `uplink[1].relay: relay "A.example.net:51820" is already uplink[0] (line 1); remove one of the two tables; each [[uplink]] is a different relay`},
		{"same relay address twice", uplinkArray("192.0.2.1:51820", testRelayPub, "10.77.0.2") + `[[uplink]]
relay = "[::ffff:192.0.2.1]:51820" # <-
relay_public_key = "` + testRelayPub2 + `"
private_key = "` + testPriv + `"
address = "10.78.0.2"`, `uplink[1].relay: relay "[::ffff:192.0.2.1]:51820" is already uplink[0] (line 1); remove one of the two tables; each [[uplink]] is a different relay`},
		{"same relay key twice", a + `[[uplink]]
relay = "b.example.net:51820"
relay_public_key = "` + testRelayPub + `" # <-
private_key = "` + testPriv + `"
address = "10.78.0.2"`, `uplink[1].relay_public_key: relay_public_key is the same as uplink[0] (line 1)'s: that is one relay twice; each relay has its own key; remove the table that names the same relay twice`},
		{"table instead of array after array", a + `
[uplink] # <-
relay = "b.example.net:51820"`, ""}, // a TOML error: checked below
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, _, err := ParseAt("t.toml", []byte(tt.src), clock)
			if cfg != nil {
				t.Fatal("got a config with an error")
			}
			if tt.want == "" {
				var e *Errors
				if !errors.As(err, &e) || len(e.List) != 1 || e.List[0].Line != markedLine(t, tt.src) ||
					!strings.Contains(e.List[0].Msg, "toml syntax") {
					t.Fatalf("error = %v, want one syntax error at line %d", err, markedLine(t, tt.src))
				}
				return
			}
			wantOneError(t, tt.src, err, tt.want)
		})
	}
}

func TestTooManyUplinks(t *testing.T) {
	t.Parallel()
	keys := make([]Key, MaxUplinks+2)
	var b strings.Builder
	for i := range keys {
		k, err := GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		mark := ""
		if i == MaxUplinks {
			mark = " # <-"
		}
		fmt.Fprintf(&b, "[[uplink]]%s\nrelay = \"r%d.example.net:51820\"\nrelay_public_key = %q\nprivate_key = %q\naddress = \"10.77.0.2\"\n",
			mark, i, k.Public(), testPriv)
	}
	src := b.String()
	_, _, err := ParseAt("t.toml", []byte(src), clock)
	wantOneError(t, src, err, fmt.Sprintf("uplink[%d]: %d [[uplink]] tables; at most %d are allowed; remove 2 of them; more relays are more DNS records, not more uplinks per appliance",
		MaxUplinks, MaxUplinks+2, MaxUplinks))

	// At the bound it loads.
	lines := strings.Split(src, "\n")
	at := strings.Join(lines[:5*MaxUplinks], "\n")
	cfg, _, err := ParseAt("t.toml", []byte(at), clock)
	if err != nil || len(cfg.Uplinks) != MaxUplinks {
		t.Fatalf("%d uplinks: %v", MaxUplinks, err)
	}
}

// TestListenOnAnyUplinkAddress: a mapping may listen on the tunnel address
// of any uplink.
func TestListenOnAnyUplinkAddress(t *testing.T) {
	t.Parallel()
	src := uplinkArray("a.example.net:51820", testRelayPub, "10.77.0.2") +
		uplinkArray("b.example.net:51820", testRelayPub3, "10.78.0.2") + `
[[mapping]]
name = "web"
owner = "o"
protocol = "tcp"
listen = "10.78.0.2:443"
target = "10.0.0.5:443"
`
	_, warns, err := ParseAt("t.toml", []byte(src), clock)
	if err != nil || len(warns) != 0 {
		t.Fatalf("err %v, warnings %v", err, warns)
	}
}

// TestUplinkLossFallback: uplink.loss_fallback reads as a fraction; "off" is
// 0, and the default is DefaultLossFallback's.
func TestUplinkLossFallback(t *testing.T) {
	for _, tt := range []struct {
		line string
		want float64
	}{
		{"", 0.00002},
		{`loss_fallback = "off"`, 0},
		{`loss_fallback = "0.5%"`, 0.005},
		{`loss_fallback = " 2 % "`, 0.02},
	} {
		cfg, _, err := ParseAt("t.toml", []byte(uplinkTable+tt.line+"\n"), clock)
		if err != nil {
			t.Fatalf("%q: %v", tt.line, err)
		}
		if got := cfg.Uplinks[0].LossFallbackRate; math.Abs(got-tt.want) > 1e-12 {
			t.Errorf("%q: rate %v, want %v", tt.line, got, tt.want)
		}
	}
}

// TestUplinkTCPCongestion: uplink.tcp_congestion defaults to
// DefaultTCPCongestion and keeps "system" and a name as written.
func TestUplinkTCPCongestion(t *testing.T) {
	for _, tt := range []struct{ line, want string }{
		{"", "bbr"},
		{`tcp_congestion = "system"`, "system"},
		{`tcp_congestion = "cubic"`, "cubic"},
	} {
		cfg, _, err := ParseAt("t.toml", []byte(uplinkTable+tt.line+"\n"), clock)
		if err != nil {
			t.Fatalf("%q: %v", tt.line, err)
		}
		if got := cfg.Uplinks[0].TCPCongestion; got != tt.want {
			t.Errorf("%q: %q, want %q", tt.line, got, tt.want)
		}
	}
}
