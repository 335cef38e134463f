package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
)

// A new user's typo: natbox reload must print the file's problems and exit
// 2, not look for a natbox at a default socket and say it is not running.
func TestReloadOfABrokenConfigPrintsItsProblems(t *testing.T) {
	dir := t.TempDir()
	relayKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, src, want string
	}{
		{"unknown key", `[tun]
addresses = ["198.51.100.1/32"]

[admin]
socket = "` + filepath.Join(dir, "a.sock") + `"

[[mapping]]
name = "web"
owner = "tests"
protcol = "tcp"
listen = "8080"
target = "127.0.0.1:8080"
`, `natbox.toml:10: mapping "web" (mapping[0]): unknown key "protcol"; did you mean "protocol"?`},
		{"toml syntax in the socket line", `[tun]
addresses = ["198.51.100.1/32"]

[admin]
socket = "` + filepath.Join(dir, "a.sock") + `
`, `natbox.toml:5: toml syntax: strings cannot contain newlines; fix the syntax at column`},
		{"relay config", `[relay]
private_key = "` + relayKey.String() + `"
adress = "10.77.0.1"
`, `natbox.toml:3: relay: unknown key "adress"; did you mean "address"?`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, "natbox.toml", tt.src)
			r := natbox(t, "", "reload", "--config", path)
			if r.code != exitUsage || strings.Contains(r.stderr, "not running") ||
				!strings.Contains(r.stderr, filepath.Dir(path)+"/"+tt.want) ||
				!strings.Contains(r.stderr, "reload refused, nothing changed") {
				t.Fatalf("reload --config with a broken file: %v\nwant on stderr: %s", r, tt.want)
			}
		})
	}
}

// runRelay starts a relay node from the config at path until the test ends.
func runRelay(t *testing.T, path string) *app.RelayNode {
	t.Helper()
	cfg, _, err := conf.LoadRelay(path)
	if err != nil {
		t.Fatal(err)
	}
	n, err := app.NewRelayNode(cfg, "ops-test", zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Named("relay"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("relay: %v", err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(cfg.Admin.Socket); err == nil {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatal("admin socket never appeared")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The relay's reload through the CLI: a broken file is reported and
// changes nothing; a valid one applies and names what needs a restart.
func TestReloadARunningRelay(t *testing.T) {
	dir := t.TempDir()
	relayKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	peerKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf(`[relay]
listen = "127.0.0.1:%d"
private_key = %q
address = "10.77.0.1"
public_bind = ["127.0.0.1"]

[admin]
socket = %q

[[peer]]
name = "home"
public_key = %q
address = "10.77.0.2"
`, testutil.FreePort(t, false), relayKey, filepath.Join(dir, "relay.sock"), peerKey.Public())
	path := filepath.Join(dir, "relay.toml")
	if err := os.WriteFile(path, []byte(base), 0o600); err != nil {
		t.Fatal(err)
	}
	n := runRelay(t, path)
	peers := func() []string {
		var names []string
		for _, p := range n.Relay().Status().Peers {
			names = append(names, p.Name)
		}
		return names
	}

	other, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	added := base + fmt.Sprintf("\n[[peer]]\nname = \"office\"\npublic_key = %q\naddress = \"::ffff:10.77.0.2\"\n", other.Public())
	if err := os.WriteFile(path, []byte(added), 0o600); err != nil {
		t.Fatal(err)
	}
	r := natbox(t, "", "reload", "-c", path)
	if want := path + `:18: peer "office" (peer[1]).address: address ::ffff:10.77.0.2 (10.77.0.2) is already used by peer "home" (line 10)`; r.code != exitUsage || !strings.Contains(r.stderr, want) {
		t.Fatalf("reload of a relay config with a duplicate address: %v\nwant on stderr: %s", r, want)
	}
	if got := peers(); len(got) != 1 || got[0] != "home" {
		t.Fatalf("peers after a refused reload: %v", got)
	}

	added = strings.Replace(added, "::ffff:10.77.0.2", "10.77.0.3", 1) + "\n[log]\nformat = \"json\"\n"
	if err := os.WriteFile(path, []byte(added), 0o600); err != nil {
		t.Fatal(err)
	}
	r = natbox(t, "", "reload", "-c", path)
	if r.code != exitOK || !strings.Contains(r.stdout, "reloaded: added [office], changed [], removed []") ||
		!strings.Contains(r.stdout, "not applied: restart natbox relay to apply log.format") {
		t.Fatalf("reload of a valid relay config: %v", r)
	}
	if got := peers(); len(got) != 2 || got[1] != "office" {
		t.Fatalf("peers after the reload: %v", got)
	}
}
