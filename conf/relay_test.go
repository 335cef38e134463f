package conf

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const relayBase = `[relay]
private_key = "` + testRelayPriv + `"
address = "10.77.0.1"
`

// relayWithHome is relayBase with one peer "home" (its [[peer]] on line 5)
// allowed ports, a TOML array.
func relayWithHome(ports string) string {
	return relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "10.77.0.2"
ports = ` + ports + "\n"
}

func TestParseRelayErrors(t *testing.T) {
	t.Parallel()
	peer := func(name, key, addr, ports string) string {
		return "\n[[peer]]\nname = \"" + name + "\"\npublic_key = \"" + key + "\"\naddress = \"" + addr + "\"\nports = " + ports + "\n"
	}
	tests := []struct {
		name string
		src  string
		want string
	}{
		{"unknown key in third peer", relayBase +
			peer("home", testPeerPub1, "10.77.0.2", `["tcp/443"]`) +
			peer("office", testPeerPub2, "10.77.0.3", `["tcp/8443"]`) + `
[[peer]]
name = "lab"
public_key = "` + testPriv + `"
adress = "10.77.0.4" # <-
ports = ["tcp/9000"]`, `peer "lab" (peer[2]): unknown key "adress"; did you mean "address"?`},
		{"unknown key in relay", `[relay]
private_key = "` + testRelayPriv + `"
address = "10.77.0.1"
listen_port = 51820 # <-`, `relay: unknown key "listen_port"; did you mean "listen"?`},
		{"address missing", `[relay] # <-
private_key = "` + testRelayPriv + `"`, `relay.address: address is required; set the relay's tunnel address, e.g. address = "10.77.0.1"`},
		{"key missing", `[relay] # <-
address = "10.77.0.1"`, `relay.private_key: a private key is required; set private_key_file (create it with: umask 077; wg genkey > FILE) or private_key`},
		{"listen bad", relayBase + `listen = "51820" # <-`, `relay.listen: "51820" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"tcp listen bad", relayBase + `tcp_listen = "443" # <-`, `relay.tcp_listen: "443" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"tcp congestion bad", relayBase + `tcp_congestion = "BBR v2" # <-`, `relay.tcp_congestion: "BBR v2" is not a congestion control name; name a congestion control the kernel offers (net.ipv4.tcp_available_congestion_control), e.g. "bbr" or "cubic", or "system"`},
		{"public bind bad", relayBase + `public_bind = ["0.0.0.0", "any"] # <-`, `relay.public_bind[1]: "any" is not an IP address; write an address, e.g. "10.77.0.2" or "fd77::2"`},
		{"mtu", relayBase + `mtu = 65536 # <-`, `relay.mtu: mtu 65536 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"mtu below what the tunnel stack runs", relayBase + `mtu = 1279 # <-`, `relay.mtu: mtu 1279 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"max_mtu below mtu", relayBase + "mtu = 9000\nmax_mtu = 8000 # <-", `relay.max_mtu: max_mtu 8000 is out of range; use 9000-65475; max_mtu = mtu turns the path probe off`},
		{"mtu larger than one wireguard datagram", relayBase + `mtu = 65476 # <-`, `relay.mtu: mtu 65476 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"peer quota default negative", relayBase + `peer_max_udp_sessions = -1 # <-`, `relay.peer_max_udp_sessions: -1 is negative; use 0 for unlimited or a positive number`},
		{"udp socket cap negative", relayBase + `max_udp_sockets = -1 # <-`, `relay.max_udp_sockets: -1 is negative; use 0 for unlimited or a positive number`},
		{"peer udp socket cap negative", relayWithHome(`["udp/5000"]`) + `max_udp_sockets = -2 # <-`, `peer "home" (peer[0]).max_udp_sockets: -2 is negative; use a positive number, or 0 for the [relay] default`},
		{"peer quota negative", relayWithHome(`["udp/5000"]`) + `max_inflight = -3 # <-`, `peer "home" (peer[0]).max_inflight: -3 is negative; use a positive number, or 0 for the [relay] default`},
		{"relay address ipv6", `[relay]
private_key = "` + testRelayPriv + `"
address = "fd77::1" # <-`, `relay.address: address fd77::1 is IPv6; tunnel addresses are IPv4; use an IPv4 address such as 10.77.0.2; natbox derives the IPv6 tunnel address from it`},
		{"peer address ipv6", relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "fd77::2" # <-`, `peer "home" (peer[0]).address: address fd77::2 is IPv6; tunnel addresses are IPv4; use an IPv4 address such as 10.77.0.2; natbox derives the IPv6 tunnel address from it`},
		{"peer address v4-in-v6 duplicate", relayBase + peer("home", testPeerPub1, "10.77.0.2", `[]`) + `
[[peer]]
name = "office"
public_key = "` + testPeerPub2 + `"
address = "::ffff:10.77.0.2" # <-`, `peer "office" (peer[1]).address: address ::ffff:10.77.0.2 (10.77.0.2) is already used by peer "home" (line 5); give each appliance its own address`},
		{"peer address v4-in-v6 first", relayBase + peer("home", testPeerPub1, "::ffff:10.77.0.2", `[]`) + `
[[peer]]
name = "office"
public_key = "` + testPeerPub2 + `"
address = "10.77.0.2" # <-`, `peer "office" (peer[1]).address: address 10.77.0.2 is already used by peer "home" (line 5); give each appliance its own address`},
		{"peer address v4-in-v6 is relay's", relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "::ffff:10.77.0.1" # <-`, `peer "home" (peer[0]).address: address ::ffff:10.77.0.1 (10.77.0.1) is the relay's own address; pick another address in the tunnel subnet`},
		{"peer port spec", relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "10.77.0.2"
ports = ["tcp/443", "tcp443"] # <-`, `peer "home" (peer[0]).ports[1]: port spec "tcp443" has no protocol; write protocol/ports, e.g. "tcp/443" or "udp/10000-10100"`},
		{"peer port spec protocol", relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "10.77.0.2"
ports = ["sctp/443"] # <-`, `peer "home" (peer[0]).ports[0]: unknown protocol "sctp"; use "tcp", "udp" or "tcp+udp"`},
		{"peer name missing", relayBase + `
[[peer]] # <-
public_key = "` + testPeerPub1 + `"
address = "10.77.0.2"`, `peer[0].name: name is required; add name = "web" (lowercase letters, digits, ".", "_", "-")`},
		{"peer name duplicate", relayBase + peer("home", testPeerPub1, "10.77.0.2", `[]`) + `
[[peer]]
name = "home" # <-
public_key = "` + testPeerPub2 + `"
address = "10.77.0.3"`, `peer "home" (peer[1]).name: name "home" is already used by peer[0] (line 5); give each peer its own name`},
		{"peer key missing", relayBase + `
[[peer]] # <-
name = "home"
address = "10.77.0.2"`, `peer "home" (peer[0]).public_key: public_key is required; copy the appliance's public key (wg pubkey < its key file)`},
		{"peer key duplicate", relayBase + peer("home", testPeerPub1, "10.77.0.2", `[]`) + `
[[peer]]
name = "office"
public_key = "` + testPeerPub1 + `" # <-
address = "10.77.0.3"`, `peer "office" (peer[1]).public_key: public_key is already used by peer "home" (line 5); give each appliance its own key`},
		{"peer key is relay's", relayBase + `
[[peer]]
name = "home"
public_key = "` + testRelayPub + `" # <-
address = "10.77.0.2"`, `peer "home" (peer[0]).public_key: public_key is the relay's own key; use the appliance's public key`},
		{"peer address duplicate", relayBase + peer("home", testPeerPub1, "10.77.0.2", `[]`) + `
[[peer]]
name = "office"
public_key = "` + testPeerPub2 + `"
address = "10.77.0.2" # <-`, `peer "office" (peer[1]).address: address 10.77.0.2 is already used by peer "home" (line 5); give each appliance its own address`},
		{"peer address is relay's", relayBase + `
[[peer]]
name = "home"
public_key = "` + testPeerPub1 + `"
address = "10.77.0.1" # <-`, `peer "home" (peer[0]).address: address 10.77.0.1 is the relay's own address; pick another address in the tunnel subnet`},
		{"peer address missing", relayBase + `
[[peer]] # <-
name = "home"
public_key = "` + testPeerPub1 + `"`, `peer "home" (peer[0]).address: address is required; set the appliance's tunnel address, e.g. address = "10.77.0.2"`},
		{"peer ports overlap", relayBase + peer("home", testPeerPub1, "10.77.0.2", `["tcp/443", "udp/10000-10100"]`) + `
[[peer]]
name = "office"
public_key = "` + testPeerPub2 + `"
address = "10.77.0.3"
ports = ["tcp/8443", "tcp+udp/10100-10200"] # <-`, `peer "office" (peer[1]).ports[1]: udp/10100 is already allowed to peer "home" (line 5); give each port to one peer`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, _, err := ParseRelay("t.toml", []byte(tt.src))
			if cfg != nil {
				t.Errorf("got a config with an error")
			}
			wantOneError(t, tt.src, err, tt.want)
		})
	}
}

func TestRelayDefaults(t *testing.T) {
	t.Parallel()
	cfg, warns, err := ParseRelay("t.toml", []byte(relayWithHome(`["tcp/443", "tcp+udp/53", "udp/10000-10100"]`)))
	if err != nil || len(warns) != 0 {
		t.Fatalf("err %v, warnings %v", err, warns)
	}
	r := cfg.Relay
	if r.Listen != "0.0.0.0:51820" || r.MTU != 1420 || r.DialTimeout.D() != 5*time.Second || r.MaxSessions != 100000 || r.TCPListen != "" || r.TCPCongestion != "bbr" ||
		!slices.Equal(r.PublicBind, []netip.Addr{netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("::")}) {
		t.Errorf("relay = %+v", r)
	}
	if got, want := r.PeerLimits(&cfg.Peers[0]), (PeerLimits{MaxSessions: 10000, MaxUDPSessions: 4000, MaxInflight: 256,
		NewSessionsPerSecond: 1000, MaxSessionsPerSource: 256, NewSessionsPerSourcePerSecond: 100, MaxUDPSockets: 2048}); got != want {
		t.Errorf("peer limits %+v, want %+v", got, want)
	}
	if cfg.Admin.Socket != DefaultRelayAdminSocket || cfg.Admin.Socket == DefaultAdminSocket || cfg.Log.Level != "info" {
		t.Errorf("admin %+v log %+v", cfg.Admin, cfg.Log)
	}
	p, ok := cfg.PeerByKey(mustKey(t, testPeerPub1))
	if !ok || p.Name != "home" || p.Line != 5 {
		t.Fatalf("PeerByKey = %+v, %v", p, ok)
	}
	want := []PortSpec{{TCP, PortRange{443, 443}}, {TCPUDP, PortRange{53, 53}}, {UDP, PortRange{10000, 10100}}}
	if !slices.Equal(p.Ports, want) {
		t.Errorf("ports = %v, want %v", p.Ports, want)
	}
}

// A UDP allowance the socket caps can never grant whole is a warning naming
// its cost, with the line.
func TestRelayUDPSocketCapWarns(t *testing.T) {
	t.Parallel()
	cfg, warns, err := ParseRelay("t.toml", []byte(relayWithHome(`["udp/10000-10999", "tcp+udp/20000-21999"]`)+"max_udp_sockets = 2100\n"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range warns {
		got = append(got, w.String())
	}
	want := []string{
		`t.toml:9: peer "home" (peer[0]).ports[1]: tcp+udp/20000-21999 needs 4000 public UDP sockets (2 bind addresses), more than the peer's 2100 (max_udp_sockets); it will be refused: narrow it or raise the cap`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("warnings:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if n := cfg.UDPSockets(cfg.Peers[0].Ports); n != 6000 {
		t.Errorf("UDPSockets = %d, want 6000", n)
	}
}

// Overlaps inside one peer's ports are harmless, so a warning, with the line.
func TestRelayPeerOverlapWarns(t *testing.T) {
	t.Parallel()
	_, warns, err := ParseRelay("t.toml", []byte(relayWithHome(`["tcp/400-500", "tcp+udp/443", "udp/443"]`)))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range warns {
		got = append(got, w.String())
	}
	want := []string{
		`t.toml:9: peer "home" (peer[0]).ports[1]: tcp/443 is already in this peer's ports (tcp/400-500); list each port once`,
		`t.toml:9: peer "home" (peer[0]).ports[2]: udp/443 is already in this peer's ports (tcp+udp/443); list each port once`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("warnings:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestKeyFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, mode os.FileMode) {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(testPriv+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // not subject to umask
			t.Fatal(err)
		}
	}
	write("private.key", 0o600)
	write("open.key", 0o644)
	uplink := func(file string) string {
		return `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key_file = "` + file + `"
address = "10.77.0.2"
`
	}
	tests := []struct {
		name, file string
		warning    string
	}{
		{"absolute", filepath.Join(dir, "private.key"), ""},
		{"relative to the config", "private.key", ""},
		{"world readable", "open.key", `natbox.toml:4: uplink.private_key_file: key file "` + filepath.Join(dir, "open.key") + `" is readable by every user; chmod 600 it`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, warns, err := ParseAt(filepath.Join(dir, "natbox.toml"), []byte(uplink(tt.file)), clock)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Uplinks[0].PrivateKey.String() != testPriv {
				t.Errorf("private key not loaded from the file: %v", cfg.Uplinks[0].PrivateKey)
			}
			var got []string
			for _, w := range warns {
				got = append(got, strings.TrimPrefix(w.String(), dir+"/"))
			}
			if strings.Join(got, "\n") != tt.warning {
				t.Errorf("warnings %q, want %q", got, tt.warning)
			}
		})
	}
}

func mustKey(t *testing.T, s string) Key {
	t.Helper()
	k, err := ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// A v4-in-v6 tunnel address is the IPv4 one: stored unmapped, so every
// comparison (reload, WireGuard allowed IPs) sees one address.
func TestRelayTunnelAddressesAreUnmapped(t *testing.T) {
	t.Parallel()
	src := strings.Replace(relayWithHome(`[]`), `"10.77.0.2"`, `"::ffff:10.77.0.2"`, 1)
	src = strings.Replace(src, `"10.77.0.1"`, `"::ffff:10.77.0.1"`, 1)
	cfg, _, err := ParseRelay("t.toml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Peers[0].Address; got != netip.MustParseAddr("10.77.0.2") {
		t.Errorf("peer address = %s, want 10.77.0.2", got)
	}
	if got := cfg.Relay.Address; got != netip.MustParseAddr("10.77.0.1") {
		t.Errorf("relay address = %s, want 10.77.0.1", got)
	}
}

// The relay's default socket is not the appliance's, and the clients that
// find a natbox through a config file know which one a relay file means.
func TestRelayDefaultAdminSocket(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	relay := filepath.Join(dir, "relay.toml")
	if err := os.WriteFile(relay, []byte(relayWithHome(`[]`)), 0o600); err != nil {
		t.Fatal(err)
	}
	appliance := filepath.Join(dir, "natbox.toml")
	if err := os.WriteFile(appliance, []byte("[tun]\naddresses = [\"203.0.113.10/32\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := AdminSocketOf(relay); got != DefaultRelayAdminSocket {
		t.Errorf("AdminSocketOf(relay config) = %q, want %q", got, DefaultRelayAdminSocket)
	}
	if got := AdminSocketOf(appliance); got != DefaultAdminSocket {
		t.Errorf("AdminSocketOf(appliance config) = %q, want %q", got, DefaultAdminSocket)
	}
	for path, want := range map[string]string{relay: DefaultRelayAdminSocket, appliance: DefaultAdminSocket} {
		if a, err := LoadAdmin(path); err != nil || a.Socket != want {
			t.Errorf("LoadAdmin(%s) = %+v, %v; want socket %q", filepath.Base(path), a, err, want)
		}
	}
	// LoadAdmin validates the whole file, as the kind it is.
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte(relayBase+"max_session = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadAdmin(bad)
	if want := bad + `:4: relay: unknown key "max_session"; did you mean "max_sessions"?`; err == nil || err.Error() != want {
		t.Errorf("LoadAdmin(bad relay config) = %v, want %s", err, want)
	}
}
