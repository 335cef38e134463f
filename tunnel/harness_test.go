package tunnel_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

const testMTU = 1420

var relayTunnelAddr = netip.MustParseAddr("100.96.0.1")

// stackTCP is the TCP config of both tunnel stacks, engineOpts the
// appliance forwarder's options (benchmark experiments change them).
var (
	stackTCP   = netstack.TCPConfig{}
	engineOpts = forwarder.Options{}
)

// testOpts make failures show up in seconds rather than tens of seconds.
var testOpts = []tunnel.Option{tunnel.WithPing(500*time.Millisecond, 3*time.Second), tunnel.WithReleaseGrace(time.Second)}

// relayHandler routes the relay stack's flows to a Relay set after both exist.
// It is wired before the stack runs, so r is set before any flow.
type relayHandler struct{ r *tunnel.Relay }

func (h *relayHandler) HandleTCP(req *netstack.TCPRequest) {
	h.r.HandleTCP(req.Src, req.Dst, req.Accept, req.Reject)
}

func (h *relayHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	h.r.HandleUDP(src, dst, payload)
}

// goRun calls run on its own goroutine until ctx's end or a Close ends it;
// the returned func waits for it to return. Its error is not checked: a
// test that closes early may close before Run starts (lifecycle_test.go
// checks Run's errors).
func goRun(ctx context.Context, run func(context.Context) error) (wait func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = run(ctx)
	}()
	return func() { <-done }
}

// relaySide is a Relay on its own netstack, as cmd wires it.
type relaySide struct {
	relay *tunnel.Relay
	stack *netstack.Stack
	key   conf.Key
	port  uint16 // WireGuard UDP port on 127.0.0.1
	waits []func()
}

func relayConfig(key conf.Key, listen string, binds []netip.Addr, peers ...conf.Peer) *conf.RelayConfig {
	return &conf.RelayConfig{
		Relay: conf.RelaySection{
			Listen:       listen,
			PrivateKey:   key,
			Address:      relayTunnelAddr,
			PublicBind:   binds,
			MTU:          testMTU,
			MaxMTU:       conf.DefaultMaxTunnelMTU,
			DialTimeout:  conf.Duration(5 * time.Second),
			BufferMemory: conf.DefaultRelayBufferMemory,
		},
		Peers: peers,
	}
}

// onePeerRelayConfig is a relay on 127.0.0.1 with the single peer "a"
// (tunnel address applAddrA, key's public half) allowed specs.
func onePeerRelayConfig(t testing.TB, key conf.Key, specs ...string) *conf.RelayConfig {
	return relayConfig(mustKey(t), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: key.Public(), Address: applAddrA, Ports: mustSpecs(t, specs...)})
}

// startOnePeerRelay starts a relay whose single peer "a" (with the returned
// key) may hold one free port for proto ("tcp" or "udp"), given as spec.
func startOnePeerRelay(t testing.TB, proto string) (relay *relaySide, key conf.Key, port uint16, spec string) {
	port = freePort(t, false)
	spec = fmt.Sprintf("%s/%d", proto, port)
	key = mustKey(t)
	return startRelay(t, onePeerRelayConfig(t, key, spec), testLogger(t)), key, port, spec
}

// tcpEchoThroughRelay starts a one-peer relay, its config first changed by
// tweak (limits, quotas), and an appliance behind it that maps one TCP port
// to a PROXY-reading echo service, and waits until the port is registered.
// public is where clients connect on the relay.
func tcpEchoThroughRelay(t *testing.T, tweak func(*conf.RelayConfig)) (relay *relaySide, cfg *conf.RelayConfig, key conf.Key, spec string, public netip.AddrPort) {
	t.Helper()
	port := freePort(t, false)
	spec = fmt.Sprintf("tcp/%d", port)
	key = mustKey(t)
	cfg = onePeerRelayConfig(t, key, spec)
	tweak(cfg)
	relay = startRelay(t, cfg, testLogger(t))
	svc, _ := proxyEchoService(t)
	a := startAppliance(t, relay, key, applAddrA, tcpMapping("web", port, svc))
	waitRegistered(t, a, spec)
	return relay, cfg, key, spec, netip.AddrPortFrom(loopback4, port)
}

// pipeMode: NATBOX_TEST_PIPE=1 joins the tunnel stacks with a Pipe.
var pipeMode = os.Getenv("NATBOX_TEST_PIPE") == "1"

// tunnelPair joins a stack and a wireguard-go device as natbox does
// (netstack.Direct), or with a netstack.Pipe when NATBOX_TEST_PIPE=1, so the
// benchmarks can compare the two.
func tunnelPair(mtu int) (stackSide, outer tun.Device) {
	if pipeMode {
		return netstack.Pipe(mtu)
	}
	return netstack.Direct(mtu)
}

// stackOpts is what natbox wires for a tunnel stack: on a Direct pair,
// checksums optional (tunnel.WithChecksumsOptional).
func stackOpts(st *netstack.Stack) []tunnel.Option {
	if pipeMode {
		return nil
	}
	return []tunnel.Option{tunnel.WithChecksumsOptional(st.SetChecksumsOptional)}
}

func startRelay(t testing.TB, cfg *conf.RelayConfig, log *zap.Logger, opts ...tunnel.Option) *relaySide {
	t.Helper()
	// As the relay node wires it: the link takes relay.max_mtu.
	stackSide, outer := tunnelPair(max(cfg.Relay.MaxMTU, cfg.Relay.MTU))
	h := &relayHandler{}
	tcp := stackTCP
	if _, stackBufs := conf.BufferShares(cfg.Relay.BufferMemory, 1); tcp.BufferBudget == 0 {
		tcp.BufferBudget = stackBufs // as the relay node wires it
	}
	st, err := netstack.New(stackSide, netstack.Config{Addresses: tunnel.TunnelPrefixes(relayTunnelAddr), TCP: tcp}, h, log.Named("relay-stack"))
	if err != nil {
		outer.Close()
		t.Fatal(err)
	}
	r, err := tunnel.NewRelay(cfg, outer, st, log.Named("relay"), slices.Concat(testOpts, stackOpts(st), opts)...)
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	h.r = r
	port, err := r.ListenPort()
	if err != nil {
		st.Close()
		r.Close()
		t.Fatal(err)
	}
	rs := &relaySide{relay: r, stack: st, key: cfg.Relay.PrivateKey, port: port}
	rs.waits = []func(){goRun(context.Background(), st.Run), goRun(context.Background(), r.Run)}
	t.Cleanup(rs.close)
	return rs
}

func (rs *relaySide) close() {
	rs.relay.Close()
	rs.stack.Close()
	for _, wait := range rs.waits {
		wait()
	}
}

// uplinkIngress adapts the appliance stack to forwarder.Ingress.
type uplinkIngress struct{ *netstack.Stack }

func (uplinkIngress) Name() string { return conf.IngressUplink }

// engineHandler routes the appliance stack's flows to the forwarder. It is
// wired before the stack runs, so in is set before any flow.
type engineHandler struct {
	e  *forwarder.Engine
	in *uplinkIngress
	up *tunnel.Uplink // its warm streams are passed on
}

func (h *engineHandler) HandleTCP(req *netstack.TCPRequest) {
	if h.up != nil && h.up.ServeWarm(req.Src, req.Dst, req, h.serve) {
		return
	}
	h.e.HandleTCP(h.in, req.Src, req.Dst, req)
}

func (h *engineHandler) serve(src, dst netip.AddrPort, a forwarder.TCPAttempt) {
	h.e.HandleTCP(h.in, src, dst, a)
}

func (h *engineHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	h.e.HandleUDP(h.in, src, dst, payload)
}

// appliance is natbox in relay mode: forwarder engine, netstack, uplink.
type appliance struct {
	uplink *tunnel.Uplink
	stack  *netstack.Stack
	engine *forwarder.Engine
	cfg    *conf.Config
	logs   *observer.ObservedLogs
	cancel context.CancelFunc
	done   chan error
	waits  []func() // the stack's and the engine's Run
	once   sync.Once
}

// startAppliance runs an appliance with key and tunnel address addr whose
// uplink points at relay; mappings is TOML for its [[mapping]] tables.
func startAppliance(t testing.TB, relay *relaySide, key conf.Key, addr netip.Addr, mappings string) *appliance {
	t.Helper()
	return startApplianceVia(t, "127.0.0.1", relay, key, addr, mappings)
}

// startApplianceVia is startAppliance with the relay named by relayHost.
func startApplianceVia(t testing.TB, relayHost string, relay *relaySide, key conf.Key, addr netip.Addr, mappings string) *appliance {
	t.Helper()
	return startApplianceOpts(t, relayHost, relay, key, addr, mappings, engineOpts)
}

// startApplianceOpts is startApplianceVia with the forwarder's options.
// As the appliance wires them, the [limits] buffer_memory budget is shared
// by the forwarder and the stack unless opts or stackTCP set their own.
func startApplianceOpts(t testing.TB, relayHost string, relay *relaySide, key conf.Key, addr netip.Addr, mappings string, opts forwarder.Options) *appliance {
	t.Helper()
	return runApplianceWith(t, applianceTOML(relayHost, relay, key, addr, mappings), addr, opts)
}

// applianceTOML is the config text of an appliance behind relay.
func applianceTOML(relayHost string, relay *relaySide, key conf.Key, addr netip.Addr, mappings string) string {
	return applianceTOMLVia(relayHost, relay.port, relay, key, addr, mappings)
}

// applianceTOMLVia is applianceTOML with the relay's WireGuard port as seen
// from the appliance (a udpGate's, say).
func applianceTOMLVia(relayHost string, port uint16, relay *relaySide, key conf.Key, addr netip.Addr, mappings string) string {
	return fmt.Sprintf(`
[uplink]
relay = "%s:%d"
relay_public_key = %q
private_key = %q
address = %q
relay_address = %q
keepalive = "1s"
mtu = %d
%s`, relayHost, port, relay.key.Public(), key, addr, relayTunnelAddr, testMTU, mappings)
}

// runAppliance starts an appliance from its whole config text; addr is its
// tunnel address.
func runAppliance(t testing.TB, toml string, addr netip.Addr, opts ...tunnel.Option) *appliance {
	t.Helper()
	return runApplianceWith(t, toml, addr, engineOpts, opts...)
}

// runApplianceWith is runAppliance with the forwarder's options.
func runApplianceWith(t testing.TB, toml string, addr netip.Addr, opts forwarder.Options, topts ...tunnel.Option) *appliance {
	t.Helper()
	cfg, _, err := conf.Parse("appliance.toml", []byte(toml))
	if err != nil {
		t.Fatalf("appliance config: %v", err)
	}
	core, logs := observer.New(zap.InfoLevel)
	var log *zap.Logger
	if tl, ok := t.(*testing.T); ok {
		log = zap.New(zapcore.NewTee(core, zaptest.NewLogger(tl, zaptest.Level(zap.InfoLevel)).Core()))
	} else {
		log = zap.New(core)
	}
	fwdBufs, stackBufs := conf.BufferShares(cfg.Limits.BufferMemory, 1)
	if opts.BufferBudget == 0 {
		opts.BufferBudget = fwdBufs
	}
	tcp := stackTCP
	if tcp.BufferBudget == 0 {
		tcp.BufferBudget = stackBufs
	}
	tcp.CookiePortThreshold = -1 // as the appliance wires its uplink stacks
	engine, err := forwarder.New(cfg, opts, log.Named("forwarder"))
	if err != nil {
		t.Fatal(err)
	}
	// As the appliance wires it: the link takes max_mtu, the routes mtu.
	up := &cfg.Uplinks[0]
	stackSide, outer := tunnelPair(up.MaxMTU)
	h := &engineHandler{e: engine}
	st, err := netstack.New(stackSide, netstack.Config{MTU: up.MaxMTU, PathMTU: up.MTU, Addresses: tunnel.TunnelPrefixes(addr), TCP: tcp}, h, log.Named("appliance-stack"))
	if err != nil {
		t.Fatal(err)
	}
	h.in = &uplinkIngress{st}
	// As the appliance wires it: the uplink's gates from limits.buffer_memory.
	topts = append([]tunnel.Option{tunnel.WithBufferMemory(int(cfg.Limits.BufferMemory))}, topts...)
	u, err := tunnel.NewUplink(&cfg.Uplinks[0], outer, st, log.Named("uplink"), slices.Concat(testOpts, stackOpts(st), topts)...)
	if err != nil {
		t.Fatal(err)
	}
	h.up = u
	// As the appliance registers: each UDP mapping with its idle timeout.
	var ports []tunnel.WantedPort
	for _, m := range cfg.Mappings {
		w := tunnel.WantedPort{Spec: conf.PortSpec{Proto: m.Protocol, Ports: m.Listen.Ports}}
		if m.Protocol.Has(conf.UDP) {
			w.UDPIdle = m.IdleTimeoutFor(conf.UDP)
		}
		ports = append(ports, w)
	}
	u.SetWanted(ports)
	ctx, cancel := context.WithCancel(context.Background())
	a := &appliance{uplink: u, stack: st, engine: engine, cfg: cfg, logs: logs, cancel: cancel, done: make(chan error, 1)}
	a.waits = []func(){goRun(context.Background(), st.Run), goRun(context.Background(), engine.Run)}
	go func() { a.done <- u.Run(ctx) }()
	t.Cleanup(a.close)
	return a
}

// close stops the appliance; it is idempotent (tests call it early, and
// cleanup calls it again).
func (a *appliance) close() {
	a.once.Do(func() {
		a.cancel()
		<-a.done
		a.stack.Close()
		a.engine.Close()
		for _, wait := range a.waits {
			wait()
		}
	})
}

// waitFor polls cond every 20 ms until it holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitRegistered waits until the uplink holds every spec in want.
func waitRegistered(t testing.TB, a *appliance, want ...string) {
	t.Helper()
	waitFor(t, 20*time.Second, "registration of "+strings.Join(want, ", "), func() bool {
		st := a.uplink.Status()
		for _, w := range want {
			found := false
			for _, g := range st.Registered {
				found = found || g == w
			}
			if !found {
				return false
			}
		}
		return st.State == tunnel.StateRegistered
	})
}

// freePort returns a port free for both TCP and UDP on 127.0.0.1 (and ::1
// when v6 is true) at the time of the call.
func freePort(t testing.TB, v6 bool) uint16 { return testutil.FreePort(t, v6) }

// haveIPv6 reports whether ::1 can be bound.
func haveIPv6() bool {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

func mustKey(t testing.TB) conf.Key {
	t.Helper()
	k, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustSpecs(t testing.TB, specs ...string) []conf.PortSpec {
	t.Helper()
	out := make([]conf.PortSpec, len(specs))
	for i, s := range specs {
		if err := out[i].UnmarshalText([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func testLogger(t testing.TB) *zap.Logger {
	if tl, ok := t.(*testing.T); ok {
		return zaptest.NewLogger(tl, zaptest.Level(zap.InfoLevel))
	}
	return zap.NewNop()
}
