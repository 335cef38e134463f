package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/netstack"
)

func TestDemoOnce(t *testing.T) {
	port := freePort(t)
	r := natbox(t, "", "demo", "--once", "--port", fmt.Sprint(port))
	if r.code != exitOK {
		t.Fatalf("demo --once: %v", r)
	}
	// The internal service saw the client's real loopback address, carried
	// through the relay, the WireGuard uplink and PROXY protocol.
	if !regexp.MustCompile(`natbox delivered your request from 127\.0\.0\.1:\d+ `).MatchString(r.stdout) {
		t.Fatalf("demo output lacks the delivered client address:\n%s", r.stdout)
	}
	if !strings.Contains(r.stdout, fmt.Sprintf("$ curl http://127.0.0.1:%d/", port)) {
		t.Fatalf("demo output lacks the request it made:\n%s", r.stdout)
	}
	// A clean run warns about nothing, its shutdown included: the
	// appliance stops before the relay it is connected to.
	if strings.Contains(r.stderr, "WARN") || strings.Contains(r.stderr, "ERROR") {
		t.Fatalf("demo --once logged a warning or an error:\n%s", r.stderr)
	}
}

func TestDemoBusyPort(t *testing.T) {
	port := freePort(t)
	ln, err := netListen(port)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	r := natbox(t, "", "demo", "--once", "--port", fmt.Sprint(port))
	if r.code != exitUsage || !strings.Contains(r.stderr, "--port") {
		t.Fatalf("demo on a busy port: %v", r)
	}
}

func TestOpsCommandsWithoutRunningNatbox(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "none.sock")
	for _, cmd := range []string{"status", "sessions", "reload"} {
		r := natbox(t, "", cmd, "--socket", socket)
		if r.code != exitRuntime || !strings.Contains(r.stderr, "natbox is not running") || !strings.Contains(r.stderr, socket) {
			t.Fatalf("%s with no natbox: %v", cmd, r)
		}
	}
}

// runAppliance starts an appliance from the config at path with its TUN on
// an in-memory pipe (no root), until the test ends.
func runAppliance(t *testing.T, path string) {
	t.Helper()
	cfg, _, err := conf.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	appSide, outer := netstack.Pipe(1500)
	a, err := app.NewAppliance(cfg, app.Options{TUNDevice: appSide, Version: "ops-test"}, zaptest.NewLogger(t).Named("appliance"))
	if err != nil {
		appSide.Close()
		outer.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("appliance: %v", err)
		}
		outer.Close()
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(cfg.Admin.Socket); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("admin socket never appeared")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOpsCommandsAgainstARunningAppliance(t *testing.T) {
	dir := t.TempDir()
	socket := filepath.Join(dir, "natbox.sock")
	base := fmt.Sprintf(`[tun]
addresses = ["198.51.100.1/32"]

[limits]
shutdown_grace = "100ms"

[admin]
socket = %q

[[mapping]]
name = "web"
owner = "tests"
protocol = "tcp"
listen = "8080"
target = "127.0.0.1:8080"
`, socket)
	path := filepath.Join(dir, "natbox.toml")
	if err := os.WriteFile(path, []byte(base), 0o600); err != nil {
		t.Fatal(err)
	}
	runAppliance(t, path)

	// status finds the socket through the config, or --socket.
	for _, args := range [][]string{{"status", "-c", path}, {"status", "--socket", socket}} {
		r := natbox(t, "", args...)
		if r.code != exitOK || !regexp.MustCompile(`(?m)^\s*web\b.*\bactive\b`).MatchString(r.stdout) {
			t.Fatalf("natbox %v: %v", args, r)
		}
	}
	if r := natbox(t, "", "status", "--socket", socket, "--json"); r.code != exitOK || !strings.Contains(r.stdout, `"version": "ops-test"`) {
		t.Fatalf("status --json: %v", r)
	}
	if r := natbox(t, "", "sessions", "--socket", socket, "--json"); r.code != exitOK || strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("sessions --json with no traffic: %v", r)
	}

	// An invalid file: every problem on stderr, exit 2, nothing changed.
	bad := base + "\n[[mapping]]\nname = \"web\"\nprotocol = \"tcp\"\nlisten = \"70000\"\ntarget = \"127.0.0.1:1\"\n"
	if err := os.WriteFile(path, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	r := natbox(t, "", "reload", "-c", path)
	if r.code != exitUsage || strings.Count(r.stderr, path+":") != 2 || !strings.Contains(r.stderr, "nothing changed") {
		t.Fatalf("reload of an invalid file: %v", r)
	}
	good := base + "\n[[mapping]]\nname = \"extra\"\nowner = \"tests\"\nprotocol = \"udp\"\nlisten = \"5353\"\ntarget = \"127.0.0.1:5353\"\n"
	if err := os.WriteFile(path, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := natbox(t, "", "reload", "--socket", socket); r.code != exitOK || !strings.Contains(r.stdout, "added [extra]") {
		t.Fatalf("reload: %v", r)
	}
	if r := natbox(t, "", "status", "--socket", socket); r.code != exitOK || !strings.Contains(r.stdout, "extra") {
		t.Fatalf("status after reload: %v", r)
	}
}

func TestStatusWebPrintsThePageURL(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "natbox.toml")
	content := `[tun]
addresses = ["198.51.100.1/32"]

[admin]
listen = "127.0.0.1:9188"

[[mapping]]
name = "web"
owner = "tests"
protocol = "tcp"
listen = "8080"
target = "127.0.0.1:8080"
`
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	// No natbox runs: --web reads the config only.
	r := natbox(t, "", "status", "-c", path, "--web")
	if r.code != exitOK || !strings.Contains(r.stdout, "Open http://127.0.0.1:9188/") {
		t.Fatalf("status --web: %v", r)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(content, `listen = "127.0.0.1:9188"`, "", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := natbox(t, "", "status", "-c", path, "--web"); r.code == exitOK || !strings.Contains(r.stderr, "[admin] listen is not set") {
		t.Fatalf("status --web without listen: %v", r)
	}
}
