package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/natbox/natbox/conf"
)

func TestCheckValidExample(t *testing.T) {
	const example = "../../examples/natbox.toml"
	r := natbox(t, "", "check", "-c", example)
	if r.code != exitOK {
		t.Fatalf("check of the example: %v", r)
	}
	header := regexp.MustCompile(`(?m)^NAME\s+PROTO\s+LISTEN\s+TARGET\s+ALLOW\s+INGRESS\s+OWNER\s+REVIEW_BY\s+STATE$`)
	if !header.MatchString(r.stdout) {
		t.Fatalf("no mapping table header in:\n%s", r.stdout)
	}
	cfg, _, err := conf.Load(example)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range cfg.Mappings {
		row := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(m.Name) + `\s+` + regexp.QuoteMeta(m.Protocol.String()) +
			`\s+` + regexp.QuoteMeta(m.Listen.String()) + `\s+` + regexp.QuoteMeta(m.Target.String()) + `\s`)
		if !row.MatchString(r.stdout) {
			t.Errorf("no row for mapping %q (%s %s -> %s) in:\n%s", m.Name, m.Protocol, m.Listen, m.Target, r.stdout)
		}
	}
	if want := fmt.Sprintf("ok: %s: %d mapping(s)", example, len(cfg.Mappings)); !strings.Contains(r.stdout, want) {
		t.Fatalf("stdout lacks %q:\n%s", want, r.stdout)
	}
	for _, want := range []string{
		"sessions: 100000 in all, tcp 100000, udp 40000\n",
		"per source and mapping: tcp 256, udp 256, 100 new/s burst 200; own: game (tcp 256, udp 16, 100 new/s burst 200), dns (tcp 32, udp 256, 500 new/s burst 1000)\n",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, r.stdout)
		}
	}
}

// TestCheckRelayShowsPeerQuotas: natbox check on the example relay config
// shows each peer's quotas in force, its own or the [relay] default, and
// what its UDP allowances cost in public sockets and memory.
func TestCheckRelayShowsPeerQuotas(t *testing.T) {
	r := natbox(t, "", "check", "-c", "../../examples/relay.toml")
	if r.code != exitOK {
		t.Fatalf("check of the example relay: %v", r)
	}
	for _, row := range []string{
		`(?m)^PEER\s+ADDRESS\s+PORTS\s+SESSIONS\s+UDP\s+INFLIGHT\s+NEW/S\s+PER_SOURCE\s+NEW/S/SOURCE$`,
		`(?m)^home\s+100\.96\.0\.2\s+tcp/443,udp/10000-10100\s+10000\s+4000\s+256\s+1000\s+256\s+100$`,
		`(?m)^office\s+10\.77\.0\.3\s+tcp/8443,tcp\+udp/5060\s+20000\s+8000\s+256\s+1000\s+256\s+100$`,
		// udp/10000-10100 and tcp+udp/5060 on two bind addresses, about 52 KiB each.
		`(?m)^PEER\s+SOCKETS\s+MAX_UDP_SOCKETS\s+MEMORY$`,
		`(?m)^home\s+202\s+2048\s+10\.3 MiB$`,
		`(?m)^office\s+2\s+2048\s+0\.1 MiB$`,
		`(?m)^all peers: 204 sockets \(10\.4 MiB\), relay max_udp_sockets 8192$`,
	} {
		if !regexp.MustCompile(row).MatchString(r.stdout) {
			t.Errorf("no line matching %s in:\n%s", row, r.stdout)
		}
	}
}

func TestCheckReportsEveryErrorWithItsLine(t *testing.T) {
	path := writeConfig(t, "bad.toml", `[tun]
addresses = ["198.51.100.1/32"]

[[mapping]]
name = "web"
protocol = "tcp"
listen = "70000"
target = "127.0.0.1:8080"

[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "2222"
target = "127.0.0.1:22"
idle_timout = "5m"

[[mapping]]
name = "dns"
protocol = "udp"
listen = "53"
target = "127.0.0.1:5353"
idle_timeout = "soon"
`)
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitUsage {
		t.Fatalf("check of a config with 3 errors: %v", r)
	}
	if r.stdout != "" {
		t.Fatalf("an invalid config printed a table:\n%s", r.stdout)
	}
	for _, want := range []string{
		path + `:7: mapping "web" (mapping[0]).listen: port 70000 is out of range`,
		path + `:15: mapping "ssh" (mapping[1]): unknown key "idle_timout"; did you mean "idle_timeout"?`,
		path + `:22: mapping "dns" (mapping[2]).idle_timeout: "soon" is not a duration`,
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if n := strings.Count(r.stderr, path+":"); n != 3 {
		t.Fatalf("%d FILE:LINE lines, want 3:\n%s", n, r.stderr)
	}
	if !strings.Contains(r.stderr, "3 problem(s)") {
		t.Fatalf("no problem count in:\n%s", r.stderr)
	}
}

func TestCheckMissingFile(t *testing.T) {
	r := natbox(t, "", "check", "-c", "/nonexistent/natbox.toml")
	if r.code == exitOK || !strings.Contains(r.stderr, "/nonexistent/natbox.toml") {
		t.Fatalf("check of a missing file: %v", r)
	}
}

// An admin HTTP listener whose token file is missing would stop natbox run;
// check finds it first, as a config problem.
func TestCheckMissingTokenFile(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	path := writeConfig(t, "natbox.toml", `[tun]
addresses = ["198.51.100.1/32"]

[admin]
listen = "0.0.0.0:9108"
token_file = "`+tokenFile+`"
`)
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitUsage || !strings.Contains(r.stderr, path+": admin.token_file") || !strings.Contains(r.stderr, "create it") {
		t.Fatalf("check with a missing token file: %v", r)
	}
	if err := os.WriteFile(tokenFile, []byte("s3cret-token-of-some-length\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := natbox(t, "", "check", "-c", path); r.code != exitOK {
		t.Fatalf("check with the token file in place: %v", r)
	}
}

func TestUsageErrorsExit2WithAHint(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []string // in stderr
	}{
		{"unknown command", []string{"frobnicate"}, []string{`unknown command "frobnicate"`, "natbox --help"}},
		{"misspelled command", []string{"stauts"}, []string{`unknown command "stauts"`, `"status"`}},
		{"unknown global flag", []string{"--bogus"}, []string{"-bogus", "natbox --help"}},
		{"unknown command flag", []string{"check", "--bogus"}, []string{"-bogus", "natbox check --help"}},
		{"missing flag value", []string{"check", "-c"}, []string{"-c", "natbox check --help"}},
		{"bad demo port", []string{"demo", "--once", "--port", "70000"}, []string{"--port 70000"}},
		{"bad log level", []string{"demo", "--once", "--log-level", "loud"}, []string{`"loud"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := natbox(t, "", tt.args...)
			if r.code != exitUsage {
				t.Fatalf("natbox %s: %v", strings.Join(tt.args, " "), r)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr lacks %q: %v", w, r)
				}
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {}} {
		r := natbox(t, "", args...)
		if r.code != exitOK || !strings.Contains(r.stdout, "COMMANDS:") {
			t.Fatalf("natbox %v: %v", args, r)
		}
		for _, c := range newApp(nil, nil).Commands {
			if !strings.Contains(r.stdout, c.Name) {
				t.Errorf("natbox %v does not list %q", args, c.Name)
			}
		}
	}
}

func TestEveryCommandHelpMentionsItsFlags(t *testing.T) {
	for _, c := range newApp(nil, nil).Commands {
		for _, args := range [][]string{{c.Name, "--help"}, {"help", c.Name}} {
			r := natbox(t, "", args...)
			if r.code != exitOK {
				t.Fatalf("natbox %v: %v", args, r)
			}
			if !strings.Contains(r.stdout, c.Usage) {
				t.Errorf("natbox %v lacks the command's usage %q:\n%s", args, c.Usage, r.stdout)
			}
			for _, f := range c.Flags {
				if name := f.Names()[0]; !strings.Contains(r.stdout, "--"+name) {
					t.Errorf("natbox %v does not mention --%s:\n%s", args, name, r.stdout)
				}
			}
		}
	}
	// The shared flags really are on the commands that need them.
	need := map[string][]string{
		"run": {"config", "log-level"}, "check": {"config"}, "relay": {"config", "log-level"},
		"demo": {"port", "once"}, "status": {"config", "socket", "json", "web"}, "sessions": {"socket", "mapping", "json"},
		"reload": {"socket"}, "doctor": {"config", "timeout"},
	}
	for _, c := range newApp(nil, nil).Commands {
		for _, name := range need[c.Name] {
			if !hasFlag(c, name) {
				t.Errorf("%s has no --%s", c.Name, name)
			}
		}
	}
}

func hasFlag(c *cli.Command, name string) bool {
	for _, f := range c.Flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return false
}

func TestGenkeyPubkeyRoundTrip(t *testing.T) {
	gen := natbox(t, "", "genkey")
	if gen.code != exitOK {
		t.Fatalf("genkey: %v", gen)
	}
	priv, err := conf.ParseKey(strings.TrimSpace(gen.stdout))
	if err != nil {
		t.Fatalf("genkey printed %q: %v", gen.stdout, err)
	}
	if again := natbox(t, "", "genkey"); again.stdout == gen.stdout {
		t.Fatal("two genkey runs printed the same key")
	}
	pub := natbox(t, gen.stdout, "pubkey")
	if pub.code != exitOK {
		t.Fatalf("pubkey: %v", pub)
	}
	if got, want := strings.TrimSpace(pub.stdout), priv.Public().String(); got != want {
		t.Fatalf("pubkey = %q, want %q", got, want)
	}
	bad := natbox(t, "not a key\n", "pubkey")
	if bad.code != exitUsage || !strings.Contains(bad.stderr, "genkey") {
		t.Fatalf("pubkey of garbage: %v", bad)
	}
}

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		r := natbox(t, "", args...)
		if r.code != exitOK || !strings.Contains(r.stdout, version) || !strings.HasPrefix(r.stdout, "natbox ") {
			t.Fatalf("natbox %v: %v", args, r)
		}
	}
}

// A relay config is recognised by its [relay] table and loaded as natbox
// relay loads it: check prints the relay's public key and every peer's tunnel
// address and ports instead of calling [relay] an unknown key.
func TestCheckRelayExample(t *testing.T) {
	const example = "../../examples/relay.toml"
	r := natbox(t, "", "check", "-c", example)
	if r.code != exitOK {
		t.Fatalf("check of the relay example: %v", r)
	}
	cfg, _, err := conf.LoadRelay(example)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("relay: wireguard %s, tunnel address %s, public key %s\n",
		cfg.Relay.Listen, cfg.Relay.Address, cfg.Relay.PrivateKey.Public())
	if !strings.Contains(r.stdout, want) {
		t.Fatalf("stdout lacks %q:\n%s", want, r.stdout)
	}
	if len(cfg.Peers) == 0 {
		t.Fatal("the relay example has no peers")
	}
	for _, p := range cfg.Peers {
		ports := make([]string, len(p.Ports))
		for i, s := range p.Ports {
			ports[i] = s.String()
		}
		row := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(p.Name) + `\s+` + regexp.QuoteMeta(p.Address.String()) +
			`\s+` + regexp.QuoteMeta(strings.Join(ports, ",")) + `\s+` + regexp.QuoteMeta(p.PublicKey.String()) + `$`)
		if !row.MatchString(r.stdout) {
			t.Errorf("no row for peer %q in:\n%s", p.Name, r.stdout)
		}
	}
	if want := fmt.Sprintf("ok: %s: relay config, %d peer(s), 0 warning(s)", example, len(cfg.Peers)); !strings.Contains(r.stdout, want) {
		t.Fatalf("stdout lacks %q:\n%s", want, r.stdout)
	}
}

// The [[peer]] tables alone mark a relay config, so a missing [relay] table
// is reported as such rather than as an unknown key "peer".
func TestCheckRelayWithoutRelayTable(t *testing.T) {
	path := writeConfig(t, "relay.toml", `[[peer]]
name = "home"
public_key = "yZUZKbuCSZ4FC4s8CsN5TFecmNcqXpVO4A6f4wUTxmw="
address = "10.77.0.2"
`)
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitUsage || !strings.Contains(r.stderr, "relay.address: address is required") || strings.Contains(r.stderr, "unknown key") {
		t.Fatalf("check of a relay config without [relay]: %v", r)
	}
}

func TestCheckRelayReportsEveryErrorWithItsLine(t *testing.T) {
	path := writeConfig(t, "relay.toml", `[relay]
private_key = "OPUJiCYO76vpxPMOnwKvirCGC8YnqmVCYSIoT5N/ME0="
address = "10.77.0.1"
listen = "51820"

[[peer]]
name = "home"
public_key = "yZUZKbuCSZ4FC4s8CsN5TFecmNcqXpVO4A6f4wUTxmw="
address = "10.77.0.2"
ports = ["tcp/443"]

[[peer]]
name = "office"
public_key = "vy5dwlz/pj80EBiof6odA+0YCxlQsqB4vQ+SkggT2Es="
address = "10.77.0.3"
ports = ["tcp/400-500"]
`)
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitUsage {
		t.Fatalf("check of a relay config with 2 errors: %v", r)
	}
	if r.stdout != "" {
		t.Fatalf("an invalid relay config printed a summary:\n%s", r.stdout)
	}
	for _, want := range []string{
		path + `:4: relay.listen: "51820" is not host:port`,
		path + `:16: peer "office" (peer[1]).ports[0]: tcp/443 is already allowed to peer "home" (line 6); give each port to one peer`,
	} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if n := strings.Count(r.stderr, path+":"); n != 2 || !strings.Contains(r.stderr, "2 problem(s)") {
		t.Fatalf("want 2 FILE:LINE problems:\n%s", r.stderr)
	}
}

// natbox relay refuses to start when its admin listener has no token; check
// says so first, as it does for an appliance.
func TestCheckRelayMissingTokenFile(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	path := writeConfig(t, "relay.toml", `[relay]
private_key = "OPUJiCYO76vpxPMOnwKvirCGC8YnqmVCYSIoT5N/ME0="
address = "10.77.0.1"

[admin]
listen = "0.0.0.0:9109"
token_file = "`+tokenFile+`"
`)
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitUsage || !strings.Contains(r.stderr, path+": admin.token_file") {
		t.Fatalf("check of a relay config with a missing token file: %v", r)
	}
	if err := os.WriteFile(tokenFile, []byte("s3cret-token-of-some-length\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := natbox(t, "", "check", "-c", path); r.code != exitOK || !strings.Contains(r.stdout, "relay config, 0 peer(s)") {
		t.Fatalf("check of the relay config with the token file in place: %v", r)
	}
}

// The kind of config comes from its tables, not its name: an appliance
// config named relay.toml is still checked as an appliance.
func TestCheckKindFromTablesNotName(t *testing.T) {
	data, err := os.ReadFile("../../examples/natbox-uplink.toml")
	if err != nil {
		t.Fatal(err)
	}
	path := writeConfig(t, "relay.toml", string(data))
	r := natbox(t, "", "check", "-c", path)
	if r.code != exitOK || !strings.Contains(r.stdout, "mapping(s)") || strings.Contains(r.stdout, "relay config") {
		t.Fatalf("check of an appliance config named relay.toml: %v", r)
	}
}

// TestCheckListsEachUplink: natbox check on a config with two relays prints
// one line per uplink, in config order.
func TestCheckListsEachUplink(t *testing.T) {
	const example = "../../examples/natbox-two-relays.toml"
	r := natbox(t, "", "check", "-c", example)
	if r.code != exitOK {
		t.Fatalf("check of the example: %v", r)
	}
	cfg, _, err := conf.Load(example)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Uplinks) != 2 {
		t.Fatalf("the example has %d uplinks, want 2", len(cfg.Uplinks))
	}
	last := -1
	for _, u := range cfg.Uplinks {
		want := fmt.Sprintf("uplink %s: relay key %s, tunnel address %s (relay %s), keepalive 25s, mtu 1420 (up to 32000 where the path probe passes)\n",
			u.Relay, u.RelayPublicKey, u.Address, u.RelayAddress)
		i := strings.Index(r.stdout, want)
		if i < 0 || i < last {
			t.Errorf("stdout lacks %q after the previous uplink:\n%s", want, r.stdout)
		}
		last = i
	}
}
