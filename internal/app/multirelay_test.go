package app_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/tunnel"
)

// runningRelay is a RelayNode whose Run the test can stop before cleanup.
type runningRelay struct {
	node *app.RelayNode
	stop context.CancelFunc
	done chan error
}

func startRelayNode(t *testing.T, cfg *conf.RelayConfig, log *zap.Logger) *runningRelay {
	t.Helper()
	n, err := app.NewRelayNode(cfg, "test", log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningRelay{node: n, stop: cancel, done: make(chan error, 1)}
	go func() { r.done <- n.Run(ctx) }()
	t.Cleanup(func() { r.kill(t) })
	return r
}

// kill stops the relay and waits for it; a second call does nothing.
func (r *runningRelay) kill(t *testing.T) {
	t.Helper()
	if r.done == nil {
		return
	}
	r.stop()
	if err := <-r.done; err != nil {
		t.Errorf("relay Run: %v", err)
	}
	r.done = nil
}

// TestTwoRelays: one appliance with an [[uplink]] to each of two relays on
// loopback (public addresses 127.0.0.1 and 127.0.0.2, as two DNS records
// would give them). A TCP service is reachable through both; a UDP client
// that moves from one relay to the other gets its answers through the one
// it uses. With relay b gone, relay a keeps serving and status says which
// one is down; relay b, started again with the same config, serves again
// without anything done to the appliance.
func TestTwoRelays(t *testing.T) {
	t.Parallel()
	tcpTarget := serveTCP(t, echo)
	udpTarget := serveUDP(t, udpEcho)
	appKey, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	port := freeUDPPort(t) // the public TCP and UDP port on both relays
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	dir := t.TempDir()

	type relaySpec struct {
		key    conf.Key
		wg     int
		public netip.Addr
		cfg    *conf.RelayConfig
	}
	relays := make([]*relaySpec, 2)
	for i, public := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")} {
		key, err := conf.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		rs := &relaySpec{key: key, wg: freeUDPPort(t), public: public}
		// Each relay is independent: its own key and tunnel addresses.
		rs.cfg, _, err = conf.ParseRelay(fmt.Sprintf("relay%d.toml", i), []byte(fmt.Sprintf(`
[relay]
listen      = "127.0.0.1:%d"
private_key = %q
address     = "100.9%d.0.1"
public_bind = [%q]

[admin]
socket = %q

[[peer]]
name       = "home"
public_key = %q
address    = "100.9%d.0.2"
ports      = ["tcp/%d", "udp/%d"]
`, rs.wg, key, 6+i, public, filepath.Join(dir, fmt.Sprintf("relay%d.sock", i)), appKey.Public(), 6+i, port, port)))
		if err != nil {
			t.Fatal(err)
		}
		relays[i] = rs
	}
	appSocket := filepath.Join(dir, "app.sock")
	ac, _, err := conf.Parse("appliance.toml", []byte(fmt.Sprintf(`
[[uplink]]
relay            = "127.0.0.1:%d"
relay_public_key = %q
private_key      = %q
address          = "100.96.0.2"

[[uplink]]
relay            = "127.0.0.1:%d"
relay_public_key = %q
private_key      = %q
address          = "100.97.0.2"

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

[[mapping]]
name     = "game"
owner    = "tests"
protocol = "udp"
listen   = "%d"
target   = %q
`, relays[0].wg, relays[0].key.Public(), appKey, relays[1].wg, relays[1].key.Public(), appKey, appSocket,
		port, tcpTarget, port, udpTarget)))
	if err != nil {
		t.Fatal(err)
	}

	startRelayNode(t, relays[0].cfg, log.Named("relay-a"))
	relayB := startRelayNode(t, relays[1].cfg, log.Named("relay-b"))
	// Short control pings, so the appliance notices a relay gone in seconds.
	a, err := app.NewAppliance(ac, app.Options{Version: "test", Tunnel: []tunnel.Option{tunnel.WithPing(300*time.Millisecond, 2*time.Second)}},
		log.Named("appliance"))
	if err != nil {
		t.Fatal(err)
	}
	runUntilCleanup(t, "appliance", a.Run)
	ups := a.Uplinks()
	if len(ups) != 2 {
		t.Fatalf("%d uplinks, want 2", len(ups))
	}
	registered := func(i int) func() bool {
		return func() bool { return ups[i].Status().State == tunnel.StateRegistered }
	}
	waitFor(t, 20*time.Second, "uplink a to register", registered(0))
	waitFor(t, 20*time.Second, "uplink b to register", registered(1))

	publicOf := func(i int) string { return netip.AddrPortFrom(relays[i].public, uint16(port)).String() }
	tcpEcho := func(i int, msg string) error {
		c, err := net.DialTimeout("tcp4", publicOf(i), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		expectEcho(t, c, msg)
		return nil
	}
	for i := range relays {
		if err := tcpEcho(i, fmt.Sprintf("through relay %d", i)); err != nil {
			t.Fatalf("tcp through relay %d: %v", i, err)
		}
	}

	// One UDP client socket, first through relay a, then through relay b:
	// one session on the appliance, the answers through the relay used.
	uc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	udpEchoVia := func(i int, msg string) {
		t.Helper()
		to := netip.MustParseAddrPort(publicOf(i))
		buf := make([]byte, 1500)
		for range 20 { // the first datagram may race the relay's socket
			if _, err := uc.WriteToUDPAddrPort([]byte(msg), to); err != nil {
				t.Fatal(err)
			}
			uc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			n, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				continue
			}
			if from != to || string(buf[:n]) != msg {
				t.Fatalf("udp through relay %d: %q from %v, want %q from %v", i, buf[:n], from, msg, to)
			}
			return
		}
		t.Fatalf("no udp echo through relay %d", i)
	}
	udpEchoVia(0, "udp via a")
	udpEchoVia(1, "udp via b")
	udpEchoVia(0, "udp via a again")
	// The tcp clients have closed; their sessions end once the close has
	// crossed the relay and the tunnel, which under -race can take a while.
	waitFor(t, 10*time.Second, "the tcp sessions to end", func() bool {
		for _, s := range a.Engine().Sessions() {
			if s.Protocol == "tcp" {
				return false
			}
		}
		return true
	})
	if ss := a.Engine().Sessions(); len(ss) != 1 || ss[0].Protocol != "udp" {
		t.Fatalf("sessions on the appliance %+v, want the udp client's one", ss)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := admin.Dial(appSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	states := func() []string {
		st, err := cl.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, u := range st.Uplinks {
			out = append(out, u.Relay+" "+u.State)
		}
		return out
	}
	wantStates := func(a, b string) func() bool {
		return func() bool {
			got := states()
			return len(got) == 2 && got[0] == fmt.Sprintf("127.0.0.1:%d %s", relays[0].wg, a) &&
				got[1] == fmt.Sprintf("127.0.0.1:%d %s", relays[1].wg, b)
		}
	}
	if !wantStates(admin.UplinkRegistered, admin.UplinkRegistered)() {
		t.Fatalf("uplink states %v, want both registered", states())
	}
	st, err := cl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"100.96.0.2", "100.97.0.2"} {
		u := st.Uplinks[i]
		if u.Address != want || u.LastHandshake.IsZero() || u.BytesIn == 0 || len(u.Registered) != 2 {
			t.Errorf("uplink %d status %+v", i, u)
		}
		key := fmt.Sprintf("uplink@127.0.0.1:%d", relays[i].wg)
		if c, ok := st.Netstack[key]; !ok || c.Counters["tcp_requests"] < 1 {
			t.Errorf("netstack %s = %+v (stacks %v)", key, c, len(st.Netstack))
		}
	}

	// Relay b goes away: relay a keeps serving, before and after the
	// appliance notices.
	relayB.kill(t)
	if c, err := net.DialTimeout("tcp4", publicOf(1), time.Second); err == nil {
		c.Close()
		t.Fatal("relay b's public port still accepts")
	}
	for i := range 3 {
		if err := tcpEcho(0, fmt.Sprintf("relay a, b gone, %d", i)); err != nil {
			t.Fatalf("tcp through relay a with relay b gone: %v", err)
		}
	}
	waitFor(t, 15*time.Second, "the appliance to see relay b down", wantStates(admin.UplinkRegistered, tunnel.StateConnecting))
	if err := tcpEcho(0, "relay a, b seen down"); err != nil {
		t.Fatalf("tcp through relay a with relay b seen down: %v", err)
	}
	udpEchoVia(0, "udp via a, b gone")
	if err := cl.Ready(ctx); err != nil {
		t.Errorf("appliance not ready with one of two relays up: %v", err)
	}

	// Relay b again, same config: it serves again by itself.
	start := time.Now()
	relayB = startRelayNode(t, relays[1].cfg, log.Named("relay-b2"))
	waitFor(t, 30*time.Second, "uplink b to register with the restarted relay", registered(1))
	t.Logf("relay b registered again %v after its restart", time.Since(start).Round(time.Millisecond))
	if err := tcpEcho(1, "through relay b again"); err != nil {
		t.Fatalf("tcp through the restarted relay b: %v", err)
	}
	if err := tcpEcho(0, "through relay a still"); err != nil {
		t.Fatalf("tcp through relay a after relay b returned: %v", err)
	}
	udpEchoVia(1, "udp via b again")
	if !wantStates(admin.UplinkRegistered, admin.UplinkRegistered)() {
		t.Fatalf("uplink states %v, want both registered", states())
	}
}
