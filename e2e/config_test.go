//go:build linux

package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// badConfig has two problems, each on a known line inside a [[mapping]] table.
const badConfig = `[tun]
name = "natbox0"
addresses = ["198.51.100.1/32"]

[[mapping]]
name = "web"
protocol = "tcp"
listen = "70000"
target = "10.77.0.2:80"

[[mapping]]
name = "ssh"
protocol = "tcp"
listen = "2222"
targt = "10.77.0.2:22"
`

// TestConfigErrors checks that check and run both reject a bad file with exit
// 2 and errors that name FILE:LINE, and that run touches nothing before it
// fails (it runs in a fresh namespace, where natbox0 must not appear).
func TestConfigErrors(t *testing.T) {
	l := newLab(t)
	ns := l.netns("cfg")
	bad := l.writeFile("bad.toml", badConfig, 0o644)
	base := filepath.Base(bad)
	wantLines := []string{base + ":8:", base + ":15:"}

	for _, cmd := range []string{"check", "run"} {
		t.Run(cmd, func(t *testing.T) {
			var r result
			if cmd == "run" {
				// A run that wrongly starts must not hang the test: wait bounded.
				p := ns.start("natbox-run", natboxBin, "run", "-c", bad)
				code, err := p.wait(15 * time.Second)
				if err != nil {
					t.Fatalf("natbox run with a bad config did not exit: %v", err)
				}
				r = result{code: code, stderr: p.output()} // stdout and stderr together
			} else {
				r = ns.run(natboxBin, "check", "-c", bad)
			}
			if r.code != 2 {
				t.Fatalf("natbox %s: want exit 2, got %s", cmd, r)
			}
			for _, want := range wantLines {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("natbox %s: stderr does not name %q:\n%s", cmd, want, r.stderr)
				}
			}
			if !strings.Contains(r.stderr, "listen") || !strings.Contains(r.stderr, `"target"`) {
				t.Errorf("natbox %s: stderr should name the bad key (listen) and suggest \"target\":\n%s", cmd, r.stderr)
			}
			if link := ns.run("ip", "link", "show", "natbox0"); link.code == 0 {
				t.Errorf("natbox %s created natbox0 from an invalid config", cmd)
			}
		})
	}

	t.Run("check accepts a valid file", func(t *testing.T) {
		good := l.writeFile("good.toml", gatewayConfig(l.dir+"/unused.sock"), 0o644)
		r := ns.run(natboxBin, "check", "-c", good)
		if r.code != 0 {
			t.Fatalf("natbox check on a valid file: %s", r)
		}
		for _, name := range []string{"echo", "whoami-proxy", "range"} {
			if !strings.Contains(r.stdout, name) {
				t.Errorf("natbox check output does not list mapping %q:\n%s", name, r.stdout)
			}
		}
	})

	t.Run("version", func(t *testing.T) {
		r := runCmd(nil, natboxBin, "version")
		if r.code != 0 || strings.TrimSpace(r.stdout) == "" {
			t.Fatalf("natbox version: %s", r)
		}
		t.Logf("natbox version: %s", strings.TrimSpace(r.stdout))
	})
}
