package conf

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is the fixed "now" of every date-dependent test.
var clock = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

// Keys used in test configs (generated once; examples use others).
const (
	testPriv      = "6EE3t+qJniGEuOMoCEt9KjAdSTJJaufwm7wdMeTCymU="
	testRelayPub  = "WnsgzAtHU7JE51z6U5rtc/C74+npWzImcwWVys/wOnw="
	testRelayPriv = "OPUJiCYO76vpxPMOnwKvirCGC8YnqmVCYSIoT5N/ME0="
	testPeerPub1  = "yZUZKbuCSZ4FC4s8CsN5TFecmNcqXpVO4A6f4wUTxmw="
	testPeerPub2  = "vy5dwlz/pj80EBiof6odA+0YCxlQsqB4vQ+SkggT2Es="
)

const tunBase = `[tun]
addresses = ["203.0.113.10/32", "2001:db8::10/128"]
`

const uplinkTable = `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
address = "10.77.0.2"
`

// markedLine returns the line of src that carries the marker "# <-", or 0.
func markedLine(t *testing.T, src string) int {
	t.Helper()
	n := 0
	for i, l := range strings.Split(src, "\n") {
		if strings.HasSuffix(strings.TrimSpace(l), "# <-") {
			if n != 0 {
				t.Fatalf("two markers in config")
			}
			n = i + 1
		}
	}
	return n
}

// wantOneError checks that err is an *Errors holding exactly the problem
// want, at the marked line of src.
func wantOneError(t *testing.T, src string, err error, want string) {
	t.Helper()
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error = %v (%T), want *Errors", err, err)
	}
	prefix := "t.toml: "
	if n := markedLine(t, src); n > 0 {
		prefix = fmt.Sprintf("t.toml:%d: ", n)
	}
	if got := errs.Error(); got != prefix+want {
		t.Errorf("error:\n got %s\nwant %s", got, prefix+want)
	}
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	badKeyFile := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(badKeyFile, []byte("not a key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missingKeyFile := filepath.Join(dir, "missing.key")

	tests := []struct {
		name string
		src  string
		want string
	}{
		// Leaf values, from UnmarshalText.
		{"listen port out of range", tunBase + `
[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "70000" # <-
target = "10.0.0.5:22"`, `mapping "ssh" (mapping[0]).listen: port 70000 is out of range; use 1-65535`},
		{"listen integer out of range", tunBase + `
[[mapping]]
name = "ssh"
protocol = "tcp"
listen = 0 # <-
target = "10.0.0.5:22"`, `mapping "ssh" (mapping[0]).listen: port 0 is out of range; use 1-65535`},
		{"listen backwards range", tunBase + `
[[mapping]]
name = "rtp"
protocol = "udp"
listen = "10100-10000" # <-
target = "10.0.0.5:10000"`, `mapping "rtp" (mapping[0]).listen: port range "10100-10000" runs backwards; write 10000-10100`},
		{"listen not a port", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "https" # <-
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).listen: "https" is not a port; write a number from 1 to 65535 or a range like "10000-10100"`},
		{"listen bad address", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "203.0.113.300:443" # <-
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).listen: listen address "203.0.113.300" is not an IP address; write an IP address, e.g. "198.51.100.1:443", or only the port to listen on every address`},
		{"listen ipv6 without brackets", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "2001:db8::10:443" # <-
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).listen: "2001:db8::10:443" is ambiguous; put IPv6 addresses in brackets, e.g. "[2001:db8::10]:443"`},
		{"target without host", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "443" # <-`, `mapping "web" (mapping[0]).target: target "443" has no host; write host:port, e.g. "10.0.0.5:443" or "[fd00::5]:443"`},
		{"target bad host", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "web server:443" # <-`, `mapping "web" (mapping[0]).target: target host "web server" is neither an IP address nor a host name; use an IP address or a DNS name`},
		{"protocol unknown", tunBase + `
[[mapping]]
name = "web"
protocol = "tpc" # <-
listen = "443"
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).protocol: unknown protocol "tpc"; use "tcp", "udp" or "tcp+udp"`},
		{"idle timeout zero", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
idle_timeout = "0s" # <-`, `mapping "web" (mapping[0]).idle_timeout: duration "0s" must be greater than zero; use a positive duration, e.g. "5s"`},
		{"idle timeout without unit", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
idle_timeout = 30 # <-`, `mapping "web" (mapping[0]).idle_timeout: "30" is not a duration; write a duration with a unit, e.g. "5s", "2m" or "2h"`},
		{"allow not a prefix", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
allow = ["10.0.0/8"] # <-`, `mapping "web" (mapping[0]).allow[0]: "10.0.0/8" is not an address prefix; write address/bits, e.g. "203.0.113.0/24"`},
		{"allow bare address", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
allow = ["198.51.100.0/24", "198.51.100.7"] # <-`, `mapping "web" (mapping[0]).allow[1]: "198.51.100.7" has no prefix length; write "198.51.100.7/32"`},
		{"created not a date", tunBase + `
[[mapping]]
name = "web"
owner = "me"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
created = "yesterday" # <-`, `mapping "web" (mapping[0]).created: "yesterday" is not a date; write a date, e.g. 2026-12-31`},
		{"expires a time of day", tunBase + `
[[mapping]]
name = "web"
owner = "me"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
expires = 07:30:00 # <-`, `mapping "web" (mapping[0]).expires: 07:30:00 is a time of day, not a date; write a date, e.g. 2026-12-31`},

		// Types.
		{"string for an integer", tunBase + `
[limits]
max_sessions = "10" # <-`, `limits.max_sessions: "10" is a string; write a whole number`},
		{"string for a boolean", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
enabled = "yes" # <-`, `mapping "web" (mapping[0]).enabled: "yes" is a string; write true or false`},
		{"string instead of array", `[tun]
addresses = "203.0.113.10/32" # <-`, `tun.addresses: "203.0.113.10/32" is a string; write an array, e.g. ["203.0.113.10/32"]`},
		{"float for an integer", tunBase + `mtu = 1500.5 # <-`, `tun.mtu: 1500.5 is a float; write a whole number`},
		{"inline array of mappings", `mapping = [ # <-
  { name = "web", protocol = "tcp", listen = "443", target = "10.0.0.5:443", owner = "o" },
  { name = "dns", protocol = "udp", listen = "53", target = "10.0.0.2:53", ownr = "o" },
]
` + tunBase, `mapping "dns" (mapping[1]): unknown key "ownr"; did you mean "owner"?`},
		{"table instead of array of tables", tunBase + `
[mapping] # <-
name = "web"`, `mapping: the value is a table; write an array of tables (write [[mapping]])`},

		// Unknown keys.
		{"unknown key with suggestion", tunBase + `
[[mapping]]
name = "web"
protcol = "tcp" # <-
listen = "443"
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]): unknown key "protcol"; did you mean "protocol"?`},
		{"unknown key without suggestion", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
colour = "blue" # <-`, `mapping "web" (mapping[0]): unknown key "colour"; remove it`},
		{"unknown table", tunBase + `
[limit] # <-
max_sessions = 10`, `unknown key "limit"; did you mean "limits"?`},
		{"unknown key in tun", `[tun]
adresses = ["203.0.113.10/32"] # <-`, `tun: unknown key "adresses"; did you mean "addresses"?`},

		// Validation.
		{"no ingress", `[log]
level = "info"`, `no ingress is configured; add a [tun] table (gateway mode), an [uplink] table (relay mode), or both`},
		{"log level", tunBase + `
[log]
level = "verbose" # <-`, `log.level: unknown level "verbose"; use "debug", "info", "warn" or "error"`},
		{"log format", tunBase + `
[log]
format = "text" # <-`, `log.format: unknown format "text"; use "console" or "json"`},
		{"tun mtu", `[tun]
addresses = ["203.0.113.10/32"]
mtu = 70000 # <-`, `tun.mtu: mtu 70000 is out of range; use 1280-65535 (1500 for Ethernet)`},
		{"tun mtu below ipv6's minimum", `[tun]
addresses = ["203.0.113.10/32"]
mtu = 576 # <-`, `tun.mtu: mtu 576 is out of range; use 1280-65535 (1500 for Ethernet)`},
		{"tun queues", tunBase + `queues = -1 # <-`, `tun.queues: -1 queues is out of range; use 1-64, or 0 for one per procs (at most 4)`},
		{"tun name too long", `[tun]
addresses = ["203.0.113.10/32"]
name = "natbox-much-too-long" # <-`, `tun.name: "natbox-much-too-long" is not a valid interface name; use 1-15 characters without spaces or slashes, e.g. "natbox0"`},
		{"tun without addresses", `[tun] # <-
mtu = 1500`, `tun.addresses: no addresses; list the public addresses natbox answers on, e.g. addresses = ["203.0.113.10/32"]`},
		{"tun route with host bits", `[tun]
addresses = ["203.0.113.10/32"]
routes = ["203.0.113.10/24"] # <-`, `tun.routes[0]: "203.0.113.10/24" has host bits set; write "203.0.113.0/24"`},
		{"limits negative sessions", tunBase + `
[limits]
max_sessions = -1 # <-`, `limits.max_sessions: -1 is negative; use 0 for unlimited or a positive number`},
		{"limits negative per-source cap", tunBase + `
[limits]
max_udp_sessions_per_source = -1 # <-`, `limits.max_udp_sessions_per_source: -1 is negative; use 0 for unlimited or a positive number (default 256)`},
		{"limits negative tcp pool", tunBase + `
[limits]
max_tcp_sessions = -3 # <-`, `limits.max_tcp_sessions: -3 is negative; use a positive number, or 0 for max_sessions`},
		{"limits tracked sources zero", tunBase + `
[limits]
max_tracked_sources = 0 # <-`, `limits.max_tracked_sources: 0 is not positive; use a positive number (default 65536)`},
		{"limits buffer memory not a size", tunBase + `
[limits]
buffer_memory = "64MB" # <-`, `limits.buffer_memory: "64MB" is not a size; write a size with a binary unit, e.g. "64MiB", "512KiB" or "1GiB"`},
		{"limits buffer memory too small", tunBase + `
[limits]
buffer_memory = "512KiB" # <-`, `limits.buffer_memory: 512KiB is below 1 MiB; use at least "1MiB", or "0" for unbounded`},
		{"limits negative procs", tunBase + `
[limits]
procs = -1 # <-`, `limits.procs: -1 is negative; use a positive number of threads, or 0 for the default (half the CPUs; at least two on a gateway)`},
		{"limits inflight zero", tunBase + `
[limits]
max_inflight_per_source = 0 # <-`, `limits.max_inflight_per_source: 0 is not positive; use a positive number`},
		{"admin socket empty", tunBase + `
[admin]
socket = "" # <-`, `admin.socket: socket is empty; set a path, e.g. /run/natbox/natbox.sock`},
		{"admin listen public without token", tunBase + `
[admin] # <-
listen = "0.0.0.0:9180"`, `admin.token_file: admin.listen "0.0.0.0:9180" is not loopback and has no token; set token_file to a file holding a bearer token, or listen on 127.0.0.1`},
		{"admin listen bad", tunBase + `
[admin]
listen = "9180" # <-`, `admin.listen: "9180" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"mapping without name", tunBase + `
[[mapping]] # <-
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"`, `mapping[0].name: name is required; add name = "web" (lowercase letters, digits, ".", "_", "-")`},
		{"mapping name characters", tunBase + `
[[mapping]]
name = "Web Site" # <-
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"`, `mapping "Web Site" (mapping[0]).name: name "Web Site" has characters that are not allowed; use 1-64 lowercase letters, digits, ".", "_" or "-"`},
		{"mapping name duplicate", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
[[mapping]]
name = "web" # <-
protocol = "tcp"
listen = "80"
target = "10.0.0.5:80"`, `mapping "web" (mapping[1]).name: name "web" is already used by mapping[0] (line 4); give each mapping its own name`},
		{"mapping without protocol", tunBase + `
[[mapping]] # <-
name = "web"
listen = "443"
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).protocol: protocol is required; add protocol = "tcp", "udp" or "tcp+udp"`},
		{"mapping without listen", tunBase + `
[[mapping]] # <-
name = "web"
protocol = "tcp"
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).listen: listen is required; add listen = "443" (or "10000-10100", or "203.0.113.10:443")`},
		{"mapping without target", tunBase + `
[[mapping]] # <-
name = "web"
protocol = "tcp"
listen = "443"`, `mapping "web" (mapping[0]).target: target is required; add target = "10.0.0.5:443"`},
		{"target range size", tunBase + `
[[mapping]]
name = "rtp"
protocol = "udp"
listen = "10000-10100"
target = "10.0.0.5:20000-20010" # <-`, `mapping "rtp" (mapping[0]).target: target range 20000-20010 has 11 ports but listen 10000-10100 has 101; use a range of 101 ports, e.g. "10.0.0.5:20000-20100", or a single start port`},
		{"target start past 65535", tunBase + `
[[mapping]]
name = "rtp"
protocol = "udp"
listen = "10000-10100"
target = "10.0.0.5:65500" # <-`, `mapping "rtp" (mapping[0]).target: target ports from 65500 for 101 listen ports run past 65535; use a start port of at most 65435`},
		{"listen address not on tun", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "203.0.113.99:443" # <-
target = "10.0.0.5:443"`, `mapping "web" (mapping[0]).listen: listen address 203.0.113.99 is not one of tun.addresses; add 203.0.113.99/32 to tun.addresses or listen on one of them`},
		{"allow with host bits", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
allow = ["10.0.0.1/8"] # <-`, `mapping "web" (mapping[0]).allow[0]: "10.0.0.1/8" has host bits set; write "10.0.0.0/8"`},
		{"deny with host bits", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
deny = ["2001:db8::1/32"] # <-`, `mapping "web" (mapping[0]).deny[0]: "2001:db8::1/32" has host bits set; write "2001:db8::/32"`},
		{"mapping max sessions negative", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
max_sessions = -5 # <-`, `mapping "web" (mapping[0]).max_sessions: -5 is negative; use 0 for unlimited or a positive number`},
		{"mapping negative rate", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
new_sessions_per_source_per_second = -1 # <-`, `mapping "web" (mapping[0]).new_sessions_per_source_per_second: -1 is negative; use a positive number, or leave it out to use the [limits] value`},
		{"ingress unknown", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
ingress = ["wan"] # <-`, `mapping "web" (mapping[0]).ingress[0]: unknown ingress "wan"; use "tun" and/or "uplink"`},
		{"ingress not configured", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
ingress = ["tun", "uplink"] # <-`, `mapping "web" (mapping[0]).ingress[1]: ingress "uplink" is not configured; add a [uplink] table or remove "uplink" from ingress`},
		{"proxy protocol v1 with udp", tunBase + `
[[mapping]]
name = "dns"
protocol = "tcp+udp"
listen = "53"
target = "10.0.0.2:53"
proxy_protocol = "v1" # <-`, `mapping "dns" (mapping[0]).proxy_protocol: proxy_protocol v1 cannot carry tcp+udp; use "v2" (v1 carries TCP only)`},
		{"proxy protocol unknown", tunBase + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
proxy_protocol = "v3" # <-`, `mapping "web" (mapping[0]).proxy_protocol: unknown proxy_protocol "v3"; use "v1", "v2" or leave it out`},
		{"expires before created", tunBase + `
[[mapping]]
name = "web"
owner = "me"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"
created = 2026-10-01
expires = 2026-09-01 # <-`, `mapping "web" (mapping[0]).expires: expires 2026-09-01 is before created 2026-10-01; correct one of the two dates`},

		// Uplink.
		{"uplink relay without port", `[uplink]
relay = "relay.example.net" # <-
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
address = "10.77.0.2"`, `uplink.relay: "relay.example.net" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"uplink relay missing", `[uplink] # <-
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
address = "10.77.0.2"`, `uplink.relay: relay is required; set the relay's WireGuard host:port, e.g. relay = "relay.example.net:51820"`},
		{"uplink relay public key missing", `[uplink] # <-
relay = "relay.example.net:51820"
private_key = "` + testPriv + `"
address = "10.77.0.2"`, `uplink.relay_public_key: relay_public_key is required; copy the relay's public key (natbox relay prints it; or wg pubkey < relay.key)`},
		{"uplink bad key is not echoed", `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "c2VjcmV0" # <-
address = "10.77.0.2"`, `uplink.private_key: not a valid key; use 44 base64 characters (32 bytes) as printed by wg genkey or wg pubkey`},
		{"uplink no private key", `[uplink] # <-
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
address = "10.77.0.2"`, `uplink.private_key: a private key is required; set private_key_file (create it with: umask 077; wg genkey > FILE) or private_key`},
		{"uplink both private keys", `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
private_key_file = "/etc/natbox/uplink.key" # <-
address = "10.77.0.2"`, `uplink.private_key_file: both private_key and private_key_file are set; remove private_key or private_key_file`},
		{"uplink key file missing", `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key_file = "` + missingKeyFile + `" # <-
address = "10.77.0.2"`, `uplink.private_key_file: key file "` + missingKeyFile + `" does not exist; create it with: umask 077; wg genkey > ` + missingKeyFile},
		{"uplink key file bad", `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key_file = "` + badKeyFile + `" # <-
address = "10.77.0.2"`, `uplink.private_key_file: key file "` + badKeyFile + `" does not hold a valid key; it must hold one base64 key as printed by wg genkey`},
		{"uplink address missing", `[uplink] # <-
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"`, `uplink.address: address is required; set the tunnel address the relay assigned to this appliance, e.g. address = "10.77.0.2"`},
		{"uplink default relay address is own address", `[uplink] # <-
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
address = "10.77.0.1"`, `uplink.relay_address: relay_address 10.77.0.1 is this appliance's own address; set relay_address to the relay's tunnel address`},
		{"uplink mtu", uplinkTable + `mtu = 100 # <-`, `uplink.mtu: mtu 100 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"uplink max_mtu below mtu", uplinkTable + "mtu = 1420\nmax_mtu = 1400 # <-", `uplink.max_mtu: max_mtu 1400 is out of range; use 1420-65475; max_mtu = mtu turns the path probe off`},
		{"uplink max_mtu over one wireguard datagram", uplinkTable + "max_mtu = 65476 # <-", `uplink.max_mtu: max_mtu 65476 is out of range; use 1420-65475; max_mtu = mtu turns the path probe off`},
		{"uplink mtu over one wireguard datagram", uplinkTable + `mtu = 65535 # <-`, `uplink.mtu: mtu 65535 is out of range; use 1280-65475 (1420 is WireGuard's usual)`},
		{"uplink address ipv6", `[uplink]
relay = "relay.example.net:51820"
relay_public_key = "` + testRelayPub + `"
private_key = "` + testPriv + `"
address = "fd77::2" # <-`, `uplink.address: address fd77::2 is IPv6; tunnel addresses are IPv4; use an IPv4 address such as 10.77.0.2; natbox derives the IPv6 tunnel address from it`},
		{"uplink relay address ipv6", uplinkTable + `relay_address = "fd77::1" # <-`, `uplink.relay_address: address fd77::1 is IPv6; tunnel addresses are IPv4; use an IPv4 address such as 10.77.0.2; natbox derives the IPv6 tunnel address from it`},
		{"uplink transport", uplinkTable + `transport = "tls" # <-`, `uplink.transport: unknown transport "tls"; use "auto" (UDP, TCP when UDP is blocked), "udp" or "tcp"`},
		{"uplink tcp_congestion too long", uplinkTable + `tcp_congestion = "a_congestion_control" # <-`, `uplink.tcp_congestion: "a_congestion_control" is not a congestion control name; name a congestion control the kernel offers (net.ipv4.tcp_available_congestion_control), e.g. "bbr" or "cubic", or "system"`},
		{"uplink loss_fallback without per cent", uplinkTable + `loss_fallback = "0.5" # <-`, `uplink.loss_fallback: loss_fallback "0.5" is not a share of messages; write a share of messages lost above 0 and below 100 %, e.g. "0.01%", or "off"`},
		{"uplink loss_fallback 0", uplinkTable + `loss_fallback = "0%" # <-`, `uplink.loss_fallback: loss_fallback "0%" is not a share of messages; write a share of messages lost above 0 and below 100 %, e.g. "0.01%", or "off"`},
		{"uplink loss_fallback 100", uplinkTable + `loss_fallback = "100%" # <-`, `uplink.loss_fallback: loss_fallback "100%" is not a share of messages; write a share of messages lost above 0 and below 100 %, e.g. "0.01%", or "off"`},
		{"uplink relay_tcp", uplinkTable + `relay_tcp = "relay.example.net" # <-`, `uplink.relay_tcp: "relay.example.net" is not host:port; write host:port, e.g. "relay.example.net:51820" or "[2001:db8::1]:51820"`},
		{"uplink relay_tcp port", uplinkTable + `relay_tcp = "relay.example.net:0" # <-`, `uplink.relay_tcp: port "0" is out of range; use 1-65535`},
		{"uplink v4-in-v6 relay address is own address", uplinkTable + `relay_address = "::ffff:10.77.0.2" # <-`, `uplink.relay_address: relay_address 10.77.0.2 is this appliance's own address; set relay_address to the relay's tunnel address`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, _, err := ParseAt("t.toml", []byte(tt.src), clock)
			if cfg != nil {
				t.Errorf("got a config with an error")
			}
			wantOneError(t, tt.src, err, tt.want)
		})
	}
}

func TestOverlap(t *testing.T) {
	t.Parallel()
	mapping := func(name, proto, listen string, extra ...string) string {
		return fmt.Sprintf("\n[[mapping]]\nname = %q\nowner = \"o\"\nprotocol = %q\nlisten = %q\ntarget = \"10.0.0.5:1000\"\n%s",
			name, proto, listen, strings.Join(extra, "\n"))
	}
	both := tunBase + uplinkTable
	tests := []struct {
		name string
		src  string
		want string // "" means no error
	}{
		{"same port", tunBase + mapping("web", "tcp", "443") + mapping("web2", "tcp", "0.0.0.0:443"),
			`t.toml:15: mapping "web2" (mapping[1]).listen: tcp/0.0.0.0:443 is already used by mapping "web" (line 4); pick another port or address`},
		{"ranges overlap", tunBase + mapping("a", "udp", "10000-10100") + mapping("b", "tcp+udp", "10050-10200"),
			`t.toml:15: mapping "b" (mapping[1]).listen: udp/10050-10100 is already used by mapping "a" (line 4); pick another port or address`},
		{"specific address inside all addresses", tunBase + mapping("a", "tcp", "203.0.113.10:80") + mapping("b", "tcp", "80"),
			`t.toml:15: mapping "b" (mapping[1]).listen: tcp/80 is already used by mapping "a" (line 4); pick another port or address`},
		{"same address", tunBase + mapping("a", "tcp", "[2001:db8::10]:80") + mapping("b", "tcp", "[2001:db8::10]:80-81"),
			`t.toml:15: mapping "b" (mapping[1]).listen: tcp/[2001:db8::10]:80 is already used by mapping "a" (line 4); pick another port or address`},
		{"overlap with the first of several", tunBase + mapping("a", "tcp", "80") + mapping("b", "tcp", "81") + mapping("c", "tcp", "79-81"),
			`t.toml:22: mapping "c" (mapping[2]).listen: tcp/80 is already used by mapping "a" (line 4); pick another port or address`},
		{"different protocols", tunBase + mapping("a", "tcp", "53") + mapping("b", "udp", "53"), ""},
		{"different addresses", "[tun]\naddresses = [\"203.0.113.10/32\", \"203.0.113.11/32\"]\n" + mapping("a", "tcp", "203.0.113.10:80") + mapping("b", "tcp", "203.0.113.11:80"), ""},
		{"v4 wildcard and v6 address", tunBase + mapping("a", "tcp", "0.0.0.0:80") + mapping("b", "tcp", "[2001:db8::10]:80"), ""},
		{"disjoint ports", tunBase + mapping("a", "tcp", "80-89") + mapping("b", "tcp", "90-99"), ""},
		{"disjoint ingresses", both + mapping("a", "tcp", "80", `ingress = ["tun"]`) + mapping("b", "tcp", "80", `ingress = ["uplink"]`), ""},
		{"shared ingress", both + mapping("a", "tcp", "80", `ingress = ["tun"]`) + mapping("b", "tcp", "80"),
			`t.toml:20: mapping "b" (mapping[1]).listen: tcp/80 is already used by mapping "a" (line 9); pick another port or address`},
		{"disabled mapping", tunBase + mapping("a", "tcp", "80", "enabled = false") + mapping("b", "tcp", "80"), ""},
		{"expired mapping", tunBase + mapping("a", "tcp", "80", "expires = 2026-01-01") + mapping("b", "tcp", "80"), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, _, err := ParseAt("t.toml", []byte(tt.src), clock)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("unexpected error:\n%v", err)
				}
				return
			}
			if err == nil || err.Error() != tt.want {
				t.Errorf("error:\n got %v\nwant %s", err, tt.want)
			}
		})
	}
}

// TestLineInThirdMapping checks the line of a key inside the third
// [[mapping]] when the earlier ones have the same key: BurntSushi/toml alone
// would point every one of them at the last table.
func TestLineInThirdMapping(t *testing.T) {
	t.Parallel()
	src := `[tun]
addresses = ["203.0.113.10/32"]

[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"

[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "2222"
target = "10.0.0.5:22"

[[mapping]]
name = "mail"
protocol = "tcp"
listen = "25"
target = "10.0.0.6:25"
max_sessions = -1

[[mapping]]
name = "imap"
protocol = "tcp"
listen = "993"
target = "10.0.0.6:993"
`
	_, _, err := ParseAt("natbox.toml", []byte(src), clock)
	want := `natbox.toml:21: mapping "mail" (mapping[2]).max_sessions: -1 is negative; use 0 for unlimited or a positive number`
	if err == nil || err.Error() != want {
		t.Fatalf("error:\n got %v\nwant %s", err, want)
	}
}

func TestManyErrorsAtOnce(t *testing.T) {
	t.Parallel()
	src := `[tun]
addresses = ["203.0.113.10/32"]
mtu = 9

[limits]
max_sessions = -1

[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"

[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "70000"
target = "10.0.0.5:22"

[[mapping]]
name = "dns"
protcol = "udp"
listen = "53"
target = "10.0.0.2:53"

[[mapping]]
name = "web2"
protocol = "tcp+udp"
listen = "203.0.113.10:443"
target = "10.0.0.7:443"
allow = ["10.0.0.1/8"]
`
	cfg, _, err := ParseAt("natbox.toml", []byte(src), clock)
	if cfg != nil {
		t.Fatal("got a config despite errors")
	}
	want := strings.Join([]string{
		`natbox.toml:3: tun.mtu: mtu 9 is out of range; use 1280-65535 (1500 for Ethernet)`,
		`natbox.toml:6: limits.max_sessions: -1 is negative; use 0 for unlimited or a positive number`,
		`natbox.toml:17: mapping "ssh" (mapping[1]).listen: port 70000 is out of range; use 1-65535`,
		`natbox.toml:22: mapping "dns" (mapping[2]): unknown key "protcol"; did you mean "protocol"?`,
		`natbox.toml:29: mapping "web2" (mapping[3]).listen: tcp/203.0.113.10:443 is already used by mapping "web" (line 8); pick another port or address`,
		`natbox.toml:31: mapping "web2" (mapping[3]).allow[0]: "10.0.0.1/8" has host bits set; write "10.0.0.0/8"`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Fatalf("error:\n got %v\nwant %s", err, want)
	}
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.List) != 6 {
		t.Fatalf("want *Errors with 6 problems, got %#v", err)
	}
	if e := errs.List[2]; e.Path != "natbox.toml" || e.Line != 17 || e.Key != `mapping "ssh" (mapping[1]).listen` ||
		e.Msg != "port 70000 is out of range" || e.Fix != "use 1-65535" {
		t.Errorf("fields of one error: %#v", e)
	}
	var one Error
	if !errors.As(err, &one) || one.Line != 3 {
		t.Errorf("errors.As(err, *Error) = %#v, want the first problem", one)
	}
}

func TestSyntaxError(t *testing.T) {
	t.Parallel()
	src := "[tun]\naddresses = [\"203.0.113.10/32\"]\nmtu = = 1500\n"
	_, _, err := ParseAt("natbox.toml", []byte(src), clock)
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.List) != 1 {
		t.Fatalf("error = %v, want one syntax error", err)
	}
	if e := errs.List[0]; e.Line != 3 || !strings.HasPrefix(e.Error(), "natbox.toml:3: toml syntax: ") {
		t.Errorf("syntax error = %q (line %d), want it at natbox.toml:3", e.Error(), e.Line)
	}
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	src := tunBase + uplinkTable + `
[[mapping]]
name = "web"
protocol = "tcp"
listen = "443"
target = "10.0.0.5:443"

[[mapping]]
name = "rtp"
protocol = "udp"
listen = "10000-10100"
target = "10.0.0.5:10000"

[[mapping]]
name = "dns"
protocol = "tcp+udp"
listen = "53"
target = "10.0.0.2:53"

[[mapping]]
name = "dns-slow"
protocol = "tcp+udp"
listen = "5353"
target = "10.0.0.2:53"
idle_timeout = "30s"
`
	cfg, _, err := ParseAt("t.toml", []byte(src), clock)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log != (Log{Level: "info", Format: "console"}) {
		t.Errorf("log = %+v", cfg.Log)
	}
	if cfg.TUN.Name != "natbox0" || cfg.TUN.MTU != 1500 {
		t.Errorf("tun = %+v", cfg.TUN)
	}
	wantLimits := Limits{
		DialTimeout: Duration(5 * time.Second), MaxInflight: 1024, MaxInflightPerSource: 64,
		MaxInflightPerTarget: 256, MaxSessions: 100000, ShutdownGrace: Duration(5 * time.Second),
		MaxTCPSessions: 100000, MaxUDPSessions: 40000, MaxTCPSessionsPerSource: 256, MaxUDPSessionsPerSource: 256,
		NewSessionsPerSourcePerSecond: 100, MaxTrackedSources: 65536,
		BufferMemory: 32 << 20, MemoryLimit: 256 << 20,
	}
	if cfg.Limits != wantLimits {
		t.Errorf("limits = %+v, want %+v", cfg.Limits, wantLimits)
	}
	if cfg.Admin != (Admin{Socket: "/run/natbox/natbox.sock"}) {
		t.Errorf("admin = %+v", cfg.Admin)
	}
	u := cfg.Uplinks[0]
	if u.Keepalive.D() != 25*time.Second || u.MTU != 1420 || u.RelayAddress.String() != "10.77.0.1" || u.PrivateKey.String() != testPriv ||
		u.Transport != "auto" || u.RelayTCP != "relay.example.net:443" || u.LossFallback != DefaultLossFallback || u.LossFallbackRate != DefaultLossFallbackRate {
		t.Errorf("uplink = %+v", u)
	}
	idle := []struct {
		m         int
		field     time.Duration
		tcp, udp  time.Duration
		enabled   bool
		startLine int
	}{
		{0, 2 * time.Hour, 2 * time.Hour, 2 * time.Hour, true, 9},
		{1, 2 * time.Minute, 2 * time.Minute, 2 * time.Minute, true, 15},
		{2, 0, 2 * time.Hour, 2 * time.Minute, true, 21},
		{3, 30 * time.Second, 30 * time.Second, 30 * time.Second, true, 27},
	}
	for _, w := range idle {
		m := &cfg.Mappings[w.m]
		if m.IdleTimeout.D() != w.field || m.IdleTimeoutFor(TCP) != w.tcp || m.IdleTimeoutFor(UDP) != w.udp {
			t.Errorf("%s: idle_timeout %v, tcp %v, udp %v; want %v, %v, %v", m.Name, m.IdleTimeout, m.IdleTimeoutFor(TCP), m.IdleTimeoutFor(UDP), w.field, w.tcp, w.udp)
		}
		if m.IsEnabled() != w.enabled || m.Line != w.startLine {
			t.Errorf("%s: enabled %v line %d, want %v line %d", m.Name, m.IsEnabled(), m.Line, w.enabled, w.startLine)
		}
	}
	if cfg.Path != "t.toml" {
		t.Errorf("path = %q", cfg.Path)
	}
	if cfg.Digest != sha256.Sum256([]byte(src)) {
		t.Errorf("digest %x is not the SHA-256 of the parsed bytes", cfg.Digest)
	}
}

func TestExplicitZeroLimitIsKept(t *testing.T) {
	t.Parallel()
	cfg, _, err := ParseAt("t.toml", []byte(tunBase+"[limits]\nmax_sessions = 0\n"), clock)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Limits.MaxSessions != 0 || cfg.Limits.MaxInflight != 1024 {
		t.Errorf("limits = %+v, want max_sessions 0 (unlimited) and the other defaults", cfg.Limits)
	}
}

// TestSessionBudgets checks how the per-protocol pools derive from
// max_sessions (a config written before they existed keeps working) and how
// a mapping's per-source keys override [limits].
func TestSessionBudgets(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		limits   string
		tcp, udp int
	}{
		{"defaults", "", 100000, 40000},
		{"only max_sessions, as written before pools", "max_sessions = 1000", 1000, 400},
		{"one pool set", "max_sessions = 1000\nmax_udp_sessions = 100", 1000, 100},
		{"both set", "max_tcp_sessions = 7\nmax_udp_sessions = 9", 7, 9},
		{"unlimited", "max_sessions = 0", 0, 0},
		{"tiny max_sessions", "max_sessions = 1", 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, _, err := ParseAt("t.toml", []byte(tunBase+"[limits]\n"+tt.limits+"\n"), clock)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Limits.MaxTCPSessions != tt.tcp || cfg.Limits.MaxUDPSessions != tt.udp {
				t.Errorf("pools tcp %d udp %d, want %d %d", cfg.Limits.MaxTCPSessions, cfg.Limits.MaxUDPSessions, tt.tcp, tt.udp)
			}
			if tcp, udp := cfg.Limits.SessionPools(); tcp != tt.tcp || udp != tt.udp {
				t.Errorf("SessionPools() = %d, %d after defaults, want %d, %d", tcp, udp, tt.tcp, tt.udp)
			}
		})
	}

	src := tunBase + `[limits]
new_sessions_per_source_burst = 300

[[mapping]]
name = "plain"
protocol = "tcp+udp"
listen = "1000"
target = "10.0.0.5:1000"

[[mapping]]
name = "own"
protocol = "tcp+udp"
listen = "2000"
target = "10.0.0.5:2000"
max_tcp_sessions_per_source = 4
max_udp_sessions_per_source = 5
new_sessions_per_source_per_second = 7

[[mapping]]
name = "own-burst"
protocol = "udp"
listen = "3000"
target = "10.0.0.5:3000"
new_sessions_per_source_burst = 9
`
	cfg, _, err := ParseAt("t.toml", []byte(src), clock)
	if err != nil {
		t.Fatal(err)
	}
	want := []SourceBudget{
		{MaxTCPSessions: 256, MaxUDPSessions: 256, RatePerSecond: 100, Burst: 300},
		{MaxTCPSessions: 4, MaxUDPSessions: 5, RatePerSecond: 7, Burst: 14}, // its own rate: twice it, not the global burst
		{MaxTCPSessions: 256, MaxUDPSessions: 256, RatePerSecond: 100, Burst: 9},
	}
	for i, w := range want {
		if got := cfg.Limits.SourceBudget(&cfg.Mappings[i]); got != w {
			t.Errorf("%s: budget %+v, want %+v", cfg.Mappings[i].Name, got, w)
		}
	}
}

func TestWarnings(t *testing.T) {
	t.Parallel()
	mapping := func(name, listen string, extra ...string) string {
		return fmt.Sprintf("\n[[mapping]]\nname = %q\nprotocol = \"tcp\"\nlisten = %q\ntarget = \"10.0.0.5:1000\"\n%s", name, listen, strings.Join(extra, "\n"))
	}
	const owner = `owner = "ops"`
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"clean", tunBase + mapping("a", "443", owner), nil},
		{"no owner", tunBase + mapping("a", "443"), []string{`t.toml:4: mapping "a" (mapping[0]): no owner; set owner so someone answers for this open port`}},
		{"review overdue", tunBase + mapping("a", "443", owner, "review_by = 2026-11-01"),
			[]string{`t.toml:10: mapping "a" (mapping[0]).review_by: review was due on 2026-11-01; review the mapping and move review_by`}},
		{"review ahead", tunBase + mapping("a", "443", owner, "review_by = 2027-01-01"), nil},
		{"expires soon", tunBase + mapping("a", "443", owner, "expires = 2026-12-04T12:00:00Z"),
			[]string{`t.toml:10: mapping "a" (mapping[0]).expires: expires on 2026-12-04, in 10 days`}},
		{"expires later", tunBase + mapping("a", "443", owner, "expires = 2027-12-04"), nil},
		{"expired", tunBase + mapping("a", "443", owner, `expires = "2026-11-20"`),
			[]string{`t.toml:10: mapping "a" (mapping[0]).expires: expired on 2026-11-20, natbox will not serve it`}},
		{"risky port open to all", tunBase + mapping("a", "3389", owner),
			[]string{`t.toml:7: mapping "a" (mapping[0]).listen: port 3389 (rdp) open to everyone; set allow to the sources that need it, or acknowledge_risk = "why"`}},
		{"risky ports in a range", tunBase + mapping("a", "20-23", owner),
			[]string{`t.toml:7: mapping "a" (mapping[0]).listen: port 21 (ftp), 23 (telnet) open to everyone; set allow to the sources that need it, or acknowledge_risk = "why"`}},
		{"risky port with allow", tunBase + mapping("a", "3389", owner, `allow = ["198.51.100.0/24"]`), nil},
		{"risky port acknowledged", tunBase + mapping("a", "3389", owner, `acknowledge_risk = "vpn-less vendor access, 2fa"`), nil},
		{"risky port disabled", tunBase + mapping("a", "3389", owner, "enabled = false"), nil},
		{"listen address without tun", uplinkTable + mapping("a", "203.0.113.7:443", owner),
			[]string{`t.toml:10: mapping "a" (mapping[0]).listen: listen address 203.0.113.7 is not on tun (no tun ingress serves this mapping), so it will only match flows sent to that exact address`}},
		{"listen on uplink address", uplinkTable + mapping("a", "10.77.0.2:443", owner), nil},
		{"udp pool as large as max_sessions", tunBase + "[limits]\nmax_sessions = 1000\nmax_udp_sessions = 1000\n" + mapping("a", "443", owner),
			[]string{`t.toml:5: limits.max_udp_sessions: max_udp_sessions 1000 leaves TCP no slot of max_sessions 1000 that a UDP flood cannot take; lower it (default 40 % of max_sessions) or raise max_sessions`}},
		{"udp pool below max_sessions", tunBase + "[limits]\nmax_sessions = 1000\nmax_udp_sessions = 999\n" + mapping("a", "443", owner), nil},
		{"udp cap on a tcp mapping", tunBase + mapping("a", "443", owner, "max_udp_sessions_per_source = 5"),
			[]string{`t.toml:10: mapping "a" (mapping[0]).max_udp_sessions_per_source: has no effect: the mapping carries tcp only; remove it`}},
		{"burst below rate", tunBase + "[limits]\nnew_sessions_per_source_per_second = 50\nnew_sessions_per_source_burst = 10\n" + mapping("a", "443", owner),
			[]string{`t.toml:5: limits.new_sessions_per_source_burst: burst 10 is below the rate 50; a source can then never open its rate within one second's bucket`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, warns, err := ParseAt("t.toml", []byte(tt.src), clock)
			if err != nil || cfg == nil {
				t.Fatalf("warnings must not fail the load: %v", err)
			}
			var got []string
			for _, w := range warns {
				got = append(got, w.String())
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("warnings:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestEnabledMappings(t *testing.T) {
	t.Parallel()
	src := tunBase + `
[[mapping]]
name = "on"
owner = "o"
protocol = "tcp"
listen = "80"
target = "10.0.0.5:80"
[[mapping]]
name = "off"
owner = "o"
enabled = false
protocol = "tcp"
listen = "81"
target = "10.0.0.5:81"
[[mapping]]
name = "until-dec"
owner = "o"
protocol = "tcp"
listen = "82"
target = "10.0.0.5:82"
expires = 2026-12-01T00:00:00Z
`
	cfg, _, err := ParseAt("t.toml", []byte(src), clock)
	if err != nil {
		t.Fatal(err)
	}
	names := func(ms []Mapping) string {
		var s []string
		for _, m := range ms {
			s = append(s, m.Name)
		}
		return strings.Join(s, ",")
	}
	if got := names(cfg.EnabledMappings(clock)); got != "on,until-dec" {
		t.Errorf("now: %s", got)
	}
	if got := names(cfg.EnabledMappings(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))); got != "on" {
		t.Errorf("at expiry: %s", got)
	}
}

func TestServesIngress(t *testing.T) {
	t.Parallel()
	gateway := &Config{TUN: &TUN{}}
	both := &Config{TUN: &TUN{}, Uplinks: []Uplink{{}}}
	tests := []struct {
		ingress []string
		cfg     *Config
		tun     bool
		uplink  bool
	}{
		{nil, gateway, true, false},
		{nil, both, true, true},
		{[]string{"uplink"}, both, false, true},
		{[]string{"tun"}, both, true, false},
		{[]string{"uplink"}, gateway, false, false},
	}
	for _, tt := range tests {
		m := Mapping{Ingress: tt.ingress}
		if m.ServesIngress(IngressTUN, tt.cfg) != tt.tun || m.ServesIngress(IngressUplink, tt.cfg) != tt.uplink {
			t.Errorf("ingress %v with %v: tun %v uplink %v, want %v %v", tt.ingress, tt.cfg.Ingresses(),
				m.ServesIngress(IngressTUN, tt.cfg), m.ServesIngress(IngressUplink, tt.cfg), tt.tun, tt.uplink)
		}
	}
}

func TestLoadReadsFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "natbox.toml")
	if err := os.WriteFile(path, []byte(tunBase+"[log]\nlevel = \"loud\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := Load(path)
	if want := path + `:4: log.level: unknown level "loud"; use "debug", "info", "warn" or "error"`; err == nil || err.Error() != want {
		t.Errorf("error:\n got %v\nwant %s", err, want)
	}
}

func TestLoadUnreadableFileIsAConfigError(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "natbox.toml")
	for _, load := range []func(string) error{
		func(p string) error { _, _, err := Load(p); return err },
		func(p string) error { _, _, err := LoadRelay(p); return err },
	} {
		err := load(missing)
		var ce *Errors
		if !errors.As(err, &ce) || len(ce.List) != 1 {
			t.Fatalf("err = %v, want one config error", err)
		}
		want := missing + ": cannot read the config: no such file or directory; create it (start from examples/"
		if !strings.HasPrefix(ce.Error(), want) {
			t.Fatalf("got %q, want prefix %q", ce.Error(), want)
		}
	}
	if got := AdminSocketOf(missing); got != DefaultAdminSocket {
		t.Fatalf("AdminSocketOf(missing) = %q", got)
	}
	bad := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(bad, []byte("[admin]\nsocket = \"/tmp/x.sock\"\n[[mapping]]\nprotcol = 1\n"), 0o600)
	if got := AdminSocketOf(bad); got != "/tmp/x.sock" {
		t.Fatalf("AdminSocketOf(invalid config) = %q, want its [admin] socket", got)
	}
}
