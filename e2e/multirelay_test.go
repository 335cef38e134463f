//go:build linux

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/admin"
)

// Two relays: the carrier-grade NAT topology of relay_test.go with a second
// relay namespace, inet2, behind its own ISP uplink and client link:
//
//	client c1 198.18.3.2/24 <-> inet2 i1 198.18.3.1/24
//	                            inet2 i0 198.18.1.1/24 <-> isp p2 198.18.1.2/24
//
// The appliance has one [[uplink]] per relay and registers the same ports
// with both; the client can reach the LAN service through either public
// address (as two DNS records would give it).
const relay2PublicIP = "198.18.1.1"

// isp2Ruleset is ispRuleset for the second upstream link.
const isp2Ruleset = `table ip cgnat2 {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 100.64.0.0/10 oifname "p2" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "p2" ct state established,related accept
		iifname "p2" drop
	}
}
`

// TestTwoRelays: one appliance, two independent relays. A relay that is
// killed leaves the service reachable through the other, and once it is
// started again it serves again without anything done to the appliance.
func TestTwoRelays(t *testing.T) {
	r := newRelayLab(t)
	inet2 := r.netns("inet2")
	r.link(r.client, "c1", "198.18.3.2/24", inet2, "i1", "198.18.3.1/24")
	r.link(inet2, "i0", relay2PublicIP+"/24", r.isp, "p2", "198.18.1.2/24")
	r.client.must("ip", "route", "add", "198.18.1.0/24", "via", "198.18.3.1")
	r.isp.must("nft", "-f", r.writeFile("isp2.nft", isp2Ruleset, 0o644))

	sockDir := filepath.Join(r.dir, "run")
	if err := os.Mkdir(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sockDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	homeKey, homePub := r.genKey("home")
	relayCfg := func(name, ip string) (cfg, pub string) {
		key, pub := r.genKey(name)
		return r.writeFile(name+".toml", fmt.Sprintf(`[relay]
listen = "%[1]s:%[2]d"
private_key_file = %[3]q
address = "100.96.0.1"
public_bind = ["%[1]s"]

[admin]
socket = "%[4]s/%[5]s.sock"

[[peer]]
name = "home"
public_key = %[6]q
address = "100.96.0.2"
ports = ["tcp/%[7]d"]
`, ip, relayWGPort, key, sockDir, name, homePub, relayTCPPort), 0o644), pub
	}
	cfgA, pubA := relayCfg("relay-a", relayPublicIP)
	cfgB, pubB := relayCfg("relay-b", relay2PublicIP)
	homeSock := filepath.Join(sockDir, "home.sock")
	homeCfg := r.writeFile("home.toml", fmt.Sprintf(`[[uplink]]
relay = "%[1]s:%[3]d"
relay_public_key = %[4]q
private_key_file = %[6]q
address = "100.96.0.2"
keepalive = "2s"

[[uplink]]
relay = "%[2]s:%[3]d"
relay_public_key = %[5]q
private_key_file = %[6]q
address = "100.96.0.2"
keepalive = "2s"

[limits]
shutdown_grace = "1s"

[admin]
socket = %[7]q

[[mapping]]
name = "web"
protocol = "tcp"
listen = "%[8]d"
target = "%[9]s:7010"
proxy_protocol = "v2"
`, relayPublicIP, relay2PublicIP, relayWGPort, pubA, pubB, homeKey, homeSock, relayTCPPort, lanIP), 0o644)

	check := r.home.run(natboxBin, "check", "-c", homeCfg)
	if check.code != 0 {
		t.Fatalf("natbox check %s: %s", homeCfg, check)
	}
	for _, ip := range []string{relayPublicIP, relay2PublicIP} {
		if want := fmt.Sprintf("uplink %s:%d: relay key ", ip, relayWGPort); !strings.Contains(check.stdout, want) {
			t.Errorf("natbox check does not list the uplink to %s:\n%s", ip, check.stdout)
		}
	}

	servers := r.lan.start("lan-servers", toolBin, "serve", "-tcp-whoami", ":7010")
	servers.waitOutput("ready", 10*time.Second)
	relayA := startUnprivileged(r.inet, "relay-a", "relay", "-c", cfgA)
	relayB := startUnprivileged(inet2, "relay-b", "relay", "-c", cfgB)
	home := startUnprivileged(r.home, "home", "run", "-c", homeCfg)

	whoami := func(ip string) func() error {
		return func() error {
			res := r.client.tool("tcp-whoami", "-addr", fmt.Sprintf("%s:%d", ip, relayTCPPort), "-timeout", "2s")
			if err := errResult(res); err != nil {
				return err
			}
			// The client's own address on the link toward that relay.
			want := relayClientIP
			if ip == relay2PublicIP {
				want = "198.18.3.2"
			}
			if field(res.stdout, "proxy") != "v2" || addrOf(field(res.stdout, "src")) != want {
				return fmt.Errorf("lan service saw %q, want proxy=v2 src=%s:*", res.stdout, want)
			}
			return nil
		}
	}
	// uplinkStates is each uplink's state, by relay, as natbox status --json shows it.
	uplinkStates := func() (map[string]string, error) {
		st, err := adminStatus(t, homeSock)
		if err != nil {
			return nil, err
		}
		out := make(map[string]string, len(st.Uplinks))
		for _, u := range st.Uplinks {
			out[u.Relay] = u.State
		}
		return out, nil
	}
	wgA, wgB := fmt.Sprintf("%s:%d", relayPublicIP, relayWGPort), fmt.Sprintf("%s:%d", relay2PublicIP, relayWGPort)
	waitStates := func(what string, timeout time.Duration, wantA, wantB string, watch ...*proc) {
		t.Helper()
		eventually(t, what, timeout, func() error {
			got, err := uplinkStates()
			if err != nil {
				return err
			}
			if len(got) != 2 || got[wgA] != wantA || got[wgB] != wantB {
				return fmt.Errorf("uplink states %v, want %s %s, %s %s", got, wgA, wantA, wgB, wantB)
			}
			return nil
		}, watch...)
	}

	took := eventually(t, "tcp through relay a", 30*time.Second, whoami(relayPublicIP), relayA, relayB, home, servers)
	t.Logf("through relay a after %v", took.Round(time.Millisecond))
	eventually(t, "tcp through relay b", 30*time.Second, whoami(relay2PublicIP), relayA, relayB, home, servers)
	waitStates("both uplinks registered", 10*time.Second, admin.UplinkRegistered, admin.UplinkRegistered, home)
	if out := r.home.run(natboxBin, "status", "--socket", homeSock); out.code != 0 ||
		!strings.Contains(out.stdout, "uplinks: 2 of 2 relays registered") {
		t.Errorf("natbox status: %s", out)
	}

	t.Run("relay b killed: relay a keeps serving", func(t *testing.T) {
		relayB.signal(syscall.SIGKILL)
		if _, err := relayB.wait(10 * time.Second); err != nil {
			t.Fatal(err)
		}
		if err := whoami(relay2PublicIP)(); err == nil {
			t.Fatal("tcp through relay b works with relay b killed")
		}
		for i := range 5 {
			if err := whoami(relayPublicIP)(); err != nil {
				t.Fatalf("tcp through relay a, attempt %d, with relay b down: %v", i, err)
			}
		}
		// The appliance notices within its control ping timeout (30 s).
		waitStates("the appliance to see relay b down", 60*time.Second, admin.UplinkRegistered, "connecting", home, relayA)
		if err := whoami(relayPublicIP)(); err != nil {
			t.Fatalf("tcp through relay a after the appliance saw relay b down: %v", err)
		}
		if out := r.home.run(natboxBin, "status", "--socket", homeSock); !strings.Contains(out.stdout, "uplinks: 1 of 2 relays registered") {
			t.Errorf("natbox status with relay b down: %s", out)
		}
	})

	t.Run("relay b restarted: serves again without touching the appliance", func(t *testing.T) {
		relayB2 := startUnprivileged(inet2, "relay-b2", "relay", "-c", cfgB)
		took := eventually(t, "tcp through the restarted relay b", 90*time.Second, whoami(relay2PublicIP), relayA, relayB2, home)
		t.Logf("relay b serves again %v after its restart", took.Round(time.Millisecond))
		waitStates("both uplinks registered again", 10*time.Second, admin.UplinkRegistered, admin.UplinkRegistered, home)
		if err := whoami(relayPublicIP)(); err != nil {
			t.Fatalf("tcp through relay a after relay b returned: %v", err)
		}
		for _, p := range []*proc{home, relayB2, relayA} {
			p.signal(syscall.SIGTERM)
			if code, err := p.wait(15 * time.Second); err != nil || code != 0 {
				t.Errorf("%s: exit %d after SIGTERM (%v); want 0", p.name, code, err)
			}
		}
	})
}
