//go:build linux

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Carrier-grade NAT topology:
//
//	client                 inet (natbox relay)            isp (CGNAT)                  home (appliance)          lan
//	c0 198.18.2.2/24 <-> i1 198.18.2.1/24                                              h1 10.77.0.1/24 <-> l0 10.77.0.2/24
//	                       i0 198.18.0.1/24 <-> p0 198.18.0.2/24
//	                                            p1 100.64.0.1/24 <-> h0 100.64.0.2/24
//
// isp masquerades 100.64.0.0/10 out of p0 and drops anything new coming in on
// p0, so home has no inbound reachability; inet has no route to 100.64.0.0/10
// at all. The appliance keeps a WireGuard uplink to the relay; the client
// reaches the LAN services only through the relay's public ports. natbox runs
// as nobody on both sides: relay mode needs no privilege.
const (
	relayClientIP = "198.18.2.2"
	relayPublicIP = "198.18.0.1"
	relayWGPort   = 51820
	lanIP         = "10.77.0.2"
	// Public ports on the relay (also the appliance's listen ports).
	relayTCPPort  = 8080
	relayUDPPort  = 9000
	relayEchoPort = 8082
	nobody        = "65534"
)

// ispRuleset is carrier-grade NAT in nftables: masquerade the subscribers,
// admit only replies from the outside.
const ispRuleset = `table ip cgnat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 100.64.0.0/10 oifname "p0" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "p0" ct state established,related accept
		iifname "p0" drop
	}
}
`

type relayLab struct {
	*lab
	client, inet, isp, home, lan *netns
}

func newRelayLab(t *testing.T) *relayLab {
	l := newLab(t)
	r := &relayLab{lab: l,
		client: l.netns("client"), inet: l.netns("inet"), isp: l.netns("isp"),
		home: l.netns("home"), lan: l.netns("lan")}
	l.link(r.client, "c0", relayClientIP+"/24", r.inet, "i1", "198.18.2.1/24")
	l.link(r.inet, "i0", relayPublicIP+"/24", r.isp, "p0", "198.18.0.2/24")
	l.link(r.isp, "p1", "100.64.0.1/24", r.home, "h0", "100.64.0.2/24")
	l.link(r.home, "h1", "10.77.0.1/24", r.lan, "l0", lanIP+"/24")
	r.client.must("ip", "route", "add", "default", "via", "198.18.2.1")
	r.home.must("ip", "route", "add", "default", "via", "100.64.0.1")
	r.lan.must("ip", "route", "add", "default", "via", "10.77.0.1")
	r.isp.must("nft", "-f", l.writeFile("isp.nft", ispRuleset, 0o644))
	return r
}

// genKey makes a private key file owned by nobody (mode 600) with natbox
// genkey and returns its path and the public key from natbox pubkey.
func (r *relayLab) genKey(name string) (path, public string) {
	r.t.Helper()
	priv := runCmd(nil, natboxBin, "genkey")
	if priv.code != 0 {
		r.t.Fatalf("natbox genkey: %s", priv)
	}
	pub := runCmd([]byte(priv.stdout), natboxBin, "pubkey")
	if pub.code != 0 {
		r.t.Fatalf("natbox pubkey: %s", pub)
	}
	path = r.writeFile(name+".key", priv.stdout, 0o600)
	if err := os.Chown(path, 65534, 65534); err != nil {
		r.t.Fatal(err)
	}
	return path, strings.TrimSpace(pub.stdout)
}

// startUnprivileged runs natbox as nobody inside ns.
func startUnprivileged(ns *netns, name string, args ...string) *proc {
	return ns.start(name, append([]string{"setpriv", "--reuid", nobody, "--regid", nobody,
		"--clear-groups", "--inh-caps=-all", natboxBin}, args...)...)
}

func TestRelayCGNAT(t *testing.T) {
	r := newRelayLab(t)
	sockDir := filepath.Join(r.dir, "run")
	if err := os.Mkdir(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sockDir, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	relayKey, relayPub := r.genKey("relay")
	homeKey, homePub := r.genKey("home")

	relayCfg := r.writeFile("relay.toml", fmt.Sprintf(`[log]
level = "debug"

[relay]
listen = "%[1]s:%[2]d"
private_key_file = %[3]q
address = "100.96.0.1"
public_bind = ["%[1]s"]

[admin]
socket = "%[4]s/relay.sock"

[[peer]]
name = "home"
public_key = %[5]q
address = "100.96.0.2"
ports = ["tcp/%[6]d", "udp/%[7]d", "tcp/%[8]d"]
`, relayPublicIP, relayWGPort, relayKey, sockDir, homePub, relayTCPPort, relayUDPPort, relayEchoPort), 0o644)

	homeCfg := r.writeFile("home.toml", fmt.Sprintf(`[log]
level = "debug"

[uplink]
relay = "%[1]s:%[2]d"
relay_public_key = %[3]q
private_key_file = %[4]q
address = "100.96.0.2"
relay_address = "100.96.0.1"
keepalive = "2s"

[limits]
shutdown_grace = "1s"

[admin]
socket = "%[5]s/home.sock"

[[mapping]]
name = "web"
protocol = "tcp"
listen = "%[6]d"
target = "%[8]s:7010"
proxy_protocol = "v2"

[[mapping]]
name = "game"
protocol = "udp"
listen = "%[7]d"
target = "%[8]s:7011"
proxy_protocol = "v2"

[[mapping]]
name = "echo"
protocol = "tcp"
listen = "%[9]d"
target = "%[8]s:7000"
`, relayPublicIP, relayWGPort, relayPub, homeKey, sockDir, relayTCPPort, relayUDPPort, lanIP, relayEchoPort), 0o644)

	if res := r.home.run(natboxBin, "check", "-c", homeCfg); res.code != 0 {
		t.Fatalf("natbox check %s: %s", homeCfg, res)
	}

	servers := r.lan.start("lan-servers", toolBin, "serve",
		"-tcp-whoami", ":7010", "-udp-whoami", ":7011", "-tcp-echo", ":7000")
	servers.waitOutput("ready", 10*time.Second)
	relay := startUnprivileged(r.inet, "relay", "relay", "-c", relayCfg)
	home := startUnprivileged(r.home, "home", "run", "-c", homeCfg)

	tcpAddr := fmt.Sprintf("%s:%d", relayPublicIP, relayTCPPort)
	udpAddr := fmt.Sprintf("%s:%d", relayPublicIP, relayUDPPort)
	whoamiTCP := func() (string, error) {
		res := r.client.tool("tcp-whoami", "-addr", tcpAddr, "-timeout", "2s")
		return res.stdout, errResult(res)
	}
	whoamiUDP := func(lport string) (string, error) {
		res := r.client.tool("udp", "-addr", udpAddr, "-msg", "hi", "-lport", lport, "-timeout", "2s")
		return res.stdout, errResult(res)
	}
	checkTCP := func(t *testing.T, line string) {
		t.Helper()
		if field(line, "proxy") != "v2" || addrOf(field(line, "src")) != relayClientIP {
			t.Errorf("lan service saw %q; want proxy=v2 src=%s:*", line, relayClientIP)
		}
		// The destination port is the public one; the address may be the
		// relay's public address or the appliance's tunnel address.
		if dst, err := netip.ParseAddrPort(field(line, "dst")); err != nil || dst.Port() != relayTCPPort {
			t.Errorf("proxy header dst = %q; want port %d", field(line, "dst"), relayTCPPort)
		}
	}
	checkUDP := func(t *testing.T, line, lport string) {
		t.Helper()
		if want := relayClientIP + ":" + lport; field(line, "proxy") != "v2" || field(line, "src") != want {
			t.Errorf("lan service saw %q; want proxy=v2 src=%s", line, want)
		}
	}

	// Sanity of the topology: without the relay nothing reaches the home box.
	if res := r.client.tool("tcp-connect", "-addr", "100.64.0.2:22", "-timeout", "1s"); res.code == 0 {
		t.Fatalf("the client reached the CGNAT address directly: %s", res)
	}

	var line string
	took := eventually(t, "tcp through the relay", 30*time.Second, func() (err error) {
		line, err = whoamiTCP()
		return err
	}, relay, home, servers)
	t.Logf("tcp through the relay after %v: %s", took.Round(time.Millisecond), strings.TrimSpace(line))

	t.Run("tcp reaches the lan with the client address in proxy v2", func(t *testing.T) { checkTCP(t, line) })

	t.Run("udp reaches the lan with the client address and port in proxy v2", func(t *testing.T) {
		var line string
		eventually(t, "udp through the relay", 15*time.Second, func() (err error) {
			line, err = whoamiUDP("42000")
			return err
		}, relay, home)
		checkUDP(t, line, "42000")
	})

	t.Run("echo through the relay", func(t *testing.T) {
		res := r.client.tool("tcp-echo", "-addr", fmt.Sprintf("%s:%d", relayPublicIP, relayEchoPort), "-size", fmt.Sprint(1<<20), "-timeout", "20s")
		if res.code != 0 {
			t.Fatalf("tcp echo through the relay: %s", res)
		}
	})

	t.Run("status and sessions show the uplink and the real client", func(t *testing.T) {
		hold := r.client.start("hold", toolBin, "tcp-hold", "-addr", fmt.Sprintf("%s:%d", relayPublicIP, relayEchoPort))
		checkRelayOps(t, filepath.Join(sockDir, "home.sock"), filepath.Join(sockDir, "relay.sock"), "echo", hold,
			[]string{fmt.Sprintf("tcp/%d", relayTCPPort), fmt.Sprintf("udp/%d", relayUDPPort), fmt.Sprintf("tcp/%d", relayEchoPort)})
		hold.signal(syscall.SIGTERM)
		hold.wait(10 * time.Second)
	})

	t.Run("unregistered port on the relay is refused", func(t *testing.T) {
		res := r.client.tool("tcp-connect", "-addr", relayPublicIP+":8081", "-timeout", "5s")
		if res.code != 3 {
			t.Errorf("connect to a port nobody registered: want refused, got %s", res)
		}
	})

	t.Run("cutting and restoring the isp link recovers on its own", func(t *testing.T) {
		r.isp.must("ip", "link", "set", "p1", "down")
		cutAt := time.Now()
		// While the link is down nothing can come through; prove the cut is real.
		if out, err := whoamiTCP(); err == nil {
			t.Fatalf("tcp through the relay still works with the isp link down: %s", out)
		}
		// Hold the cut past a few keepalives so the tunnel has to notice.
		if rest := 6*time.Second - time.Since(cutAt); rest > 0 {
			time.Sleep(rest)
		}
		r.isp.must("ip", "link", "set", "p1", "up")
		took := eventually(t, "tcp through the relay after restoring the link", 60*time.Second, func() (err error) {
			line, err = whoamiTCP()
			return err
		}, relay, home)
		t.Logf("tcp recovered %v after the link came back", took.Round(time.Millisecond))
		checkTCP(t, line)
		var uline string
		eventually(t, "udp through the relay after restoring the link", 30*time.Second, func() (err error) {
			uline, err = whoamiUDP("42001")
			return err
		}, relay, home)
		checkUDP(t, uline, "42001")
	})

	t.Run("a new address behind the nat (a new nat mapping) recovers on its own", func(t *testing.T) {
		// The CGNAT now sees a different inside source, so the relay sees the
		// appliance come from a new public port: WireGuard must roam.
		relaySock := filepath.Join(sockDir, "relay.sock")
		endpoint := func() string {
			st, err := adminStatus(t, relaySock)
			if err != nil || st.Relay == nil || len(st.Relay.Peers) == 0 {
				t.Fatalf("relay status: %v %+v", err, st.Relay)
			}
			return st.Relay.Peers[0].Endpoint
		}
		before := endpoint()
		r.home.must("ip", "addr", "del", "100.64.0.2/24", "dev", "h0")
		r.home.must("ip", "addr", "add", "100.64.0.3/24", "dev", "h0")
		r.home.must("ip", "route", "replace", "default", "via", "100.64.0.1")
		took := eventually(t, "tcp through the relay after the nat rebinding", 60*time.Second, func() (err error) {
			line, err = whoamiTCP()
			return err
		}, relay, home)
		t.Logf("tcp recovered %v after the nat rebinding", took.Round(time.Millisecond))
		if after := endpoint(); after == before {
			t.Errorf("relay still sees the appliance at %s; the rebinding did not change its public endpoint", before)
		} else {
			t.Logf("relay sees the appliance at %s, was %s", after, before)
		}
		checkTCP(t, line)
	})

	t.Run("signals stop both sides with exit 0", func(t *testing.T) {
		for _, stop := range []struct {
			p   *proc
			sig os.Signal
		}{{home, syscall.SIGTERM}, {relay, os.Interrupt}} {
			stop.p.signal(stop.sig)
			if code, err := stop.p.wait(15 * time.Second); err != nil || code != 0 {
				t.Errorf("%s: exit %d after %v (%v); want 0", stop.p.name, code, stop.sig, err)
			}
		}
	})
}
