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

// Gateway topology (the shape bench/run.sh sets up too):
//
//	client                       gw (natbox, TUN natbox0)                server
//	c0 198.18.0.2/24 <-veth-> g0 198.18.0.1/24 | g1 10.77.0.1/24 <-veth-> s0 10.77.0.2/24
//
// The client routes 198.51.100.0/24 to the gw, whose kernel routes
// 198.51.100.1/32 into natbox0 (a route natbox installs). The client has no
// route to 10.77.0.0/24: it reaches the server only through natbox.
const (
	gwClientIP = "198.18.0.2"
	gwPublicIP = "198.51.100.1"
	gwServerIP = "10.77.0.2"
)

type gatewayLab struct {
	*lab
	client, gw, server *netns
}

func newGatewayLab(t *testing.T) *gatewayLab {
	l := newLab(t)
	g := &gatewayLab{lab: l, client: l.netns("client"), gw: l.netns("gw"), server: l.netns("server")}
	l.link(g.client, "c0", gwClientIP+"/24", g.gw, "g0", "198.18.0.1/24")
	l.link(g.gw, "g1", "10.77.0.1/24", g.server, "s0", gwServerIP+"/24")
	g.client.must("ip", "route", "add", "198.51.100.0/24", "via", "198.18.0.1")
	g.server.must("ip", "route", "add", "default", "via", "10.77.0.1")
	return g
}

// startServers runs the tool's servers in the server namespace.
func (g *gatewayLab) startServers() *proc {
	p := g.server.start("servers", toolBin, "serve",
		"-tcp-echo", ":7000", "-udp-echo", ":7000",
		"-tcp-whoami", ":7010", "-udp-whoami", ":7011", "-udp-whoami", ":7012",
		"-tcp-whoami", ":7200", "-tcp-whoami", ":7201", "-tcp-whoami", ":7202")
	p.waitOutput("ready", 10*time.Second)
	return p
}

func gatewayConfig(adminSocket string) string {
	return fmt.Sprintf(`[log]
level = "debug"
format = "console"

[tun]
name = "natbox0"
addresses = ["%[1]s/32"]
routes = ["%[1]s/32"]

[limits]
dial_timeout = "2s"
shutdown_grace = "1s"

[admin]
socket = %[3]q

[[mapping]]
name = "echo"
protocol = "tcp"
listen = "7000"
target = "%[2]s:7000"

# UDP sessions expire within seconds, so a test can wait for natbox to be idle.
[[mapping]]
name = "udp-echo"
protocol = "udp"
listen = "7000"
target = "%[2]s:7000"
idle_timeout = "3s"

[[mapping]]
name = "whoami-proxy"
protocol = "tcp"
listen = "7010"
target = "%[2]s:7010"
proxy_protocol = "v2"

[[mapping]]
name = "udp-idle"
protocol = "udp"
listen = "7011"
target = "%[2]s:7011"
idle_timeout = "2s"

[[mapping]]
name = "udp-proxy"
protocol = "udp"
listen = "7012"
target = "%[2]s:7012"
proxy_protocol = "v2"
idle_timeout = "3s"

[[mapping]]
name = "denied"
protocol = "tcp"
listen = "7020"
target = "%[2]s:7000"
deny = ["198.18.0.2/32"]

[[mapping]]
name = "not-allowed"
protocol = "tcp"
listen = "7021"
target = "%[2]s:7000"
allow = ["203.0.113.0/24"]

[[mapping]]
name = "limited"
protocol = "tcp"
listen = "7030"
target = "%[2]s:7000"
max_sessions = 1

[[mapping]]
name = "dead-target"
protocol = "tcp"
listen = "7040"
target = "%[2]s:7999"

[[mapping]]
name = "range"
protocol = "tcp"
listen = "7100-7102"
target = "%[2]s:7200"
`, gwPublicIP, gwServerIP, adminSocket)
}

// startNatbox runs natbox in the gw namespace and waits until the mapped echo
// port answers from the client.
func (g *gatewayLab) startNatbox() *proc {
	g.t.Helper()
	cfg := g.writeFile("gw.toml", gatewayConfig(g.dir+"/gw.sock"), 0o644)
	if r := g.gw.run("ip", "link", "show", "natbox0"); r.code == 0 {
		g.t.Fatalf("natbox0 exists before natbox started: %s", r.stdout)
	}
	nb := g.gw.start("natbox", natboxBin, "run", "-c", cfg)
	eventually(g.t, "mapped tcp port answers", 30*time.Second, func() error {
		return errResult(g.client.tool("tcp-echo", "-addr", gwPublicIP+":7000", "-size", "1000", "-timeout", "2s"))
	}, nb)
	return nb
}

// TestGateway runs natbox in gateway mode with one topology and checks each
// behaviour a client can see, then stops it with SIGTERM.
func TestGateway(t *testing.T) {
	g := newGatewayLab(t)
	g.startServers()
	nb := g.startNatbox()
	sock := filepath.Join(g.dir, "gw.sock")
	pub := func(port int) string { return fmt.Sprintf("%s:%d", gwPublicIP, port) }

	t.Run("tcp echo with half-close", func(t *testing.T) {
		// 4 MiB both ways at once; the reply ends only if our FIN crossed
		// natbox and the server's FIN came back after all the data.
		r := g.client.tool("tcp-echo", "-addr", pub(7000), "-size", fmt.Sprint(4<<20), "-timeout", "20s")
		if r.code != 0 || !strings.HasPrefix(r.stdout, fmt.Sprintf("ok bytes=%d", 4<<20)) {
			t.Fatalf("tcp echo: %s", r)
		}
		// The client's TSO frames cross the gw's kernel whole into the TUN,
		// and natbox takes them whole (no split into MTU packets) and
		// answers with TSO frames of its own.
		st, err := adminStatus(t, sock)
		if err != nil {
			t.Fatal(err)
		}
		if c := st.Netstack["tun"].Counters; c["gso_frames_in"] == 0 || c["gso_frames_out"] == 0 {
			t.Errorf("4 MiB each way, but %d TSO frames in and %d out", c["gso_frames_in"], c["gso_frames_out"])
		}
	})

	t.Run("udp request and reply", func(t *testing.T) {
		r := g.client.tool("udp", "-addr", pub(7000), "-msg", "hello-udp", "-timeout", "5s")
		if r.code != 0 || strings.TrimSpace(r.stdout) != "hello-udp" {
			t.Fatalf("udp echo: %s", r)
		}
	})

	refused := map[string]int{
		"unmapped port is refused":        7050,
		"denied source is refused":        7020,
		"source outside allow is refused": 7021,
		"unreachable target is refused":   7040,
	}
	for name, port := range refused {
		t.Run(name, func(t *testing.T) {
			r := g.client.tool("tcp-connect", "-addr", pub(port), "-timeout", "8s")
			if r.code != 3 {
				t.Fatalf("tcp connect to %d: want refused (exit 3), got %s", port, r)
			}
			// An RST, not a timeout: the connect itself (as the tool timed it)
			// returns before the client's first SYN retransmission at 1s.
			took, err := time.ParseDuration(strings.TrimPrefix(strings.TrimSpace(r.stdout), "refused after "))
			if err != nil || took >= time.Second {
				t.Errorf("refusal took %q; want an immediate RST", r.stdout)
			}
		})
	}

	t.Run("port range maps one to one", func(t *testing.T) {
		for i := range 3 {
			r := g.client.tool("tcp-whoami", "-addr", pub(7100+i), "-timeout", "5s")
			if r.code != 0 {
				t.Fatalf("whoami via %d: %s", 7100+i, r)
			}
			if got, want := field(r.stdout, "local"), fmt.Sprintf("%s:%d", gwServerIP, 7200+i); got != want {
				t.Errorf("listen port %d reached %s; want %s", 7100+i, got, want)
			}
		}
	})

	t.Run("proxy v2 over tcp carries the client address", func(t *testing.T) {
		r := g.client.tool("tcp-whoami", "-addr", pub(7010), "-timeout", "5s")
		if r.code != 0 {
			t.Fatalf("whoami: %s", r)
		}
		if field(r.stdout, "proxy") != "v2" || addrOf(field(r.stdout, "src")) != gwClientIP {
			t.Errorf("server saw %q; want proxy=v2 src=%s:*", r.stdout, gwClientIP)
		}
		if got := field(r.stdout, "dst"); got != pub(7010) {
			t.Errorf("proxy header dst = %s; want %s", got, pub(7010))
		}
	})

	t.Run("proxy v2 over udp carries the client address and port", func(t *testing.T) {
		r := g.client.tool("udp", "-addr", pub(7012), "-msg", "who", "-lport", "41012", "-timeout", "5s")
		if r.code != 0 {
			t.Fatalf("udp whoami: %s", r)
		}
		want := fmt.Sprintf("%s:41012", gwClientIP)
		if field(r.stdout, "proxy") != "v2" || field(r.stdout, "src") != want || field(r.stdout, "msg") != "who" {
			t.Errorf("server saw %q; want proxy=v2 src=%s msg=who", r.stdout, want)
		}
	})

	t.Run("udp session expires after its idle timeout", func(t *testing.T) {
		// ask sends rounds datagrams from client port 41011 and returns the
		// address natbox's target-side socket had for each (one per session).
		ask := func(rounds int) []string {
			t.Helper()
			r := g.client.tool("udp", "-addr", pub(7011), "-msg", "idle", "-lport", "41011", "-n", fmt.Sprint(rounds), "-timeout", "5s")
			if r.code != 0 {
				t.Fatalf("udp whoami: %s", r)
			}
			var peers []string
			for _, line := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
				peers = append(peers, field(line, "peer"))
			}
			return peers
		}
		// Both rounds come from one process, well within the 2s idle timeout.
		first := ask(2)
		if len(first) != 2 || first[0] != first[1] {
			t.Fatalf("two datagrams within the idle timeout did not share one session: %v", first)
		}
		// Silence past the timeout: natbox expires the session (its status
		// says so), and the next datagram must open a new session.
		var opened uint64
		eventually(t, "udp-idle session to expire", 15*time.Second, func() error {
			st, err := adminStatus(t, sock)
			if err != nil {
				return err
			}
			m := findMapping(st, "udp-idle")
			if m.SessionsActive != 0 || m.UDPSessionsExpired == 0 {
				return fmt.Errorf("udp-idle: %d sessions active, %d expired", m.SessionsActive, m.UDPSessionsExpired)
			}
			opened = m.SessionsOpened
			return nil
		}, nb)
		later := ask(1)[0]
		st, err := adminStatus(t, sock)
		if err != nil {
			t.Fatal(err)
		}
		if m := findMapping(st, "udp-idle"); m.SessionsOpened != opened+1 {
			t.Errorf("datagram after the expiry: udp-idle sessions opened %d, want %d (a new session)", m.SessionsOpened, opened+1)
		}
		if later == first[0] {
			t.Logf("the new session's socket got the old one's port again (%s)", later)
		}
	})

	t.Run("max_sessions refuses the connection over the limit", func(t *testing.T) {
		hold := g.client.start("hold", toolBin, "tcp-hold", "-addr", pub(7030), "-timeout", "5s")
		hold.waitOutput("connected", 10*time.Second)
		if r := g.client.tool("tcp-connect", "-addr", pub(7030), "-timeout", "5s"); r.code != 3 {
			t.Errorf("second session on max_sessions = 1: want refused, got %s", r)
		}
		hold.signal(syscall.SIGTERM)
		if code, err := hold.wait(10 * time.Second); err != nil || code != 0 {
			t.Fatalf("holder: exit %d, %v", code, err)
		}
		eventually(t, "slot freed after the first session closed", 10*time.Second, func() error {
			return errResult(g.client.tool("tcp-echo", "-addr", pub(7030), "-size", "1000", "-timeout", "2s"))
		}, nb)
	})

	t.Run("closed sessions leave no file descriptors behind", func(t *testing.T) {
		// Both counts are taken with natbox idle, so a session expiring
		// during the count cannot hide a leaked descriptor.
		before := idleFDs(t, sock, nb)
		r := g.client.tool("tcp-echo", "-addr", pub(7000), "-size", "20000", "-n", "100", "-timeout", "5s")
		if r.code != 0 {
			t.Fatalf("100 sequential echoes: %s", r)
		}
		for i := range 10 { // ten UDP sessions, one per client port
			r := g.client.tool("udp", "-addr", pub(7000), "-msg", "fd", "-lport", fmt.Sprint(41100+i), "-timeout", "5s")
			if r.code != 0 || strings.TrimSpace(r.stdout) != "fd" {
				t.Fatalf("udp echo %d: %s", i, r)
			}
		}
		if after := idleFDs(t, sock, nb); after != before {
			t.Fatalf("natbox holds %d fds idle after 100 TCP and 10 UDP sessions, %d idle before: %v", after, before, fdTargetsOf(nb))
		}
	})

	t.Run("sigterm exits 0 and removes the tun and its routes", func(t *testing.T) {
		nb.signal(syscall.SIGTERM)
		code, err := nb.wait(15 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if code != 0 {
			t.Fatalf("natbox exited %d after SIGTERM; want 0", code)
		}
		if r := g.gw.run("ip", "link", "show", "natbox0"); r.code == 0 {
			t.Errorf("natbox0 still exists after exit: %s", r.stdout)
		}
		if out := g.gw.must("ip", "route", "show", "table", "all"); strings.Contains(out, gwPublicIP) || strings.Contains(out, "natbox0") {
			t.Errorf("routes left after exit:\n%s", out)
		}
	})
}

// addrOf returns the address part of "addr:port" (or "" when it is not one).
func addrOf(s string) string {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return ""
	}
	return ap.Addr().String()
}

// idleFDs waits until natbox's status shows no open session (UDP sessions
// of earlier traffic expired) and its descriptor count holds still across
// two polls, and returns that count.
func idleFDs(t *testing.T, sock string, nb *proc) int {
	t.Helper()
	eventually(t, "no session open", 30*time.Second, func() error {
		st, err := adminStatus(t, sock)
		if err != nil {
			return err
		}
		for _, m := range st.Mappings {
			if m.SessionsActive != 0 {
				return fmt.Errorf("mapping %s has %d sessions open", m.Name, m.SessionsActive)
			}
		}
		return nil
	}, nb)
	n := -1
	eventually(t, "fd count to hold still", 10*time.Second, func() error {
		prev := n
		if n = openFDs(t, nb); n != prev {
			return fmt.Errorf("%d fds, %d at the poll before", n, prev)
		}
		return nil
	}, nb)
	return n
}

// fdTargetsOf lists what a process's descriptors point at, for a failure message.
func fdTargetsOf(p *proc) []string {
	dir := fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid)
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, target)
		}
	}
	return out
}

// openFDs counts the file descriptors a running process holds.
func openFDs(t *testing.T, p *proc) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("fds of %s: %v", p.name, err)
	}
	return len(ents)
}
