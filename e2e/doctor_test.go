//go:build linux

package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDoctor runs natbox doctor against real targets: one listening, one
// refusing (nothing on the port) and one timing out (a firewall drops the
// SYN), on a box whose WAN address is in the carrier-grade NAT range.
//
//	isp p1 100.64.0.1/24 <-> box b0 100.64.0.2/24 (natbox, natbox0) | b1 10.77.0.1/24 <-> server s0 10.77.0.2/24
func TestDoctor(t *testing.T) {
	l := newLab(t)
	isp, box, server := l.netns("isp"), l.netns("box"), l.netns("server")
	l.link(isp, "p1", "100.64.0.1/24", box, "b0", "100.64.0.2/24")
	l.link(box, "b1", "10.77.0.1/24", server, "s0", gwServerIP+"/24")
	box.must("ip", "route", "add", "default", "via", "100.64.0.1")
	server.must("nft", "-f", l.writeFile("drop.nft", `table inet doctor {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 7998 drop
	}
}
`, 0o644))
	srv := server.start("servers", toolBin, "serve", "-tcp-echo", ":7000")
	srv.waitOutput("ready", 10*time.Second)

	sock := filepath.Join(l.dir, "box.sock")
	healthy := fmt.Sprintf(`[tun]
name = "natbox0"
addresses = ["%[1]s/32"]
routes = ["%[1]s/32"]

[limits]
shutdown_grace = "1s"

[admin]
socket = %[2]q

[[mapping]]
name = "up"
owner = "e2e@example.com"
protocol = "tcp"
listen = "7000"
target = "%[3]s:7000"
`, gwPublicIP, sock, gwServerIP)
	healthyPath := l.writeFile("healthy.toml", healthy, 0o644)
	nb := box.start("natbox", natboxBin, "run", "-c", healthyPath)
	eventually(t, "admin socket answers", 20*time.Second, func() error {
		_, err := adminStatus(t, sock)
		return err
	}, nb)

	doctor := func(cfg string) result {
		return box.run(natboxBin, "doctor", "-c", cfg, "--timeout", "1s")
	}
	lineWith := func(out, severity, substr string) bool {
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, severity+" ") && strings.Contains(line, substr) {
				return true
			}
		}
		return false
	}

	t.Run("a healthy box exits 0 and warns about carrier-grade NAT", func(t *testing.T) {
		r := doctor(healthyPath)
		t.Logf("natbox doctor:\n%s", r.stdout)
		if r.code != 0 {
			t.Errorf("doctor on a healthy config: %s", r)
		}
		if !lineWith(r.stdout, "ok", `mapping "up"`) {
			t.Errorf("no ok line for the listening target")
		}
		if !lineWith(r.stdout, "warning", "100.64.0.2") {
			t.Errorf("no warning about the carrier-grade NAT address 100.64.0.2")
		}
	})

	t.Run("refused and timed-out targets are problems, exit 1", func(t *testing.T) {
		broken := l.writeFile("broken.toml", healthy+fmt.Sprintf(`
[[mapping]]
name = "stopped"
owner = "e2e@example.com"
protocol = "tcp"
listen = "7001"
target = "%[1]s:7999"

[[mapping]]
name = "firewalled"
owner = "e2e@example.com"
protocol = "tcp"
listen = "7002"
target = "%[1]s:7998"
`, gwServerIP), 0o644)
		start := time.Now()
		r := doctor(broken)
		t.Logf("natbox doctor (%v):\n%s", time.Since(start).Round(time.Millisecond), r.stdout)
		if r.code != 1 {
			t.Errorf("doctor with broken targets: want exit 1, got %s", r)
		}
		if !lineWith(r.stdout, "problem", `mapping "stopped": nothing listens on 10.77.0.2:7999`) {
			t.Errorf("no problem line saying nothing listens behind mapping \"stopped\"")
		}
		if !lineWith(r.stdout, "problem", `mapping "firewalled"`) || !strings.Contains(r.stdout, "did not answer") {
			t.Errorf("no problem line saying the target of mapping \"firewalled\" did not answer")
		}
		if !lineWith(r.stdout, "ok", `mapping "up"`) {
			t.Errorf("the listening target is no longer ok")
		}
	})
}
