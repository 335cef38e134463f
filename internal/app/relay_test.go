package app_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/tunnel"
)

func freeUDPPort(t *testing.T) int { return int(testutil.FreePort(t, false)) }

// runUntilCleanup runs fn(ctx) until the test ends and checks it stopped
// cleanly.
func runUntilCleanup(t *testing.T, what string, fn func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", what, err)
		}
	})
}

// TestRelayModeShowsTheRealClient runs a relay and an appliance on
// loopback, joined by a real WireGuard tunnel: a client connecting to the
// relay's public port appears in the appliance's sessions and status with
// its own address.
func TestRelayModeShowsTheRealClient(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	relayKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	appKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	publicPort := freeLoopbackPort(t)
	wgPort := freeUDPPort(t)
	relaySocket, appSocket := filepath.Join(dir, "relay.sock"), filepath.Join(dir, "app.sock")

	rc, _, err := conf.ParseRelay("relay.toml", []byte(fmt.Sprintf(`
[relay]
listen      = "127.0.0.1:%d"
private_key = %q
address     = "100.96.0.1"
public_bind = ["127.0.0.1"]

[admin]
socket = %q

[[peer]]
name       = "home"
public_key = %q
address    = "100.96.0.2"
ports      = ["tcp/%d"]
`, wgPort, relayKey, relaySocket, appKey.Public(), publicPort)))
	if err != nil {
		t.Fatal(err)
	}
	ac, _, err := conf.Parse("appliance.toml", []byte(fmt.Sprintf(`
[uplink]
relay            = "127.0.0.1:%d"
relay_public_key = %q
private_key      = %q
address          = "100.96.0.2"

[limits]
shutdown_grace = "200ms"

[admin]
socket = %q

[[mapping]]
name     = "web"
owner    = "tests"
protocol = "tcp"
listen   = "%d"
target   = %q
`, wgPort, relayKey.Public(), appKey, appSocket, publicPort, target)))
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	relay, err := app.NewRelayNode(rc, "test", log.Named("relay"))
	if err != nil {
		t.Fatal(err)
	}
	runUntilCleanup(t, "relay", relay.Run)
	a, err := app.NewAppliance(ac, app.Options{Version: "test"}, log.Named("appliance"))
	if err != nil {
		t.Fatal(err)
	}
	runUntilCleanup(t, "appliance", a.Run)
	waitFor(t, 20*time.Second, "the uplink to register its ports", func() bool {
		return a.Uplinks()[0].Status().State == tunnel.StateRegistered
	})

	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", publicPort), 5*time.Second)
	if err != nil {
		t.Fatalf("dial the relay's public port: %v", err)
	}
	defer c.Close()
	msg := strings.Repeat("through the relay ", 100)
	expectEcho(t, c, msg)
	waitFor(t, 5*time.Second, "the session's counters", func() bool {
		ss := a.Engine().Sessions()
		return len(ss) == 1 && ss[0].BytesIn == uint64(len(msg)) && ss[0].BytesOut == uint64(len(msg))
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := admin.Dial(appSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ss, err := cl.Sessions(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(ss) != 1 || ss[0].Client != c.LocalAddr().String() || ss[0].Ingress != conf.IngressUplink ||
		ss[0].Target != target.String() || !strings.HasSuffix(ss[0].Public, fmt.Sprintf(":%d", publicPort)) {
		t.Fatalf("appliance sessions = %+v, want one from %s through the uplink", ss, c.LocalAddr())
	}
	st, err := cl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Mappings) != 1 || st.Mappings[0].Hits != 1 || st.Mappings[0].BytesIn != uint64(len(msg)) || len(st.Uplinks) != 1 ||
		!slices.Contains(st.Uplinks[0].Registered, fmt.Sprintf("tcp/%d", publicPort)) {
		t.Fatalf("appliance status = %+v, uplinks %+v", st.Mappings, st.Uplinks)
	}
	// The flow came in through the uplink's netstack; there is no TUN stack.
	if up, ok := st.Netstack[conf.IngressUplink]; !ok || up.Counters["tcp_requests"] < 1 || len(st.Netstack) != 1 || st.Uplinks[0].State != admin.UplinkRegistered {
		t.Fatalf("appliance netstack = %+v, uplink state %q", st.Netstack, st.Uplinks[0].State)
	}

	rcl, err := admin.Dial(relaySocket)
	if err != nil {
		t.Fatal(err)
	}
	defer rcl.Close()
	rst, err := rcl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rst.Relay == nil || len(rst.Relay.Peers) != 1 || rst.Relay.Peers[0].Name != "home" ||
		!slices.Contains(rst.Relay.Peers[0].Registered, fmt.Sprintf("tcp/%d", publicPort)) ||
		rst.Relay.Peers[0].SessionsActive != 1 || rst.Relay.Peers[0].SessionsOpened != 1 {
		t.Fatalf("relay status = %+v", rst.Relay)
	}
	if rs := rst.Netstack["relay"]; rs.Counters["packets_in"] == 0 || rst.Relay.Peers[0].Stats.Gauges["connected"] != 1 ||
		rst.Relay.Stats.Gauges["tcp_sessions"] != 1 {
		t.Fatalf("relay netstack = %+v, relay stats %+v, peer stats %+v", rs, rst.Relay.Stats, rst.Relay.Peers[0].Stats)
	}
	// The peer's public traffic, as natbox status and /metrics show it.
	waitFor(t, 5*time.Second, "the relay's per-peer byte counters", func() bool {
		st, err := rcl.Status(ctx)
		if err != nil || st.Relay == nil || len(st.Relay.Peers) != 1 {
			return false
		}
		c := st.Relay.Peers[0].Stats.Counters
		return c["public_bytes_in"] == uint64(len(msg)) && c["public_bytes_out"] == uint64(len(msg))
	})
	// natbox sessions on the relay: the same client, by its real address,
	// on the peer's mapping; a peer's name selects its sessions.
	rss, err := rcl.Sessions(ctx, "home")
	if err != nil {
		t.Fatal(err)
	}
	if len(rss) != 1 || rss[0].Client != c.LocalAddr().String() || rss[0].Mapping != fmt.Sprintf("home/tcp/%d", publicPort) ||
		rss[0].Ingress != "relay" || !strings.HasSuffix(rss[0].Public, fmt.Sprintf(":%d", publicPort)) ||
		rss[0].Target != fmt.Sprintf("%s:%d", rc.Peers[0].Address, publicPort) {
		t.Fatalf("relay sessions = %+v, want one from %s to home's tunnel address", rss, c.LocalAddr())
	}
	if other, err := rcl.Sessions(ctx, "office"); err != nil || len(other) != 0 {
		t.Fatalf("relay sessions of another peer = %+v, %v; want none", other, err)
	}

	c.Close()
	waitFor(t, 5*time.Second, "the session to close", func() bool { return len(a.Engine().Sessions()) == 0 })
}

func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	_, port, _ := net.SplitHostPort(freeLoopbackAddr(t))
	var p int
	fmt.Sscan(port, &p)
	return p
}
