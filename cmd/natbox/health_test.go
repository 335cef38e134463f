package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/internal/app"
)

func TestHealthWithoutRunningNatbox(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "none.sock")
	r := natbox(t, "", "health", "--socket", socket)
	if r.code != exitRuntime || !strings.Contains(r.stderr, "natbox is not running") || r.stdout != "" {
		t.Fatalf("health with no natbox: %v", r)
	}
	// A file that is not a socket is not a healthy natbox either.
	notSocket := filepath.Join(t.TempDir(), "file.sock")
	if err := os.WriteFile(notSocket, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if r := natbox(t, "", "health", "--socket", notSocket); r.code != exitRuntime {
		t.Fatalf("health on a plain file: %v", r)
	}
}

func TestHealthOfARunningGateway(t *testing.T) {
	dir := t.TempDir()
	socket := filepath.Join(dir, "natbox.sock")
	path := writeConfig(t, "natbox.toml", fmt.Sprintf(`[tun]
addresses = ["198.51.100.1/32"]

[limits]
shutdown_grace = "100ms"

[admin]
socket = %q
`, socket))
	runAppliance(t, path)
	for _, args := range [][]string{{"health", "-c", path}, {"health", "--socket", socket}} {
		r := natbox(t, "", args...)
		if r.code != exitOK || !strings.Contains(r.stdout, "ok: natbox on "+socket+" is ready") {
			t.Fatalf("natbox %v: %v", args, r)
		}
	}
}

// An appliance whose uplink the relay has not registered answers on its
// socket but is not healthy; once the relay is up and registers it, it is.
func TestHealthFollowsUplinkRegistration(t *testing.T) {
	dir := t.TempDir()
	svcPort, publicPort := freePort(t), freePort(t)
	relayCfg, appCfg, err := demoConfigs(dir, publicPort, svcPort)
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t)
	a, err := app.NewAppliance(appCfg, app.Options{Version: "health-test"}, log.Named("appliance"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 2)
	go func() { done <- a.Run(ctx) }()
	running := 1
	defer func() {
		cancel()
		for range running {
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		}
	}()
	socket := appCfg.Admin.Socket
	waitFor(t, 5*time.Second, "the appliance's admin socket", func() bool {
		_, err := os.Stat(socket)
		return err == nil
	})

	r := natbox(t, "", "health", "--socket", socket)
	if r.code != exitRuntime || !strings.Contains(r.stderr, "is not healthy") || !strings.Contains(r.stderr, "uplink") {
		t.Fatalf("health with no relay to register at: %v", r)
	}

	relay, err := app.NewRelayNode(relayCfg, "health-test", log.Named("relay"))
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- relay.Run(ctx) }()
	running++
	waitFor(t, 30*time.Second, "natbox health to pass once the relay registers the uplink", func() bool {
		return natbox(t, "", "health", "--socket", socket).code == exitOK
	})
	// The relay answers its own health check.
	if r := natbox(t, "", "health", "--socket", relayCfg.Admin.Socket); r.code != exitOK {
		t.Fatalf("health of the relay: %v", r)
	}
}

// waitFor polls cond until it holds, failing the test after limit.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
