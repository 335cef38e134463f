//go:build linux

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/admin"
)

// Operations (issue 4) against a running binary: natbox status, sessions and
// reload through the admin socket, asserted against real traffic.

// adminStatus runs natbox status --json against a socket.
func adminStatus(t *testing.T, sock string) (admin.Status, error) {
	t.Helper()
	var st admin.Status
	r := runCmd(nil, natboxBin, "status", "--socket", sock, "--json")
	if r.code != 0 {
		return st, fmt.Errorf("natbox status: %s", r)
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		return st, fmt.Errorf("natbox status --json: %v: %s", err, r.stdout)
	}
	return st, nil
}

// adminSessions runs natbox sessions --json against a socket.
func adminSessions(t *testing.T, sock, mapping string) ([]admin.Session, error) {
	t.Helper()
	args := []string{"sessions", "--socket", sock, "--json"}
	if mapping != "" {
		args = append(args, "--mapping", mapping)
	}
	r := runCmd(nil, append([]string{natboxBin}, args...)...)
	if r.code != 0 {
		return nil, fmt.Errorf("natbox sessions: %s", r)
	}
	var ss []admin.Session
	if err := json.Unmarshal([]byte(r.stdout), &ss); err != nil {
		return nil, fmt.Errorf("natbox sessions --json: %v: %s", err, r.stdout)
	}
	return ss, nil
}

func findMapping(st admin.Status, name string) admin.Mapping {
	for _, m := range st.Mappings {
		if m.Name == name {
			return m
		}
	}
	return admin.Mapping{}
}

// waitSession waits until the mapping lists a live session from client.
func waitSession(t *testing.T, sock, mapping, client, target string, watch ...*proc) {
	t.Helper()
	eventually(t, "session of "+client+" listed", 10*time.Second, func() error {
		ss, err := adminSessions(t, sock, mapping)
		if err != nil {
			return err
		}
		for _, s := range ss {
			if s.Client == client && (target == "" || s.Target == target) && s.Mapping == mapping {
				return nil
			}
		}
		return fmt.Errorf("no session from %s to %s in %+v", client, target, ss)
	}, watch...)
}

// holdLocal returns the client address a tcp-hold process printed.
func holdLocal(t *testing.T, p *proc) string {
	t.Helper()
	p.waitOutput("connected local=", 10*time.Second)
	_, after, _ := strings.Cut(p.output(), "connected local=")
	return strings.Fields(after)[0]
}

// withoutMapping removes the [[mapping]] table named name from a config.
func withoutMapping(cfg, name string) string {
	blocks := strings.Split(cfg, "\n[[mapping]]\n")
	kept := blocks[:1]
	for _, b := range blocks[1:] {
		if !strings.HasPrefix(b, fmt.Sprintf("name = %q\n", name)) {
			kept = append(kept, b)
		}
	}
	return strings.Join(kept, "\n[[mapping]]\n")
}

func TestOpsGateway(t *testing.T) {
	g := newGatewayLab(t)
	g.startServers()
	nb := g.startNatbox()
	sock := filepath.Join(g.dir, "gw.sock")
	cfgPath := filepath.Join(g.dir, "gw.toml")
	baseCfg := gatewayConfig(sock)
	pub := func(port int) string { return fmt.Sprintf("%s:%d", gwPublicIP, port) }

	t.Run("status counts the bytes, sessions and refusals of real traffic", func(t *testing.T) {
		before, err := adminStatus(t, sock)
		if err != nil {
			t.Fatal(err)
		}
		const size = 123457
		if r := g.client.tool("tcp-echo", "-addr", pub(7000), "-size", fmt.Sprint(size)); r.code != 0 {
			t.Fatalf("tcp echo: %s", r)
		}
		if r := g.client.tool("tcp-connect", "-addr", pub(7020)); r.code != 3 {
			t.Fatalf("denied mapping: want refused, got %s", r)
		}
		if r := g.client.tool("tcp-connect", "-addr", pub(7050)); r.code != 3 {
			t.Fatalf("unmapped port: want refused, got %s", r)
		}
		b0, d0 := findMapping(before, "echo"), findMapping(before, "denied")
		eventually(t, "status reflects the traffic", 10*time.Second, func() error {
			st, err := adminStatus(t, sock)
			if err != nil {
				return err
			}
			e, d := findMapping(st, "echo"), findMapping(st, "denied")
			var problems []string
			if got := e.SessionsOpened - b0.SessionsOpened; got != 1 {
				problems = append(problems, fmt.Sprintf("echo sessions_opened +%d, want +1", got))
			}
			if got := e.BytesIn - b0.BytesIn; got != size {
				problems = append(problems, fmt.Sprintf("echo bytes_in +%d, want +%d", got, size))
			}
			if got := e.BytesOut - b0.BytesOut; got != size {
				problems = append(problems, fmt.Sprintf("echo bytes_out +%d, want +%d", got, size))
			}
			if e.SessionsActive != 0 {
				problems = append(problems, fmt.Sprintf("echo sessions_active %d, want 0", e.SessionsActive))
			}
			if got := d.Refusals["denied"] - d0.Refusals["denied"]; got != 1 {
				problems = append(problems, fmt.Sprintf("denied refusals[denied] +%d, want +1 (%v)", got, d.Refusals))
			}
			// The kernel's TUN counters: the echo's bytes entered natbox through
			// the TUN (in) and its replies left through it (out).
			switch tun, tun0 := st.TUN, before.TUN; {
			case tun == nil || tun0 == nil:
				problems = append(problems, "status has no tun section")
			case !tun.Up || tun.TxQueueLen != 2000 || tun.Error != "":
				problems = append(problems, fmt.Sprintf("tun %+v: want up with txqueuelen 2000", *tun))
			case tun.BytesIn-tun0.BytesIn < size || tun.BytesOut-tun0.BytesOut < size:
				problems = append(problems, fmt.Sprintf("tun bytes in +%d out +%d, want >= %d each (the echo's payload)",
					tun.BytesIn-tun0.BytesIn, tun.BytesOut-tun0.BytesOut, size))
			case tun.PacketsIn-tun0.PacketsIn < 3 || tun.PacketsOut-tun0.PacketsOut < 3:
				problems = append(problems, fmt.Sprintf("tun packets in +%d out +%d, want at least a handshake's each way",
					tun.PacketsIn-tun0.PacketsIn, tun.PacketsOut-tun0.PacketsOut))
			}
			// The TUN's netstack handed the three connection attempts to the
			// forwarder and answered the two refused ones with RST.
			ns, ns0 := st.Netstack["tun"], before.Netstack["tun"]
			if req, rej := ns.Counters["tcp_requests"]-ns0.Counters["tcp_requests"], ns.Counters["tcp_rejected"]-ns0.Counters["tcp_rejected"]; req < 3 || rej < 2 {
				problems = append(problems, fmt.Sprintf("netstack tun tcp_requests +%d tcp_rejected +%d, want >= 3 and >= 2", req, rej))
			}
			if st.Refusals["no_match"] <= before.Refusals["no_match"] {
				problems = append(problems, fmt.Sprintf("refusals[no_match] %d, want > %d", st.Refusals["no_match"], before.Refusals["no_match"]))
			}
			if len(problems) > 0 {
				return fmt.Errorf("%s", strings.Join(problems, "; "))
			}
			return nil
		}, nb)
		r := runCmd(nil, natboxBin, "status", "--socket", sock)
		if r.code != 0 || !strings.Contains(r.stdout, "echo") || !strings.Contains(r.stdout, "limited") || !strings.Contains(r.stdout, "tun natbox0, up") {
			t.Errorf("natbox status (table): %s", r)
		}
	})

	t.Run("sessions list the live session with the client address", func(t *testing.T) {
		hold := g.client.start("hold", toolBin, "tcp-hold", "-addr", pub(7000))
		client := holdLocal(t, hold)
		waitSession(t, sock, "echo", client, gwServerIP+":7000", nb, hold)
		r := runCmd(nil, natboxBin, "sessions", "--socket", sock)
		if r.code != 0 || !strings.Contains(r.stdout, client) {
			t.Errorf("natbox sessions (table) does not show %s: %s", client, r)
		}
		hold.signal(syscall.SIGTERM)
		hold.wait(10 * time.Second)
	})

	t.Run("reload keeps unchanged sessions, closes removed ones, refuses invalid files", func(t *testing.T) {
		keep := g.client.start("keep", toolBin, "tcp-hold", "-addr", pub(7000), "-ping", "50ms")
		gone := g.client.start("gone", toolBin, "tcp-hold", "-addr", pub(7030), "-ping", "50ms")
		holdLocal(t, keep)
		holdLocal(t, gone)

		added := withoutMapping(baseCfg, "limited") + fmt.Sprintf(`
[[mapping]]
name = "added"
protocol = "tcp"
listen = "7060"
target = "%s:7000"
`, gwServerIP)
		writeConfig(t, cfgPath, added)
		r := runCmd(nil, natboxBin, "reload", "--socket", sock)
		if r.code != 0 || !strings.Contains(r.stdout, "added") || !strings.Contains(r.stdout, "limited") {
			t.Fatalf("natbox reload: want exit 0 naming added and limited, got %s", r)
		}
		reloadedAt := time.Now()
		// A removed mapping must stop exposing its service: its session dies.
		if code, err := gone.wait(3 * time.Second); err != nil || code == 0 {
			t.Errorf("session of the removed mapping: exit %d (%v); want it closed within a second", code, err)
		} else {
			t.Logf("removed mapping's session closed %v after the reload returned", time.Since(reloadedAt).Round(time.Millisecond))
		}
		if r := g.client.tool("tcp-connect", "-addr", pub(7030)); r.code != 3 {
			t.Errorf("removed mapping still accepts: %s", r)
		}
		if r := g.client.tool("tcp-echo", "-addr", pub(7060), "-size", "10000"); r.code != 0 {
			t.Errorf("added mapping: %s", r)
		}

		// An invalid file changes nothing and names its line.
		broken := added + "\n[[mapping]]\nname = \"broken\"\nprotocol = \"tcp\"\nlisten = \"70000\"\ntarget = \"10.77.0.2:1\"\n"
		badLine := strings.Count(broken[:strings.Index(broken, `listen = "70000"`)], "\n") + 1
		writeConfig(t, cfgPath, broken)
		r = runCmd(nil, natboxBin, "reload", "--socket", sock)
		if want := fmt.Sprintf("gw.toml:%d:", badLine); r.code != 2 || !strings.Contains(r.stderr, want) {
			t.Errorf("reload of an invalid file: want exit 2 naming %s, got %s", want, r)
		}
		if r := g.client.tool("tcp-echo", "-addr", pub(7060), "-size", "10000"); r.code != 0 {
			t.Errorf("added mapping after a refused reload: %s", r)
		}

		// SIGHUP reloads too.
		writeConfig(t, cfgPath, withoutMapping(added, "added"))
		nb.signal(syscall.SIGHUP)
		eventually(t, "mapping removed by SIGHUP refuses", 10*time.Second, func() error {
			if r := g.client.tool("tcp-connect", "-addr", pub(7060)); r.code != 3 {
				return fmt.Errorf("still served: %s", r)
			}
			return nil
		}, nb)

		if keep.exited() {
			t.Fatalf("session of the unchanged mapping died during the reloads:\n%s", keep.output())
		}
		keep.signal(syscall.SIGTERM)
		if code, err := keep.wait(10 * time.Second); err != nil || code != 0 {
			t.Errorf("session of the unchanged mapping: exit %d (%v):\n%s", code, err, keep.output())
		}
	})

	t.Run("sigterm exits 0", func(t *testing.T) {
		nb.signal(syscall.SIGTERM)
		if code, err := nb.wait(15 * time.Second); err != nil || code != 0 {
			t.Fatalf("natbox: exit %d (%v) after SIGTERM; want 0", code, err)
		}
	})
}

// checkRelayOps asserts what natbox status and sessions show on both sides of
// a working relay: registered ports, a recent handshake, and the real client
// address of a live session through the relay. hold is a tcp-hold through the
// relay to the appliance's mapping named mapping.
func checkRelayOps(t *testing.T, homeSock, relaySock, mapping string, hold *proc, wantPorts []string) {
	t.Helper()
	client := holdLocal(t, hold)
	waitSession(t, homeSock, mapping, client, "", hold)

	st, err := adminStatus(t, homeSock)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Uplinks) != 1 {
		t.Fatalf("appliance status has %d uplinks, want 1", len(st.Uplinks))
	}
	up := st.Uplinks[0]
	if up.LastHandshake.IsZero() {
		t.Error("appliance status: no handshake recorded")
	}
	for _, p := range wantPorts {
		if !slices.Contains(up.Registered, p) {
			t.Errorf("appliance status: registered %v lacks %s", up.Registered, p)
		}
	}
	rst, err := adminStatus(t, relaySock)
	if err != nil {
		t.Fatal(err)
	}
	if rst.Relay == nil || len(rst.Relay.Peers) != 1 || rst.Relay.Peers[0].Name != "home" {
		t.Fatalf("relay status peers: %+v", rst.Relay)
	}
	for _, p := range wantPorts {
		if !slices.Contains(rst.Relay.Peers[0].Registered, p) {
			t.Errorf("relay status: peer registered %v lacks %s", rst.Relay.Peers[0].Registered, p)
		}
	}
}

func writeConfig(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
