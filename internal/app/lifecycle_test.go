package app_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/netstack"
)

// lifecycle is what TestLifecycle needs of Appliance and RelayNode.
type lifecycle = testutil.Lifecycle

// newLifecycleAppliance builds an appliance with every piece: a TUN (a
// Pipe), an uplink towards a relay port nothing answers on, admin socket
// and HTTP listener.
func newLifecycleAppliance(t *testing.T) lifecycle {
	dir := t.TempDir()
	relayKey, appKey := mustGenerateKey(t), mustGenerateKey(t)
	cfg, _, err := conf.Parse(filepath.Join(dir, "natbox.toml"), []byte(fmt.Sprintf(`
[tun]
addresses = ["198.51.100.1/32"]

[uplink]
relay            = "127.0.0.1:%d"
relay_public_key = %q
private_key      = %q
address          = "100.96.0.2"

[limits]
shutdown_grace = "200ms"

[admin]
socket = %q
listen = "127.0.0.1:%d"
`, freeUDPPort(t), relayKey.Public(), appKey, filepath.Join(dir, "a.sock"), testutil.FreePort(t, false))))
	if err != nil {
		t.Fatal(err)
	}
	appSide, outer := netstack.Pipe(1500)
	t.Cleanup(func() { outer.Close() })
	a, err := app.NewAppliance(cfg, app.Options{TUNDevice: appSide}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func newLifecycleRelay(t *testing.T) lifecycle {
	dir := t.TempDir()
	cfg, _, err := conf.ParseRelay(filepath.Join(dir, "relay.toml"), []byte(fmt.Sprintf(`
[relay]
listen      = "127.0.0.1:%d"
private_key = %q
address     = "100.96.0.1"
public_bind = ["127.0.0.1"]

[admin]
socket = %q
`, freeUDPPort(t), mustGenerateKey(t), filepath.Join(dir, "r.sock"))))
	if err != nil {
		t.Fatal(err)
	}
	n, err := app.NewRelayNode(cfg, "test", zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func mustGenerateKey(t *testing.T) conf.Key {
	k, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestLifecycle: building an appliance or a relay starts none of natbox's
// goroutines (wireguard-go's and gVisor's own are allowed, see
// ARCHITECTURE.md), Close is idempotent before Run and concurrently, Run
// after Close fails at once, and Run returns only after every goroutine it
// started has stopped, whether ctx or Close ended it. Not parallel: it
// counts goroutines.
func TestLifecycle(t *testing.T) {
	for name, build := range map[string]func(*testing.T) lifecycle{"appliance": newLifecycleAppliance, "relay": newLifecycleRelay} {
		t.Run(name+"/new starts nothing", func(t *testing.T) { testutil.CheckNewStartsNothing(t, build) })
		t.Run(name+"/close before run", func(t *testing.T) {
			testutil.CheckCloseBeforeRun(t, build, func(err error) bool { return err != nil && strings.Contains(err.Error(), "closed") })
		})
		for _, end := range []string{"ctx", "close"} {
			t.Run(name+"/"+end+" ends run", func(t *testing.T) {
				before := testutil.Goroutines()
				c := build(t)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				done := make(chan error, 1)
				go func() { done <- c.Run(ctx) }()
				// Every piece runs. The appliance: forwarder, the TUN's stack
				// with four (pumps, cookie sweep, budget check), the uplink's
				// stack with only its cookie sweep and budget check
				// (netstack.Direct: wireguard-go's goroutines move its
				// packets), the uplink with four (monitor, transport ladder,
				// path probe, close watcher), the admin server with two listeners and a
				// sampler; the relay: stack (Direct too), relay (and its
				// engine), admin on a socket.
				testutil.WaitGoroutines(t, before, map[string]int{"appliance": 18, "relay": 7}[name])
				if end == "ctx" {
					cancel()
				} else {
					var wg sync.WaitGroup
					for range 2 {
						wg.Go(func() { c.Close() })
					}
					wg.Wait()
				}
				if err := <-done; err != nil {
					t.Fatalf("Run: %v", err)
				}
				testutil.WaitGoroutines(t, before, 0)
			})
		}
	}
}
