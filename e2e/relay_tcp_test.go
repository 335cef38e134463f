//go:build linux

package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// udpBlockRuleset makes the ISP drop every UDP datagram its subscribers
// send (a hotel or corporate network that allows only TCP).
const udpBlockRuleset = `table ip udpblock {
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		iifname "p1" meta l4proto udp drop
	}
}
`

// TestRelayTCPFallback: in the CGNAT topology with outbound UDP dropped, an
// appliance with the default transport ("auto") reaches the relay over
// TLS on TCP/443 and serves public clients within 30 s; doctor says so;
// once UDP passes again the uplink moves back to UDP by itself.
func TestRelayTCPFallback(t *testing.T) {
	r := newRelayLab(t)
	sockDir := filepath.Join(r.dir, "run")
	if err := os.Mkdir(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sockDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	// natbox relay runs as nobody: let it bind 443 in its namespace only.
	r.inet.must("sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=443")
	r.isp.must("nft", "-f", r.writeFile("udpblock.nft", udpBlockRuleset, 0o644))

	relayKey, relayPub := r.genKey("relay")
	homeKey, homePub := r.genKey("home")
	relayCfg := r.writeFile("relay.toml", fmt.Sprintf(`[log]
level = "debug"

[relay]
listen = "%[1]s:%[2]d"
tcp_listen = "%[1]s:443"
private_key_file = %[3]q
address = "100.96.0.1"
public_bind = ["%[1]s"]

[admin]
socket = "%[4]s/relay.sock"

[[peer]]
name = "home"
public_key = %[5]q
address = "100.96.0.2"
ports = ["tcp/%[6]d"]
`, relayPublicIP, relayWGPort, relayKey, sockDir, homePub, relayTCPPort), 0o644)
	// No relay_tcp and no transport: the defaults (relay's host, port 443;
	// "auto") are what is tested.
	homeCfg := r.writeFile("home.toml", fmt.Sprintf(`[log]
level = "debug"

[uplink]
relay = "%[1]s:%[2]d"
relay_public_key = %[3]q
private_key_file = %[4]q
address = "100.96.0.2"
keepalive = "2s"

[limits]
shutdown_grace = "1s"

[admin]
socket = "%[5]s/home.sock"

[[mapping]]
name = "web"
protocol = "tcp"
listen = "%[6]d"
target = "%[7]s:7010"
proxy_protocol = "v2"
`, relayPublicIP, relayWGPort, relayPub, homeKey, sockDir, relayTCPPort, lanIP), 0o644)

	servers := r.lan.start("lan-servers", toolBin, "serve", "-tcp-whoami", ":7010")
	servers.waitOutput("ready", 10*time.Second)
	relay := startUnprivileged(r.inet, "relay", "relay", "-c", relayCfg)
	relay.waitOutput("relay tcp transport listening", 10*time.Second)
	home := startUnprivileged(r.home, "home", "run", "-c", homeCfg)
	started := time.Now()

	tcpAddr := fmt.Sprintf("%s:%d", relayPublicIP, relayTCPPort)
	whoami := func() (string, error) {
		res := r.client.tool("tcp-whoami", "-addr", tcpAddr, "-timeout", "2s")
		return res.stdout, errResult(res)
	}
	homeSock := filepath.Join(sockDir, "home.sock")
	transport := func() (string, error) {
		st, err := adminStatus(t, homeSock)
		if err != nil {
			return "", err
		}
		if len(st.Uplinks) == 0 {
			return "", errors.New("no uplink in status")
		}
		return st.Uplinks[0].Transport, nil
	}

	var line string
	eventually(t, "tcp through the relay with udp blocked", 30*time.Second, func() (err error) {
		line, err = whoami()
		return err
	}, relay, home, servers)
	t.Logf("reachable over tcp/443 %v after start: %s", time.Since(started).Round(time.Millisecond), strings.TrimSpace(line))
	if field(line, "proxy") != "v2" || addrOf(field(line, "src")) != relayClientIP {
		t.Errorf("lan service saw %q; want proxy=v2 src=%s:*", line, relayClientIP)
	}
	if tr, err := transport(); err != nil || tr != "tcp" {
		t.Fatalf("uplink transport %q (%v), want tcp", tr, err)
	}
	st, err := adminStatus(t, filepath.Join(sockDir, "relay.sock"))
	if err != nil || st.Relay == nil || st.Relay.Stats.Gauges["tcp_streams"] != 1 {
		t.Fatalf("relay status: %v %+v", err, st.Relay)
	}
	doc := r.home.run(natboxBin, "doctor", "-c", homeCfg, "--timeout", "1s")
	if !strings.Contains(doc.stdout, "UDP to the relay is blocked; using TCP/443") {
		t.Errorf("natbox doctor does not say the uplink is on TCP/443:\n%s", doc.stdout)
	}

	// An appliance pinned to another relay key is refused over TLS, and the
	// real one keeps working.
	_, otherPub := r.genKey("other")
	wrongCfg := r.writeFile("wrong.toml", strings.NewReplacer(relayPub, otherPub, "home.sock", "wrong.sock",
		`keepalive = "2s"`, "keepalive = \"2s\"\ntransport = \"tcp\"").Replace(readFile(t, homeCfg)), 0o644)
	wrong := startUnprivileged(r.home, "wrong", "run", "-c", wrongCfg)
	eventually(t, "the wrong key refused", 20*time.Second, func() error {
		st, err := adminStatus(t, filepath.Join(sockDir, "wrong.sock"))
		if err == nil && (len(st.Uplinks) == 0 || !strings.Contains(st.Uplinks[0].TransportError, "did not prove uplink.relay_public_key")) {
			err = fmt.Errorf("uplinks %+v", st.Uplinks)
		}
		return err
	}, relay, home, wrong)
	st, err = adminStatus(t, filepath.Join(sockDir, "relay.sock"))
	if err != nil || st.Relay.Stats.Reasons["tcp_refusals"]["handshake"] == 0 || st.Relay.Stats.Counters["tcp_accepted"] != 1 {
		t.Errorf("relay after the wrong key: %v %+v", err, st.Relay.Stats)
	}
	wrong.signal(os.Interrupt)
	wrong.wait(15 * time.Second)
	if _, err := whoami(); err != nil {
		t.Fatalf("the real appliance after the refused one: %v", err)
	}

	r.isp.must("nft", "delete", "table", "ip", "udpblock")
	unblocked := time.Now()
	eventually(t, "the uplink back on udp", 90*time.Second, func() error {
		tr, err := transport()
		if err == nil && tr != "udp" {
			err = fmt.Errorf("transport %s", tr)
		}
		return err
	}, relay, home)
	t.Logf("back on udp %v after unblocking", time.Since(unblocked).Round(time.Millisecond))
	eventually(t, "tcp through the relay over udp", 15*time.Second, func() (err error) {
		line, err = whoami()
		return err
	}, relay, home)
	eventually(t, "the relay's tcp stream closed", 15*time.Second, func() error {
		st, err := adminStatus(t, filepath.Join(sockDir, "relay.sock"))
		if err == nil && st.Relay.Stats.Gauges["tcp_streams"] != 0 {
			err = errors.New("tcp stream still open")
		}
		return err
	}, relay, home)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
