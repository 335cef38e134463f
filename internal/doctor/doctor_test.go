package doctor

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testNow = time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)

func tcpMapping(name, host string, port uint16) conf.Mapping {
	return conf.Mapping{
		Name: name, Protocol: conf.TCP, Owner: "it@example.com",
		Listen: conf.Listen{Ports: conf.PortRange{Lo: port, Hi: port}},
		Target: conf.Target{Host: host, Ports: conf.PortRange{Lo: port, Hi: port}},
		Allow:  []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
	}
}

// fakeResolver answers from a table; names missing from it do not exist.
type fakeResolver map[string][]netip.Addr

func (r fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := r[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// stubDialer never touches the network: it answers per address, blocks until
// the context ends for addresses it should time out, and records every call.
type stubDialer struct {
	mu        sync.Mutex
	calls     []string
	refuse    map[string]bool
	blackhole map[string]bool
}

func (s *stubDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	s.mu.Lock()
	s.calls = append(s.calls, addr)
	s.mu.Unlock()
	switch {
	case s.blackhole[addr]:
		<-ctx.Done()
		return nil, &net.OpError{Op: "dial", Net: network, Err: ctx.Err()}
	case s.refuse[addr]:
		return nil, &net.OpError{Op: "dial", Net: network, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	c1, c2 := net.Pipe()
	c2.Close()
	return c1, nil
}

func notRunning(context.Context) (admin.Status, error) {
	return admin.Status{}, admin.ErrNotRunning
}

// baseOptions checks nothing real but what a test opts into.
func baseOptions() Options {
	return Options{
		Now:        func() time.Time { return testNow },
		Resolver:   fakeResolver{},
		Interfaces: func() ([]Interface, error) { return nil, nil },
		Status:     notRunning,
	}
}

// find returns the checks in area whose message contains substr.
func find(r Report, area, substr string) []Check {
	var out []Check
	for _, c := range r.Checks {
		if c.Area == area && strings.Contains(c.Msg, substr) {
			out = append(out, c)
		}
	}
	return out
}

func mustFind(t *testing.T, r Report, area, substr string, want Severity) Check {
	t.Helper()
	got := find(r, area, substr)
	if len(got) != 1 {
		var buf bytes.Buffer
		r.Write(&buf)
		t.Fatalf("want one %s check containing %q, got %d in:\n%s", area, substr, len(got), buf.String())
	}
	if got[0].Severity != want {
		t.Errorf("%s %q: severity %s, want %s", area, got[0].Msg, got[0].Severity, want)
	}
	if want != OK && got[0].Fix == "" {
		t.Errorf("%s %q: no fix", area, got[0].Msg)
	}
	return got[0]
}

func TestTargetsOnLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	openPort := uint16(ln.Addr().(*net.TCPAddr).Port)

	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := uint16(closed.Addr().(*net.TCPAddr).Port)
	closed.Close()

	ranged := tcpMapping("range", "127.0.0.1", openPort)
	ranged.Target.Ports.Hi = openPort + 3
	byName := tcpMapping("named", "nas.lan", openPort)
	cfg := &conf.Config{Mappings: []conf.Mapping{
		tcpMapping("up", "127.0.0.1", openPort),
		tcpMapping("down", "127.0.0.1", closedPort),
		ranged,
		byName,
	}}
	opts := baseOptions()
	opts.Resolver = fakeResolver{"nas.lan": {netip.MustParseAddr("127.0.0.1")}}
	r := Run(testCtx(t), cfg, opts)

	mustFind(t, r, `mapping "up"`, "is listening", OK)
	down := mustFind(t, r, `mapping "down"`, "nothing listens on 127.0.0.1:", Problem)
	if !strings.Contains(down.Msg, "an address of this machine") {
		t.Errorf("refused on loopback should say it is this machine: %q", down.Msg)
	}
	mustFind(t, r, `mapping "range"`, "(first port of the range) is listening", OK)
	mustFind(t, r, `mapping "named"`, "is listening (nas.lan resolves to 127.0.0.1)", OK)
	if !r.HasProblems() {
		t.Error("a refused target did not make the report a problem")
	}
}

func TestTargetFailures(t *testing.T) {
	own := netip.MustParseAddr("192.168.7.2")
	dialer := &stubDialer{
		refuse:    map[string]bool{"10.77.0.2:443": true, "192.168.7.2:8080": true},
		blackhole: map[string]bool{"10.77.0.3:22": true, "192.168.7.2:9000": true},
	}
	udp := tcpMapping("dns", "10.77.0.53", 53)
	udp.Protocol = conf.UDP
	disabled := tcpMapping("off", "10.77.0.9", 80)
	disabled.Enabled = new(bool)
	expired := tcpMapping("gone", "10.77.0.10", 80)
	expired.Expires = testNow.Add(-time.Hour)
	cfg := &conf.Config{Mappings: []conf.Mapping{
		tcpMapping("refused", "10.77.0.2", 443),
		tcpMapping("timeout", "10.77.0.3", 22),
		tcpMapping("nodns", "nas.invalid", 443),
		tcpMapping("own-refused", "192.168.7.2", 8080),
		tcpMapping("own-timeout", "192.168.7.2", 9000),
		udp, disabled, expired,
	}}
	opts := baseOptions()
	opts.Dialer = dialer
	opts.DialTimeout = 50 * time.Millisecond
	opts.Interfaces = func() ([]Interface, error) {
		return []Interface{{Name: "eth0", Up: true, Addrs: []netip.Prefix{netip.PrefixFrom(own, 24)}}}, nil
	}
	start := time.Now()
	r := Run(testCtx(t), cfg, opts)
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("doctor took %v; probes should run in parallel under their timeout", el)
	}

	c := mustFind(t, r, `mapping "refused"`, "nothing listens on 10.77.0.2:443", Problem)
	if !strings.Contains(c.Msg, "the service is stopped or the port is wrong") {
		t.Errorf("refused: %q", c.Msg)
	}
	mustFind(t, r, `mapping "timeout"`, "10.77.0.3:22 did not answer within 50ms: host offline or a firewall drops it", Problem)
	mustFind(t, r, `mapping "nodns"`, `target host "nas.invalid" does not resolve`, Problem)
	mustFind(t, r, `mapping "own-refused"`, "nothing listens on 192.168.7.2:8080, an address of this machine", Problem)
	mustFind(t, r, `mapping "own-timeout"`, "is an address of this machine but did not answer", Problem)
	mustFind(t, r, `mapping "dns"`, "UDP cannot be probed", Warning)
	mustFind(t, r, `mapping "off"`, "disabled", OK)
	if got := find(r, `mapping "gone"`, ""); len(got) != 0 {
		t.Errorf("an expired mapping's target was probed: %v", got)
	}
	for _, call := range dialer.calls {
		if call == "10.77.0.9:80" || call == "10.77.0.10:80" || strings.HasPrefix(call, "10.77.0.53") {
			t.Errorf("dialed %s, which belongs to a disabled, expired or UDP mapping", call)
		}
	}
}

func TestAddresses(t *testing.T) {
	iface := func(name string, addrs ...string) Interface {
		ifc := Interface{Name: name, Up: true}
		for _, a := range addrs {
			ifc.Addrs = append(ifc.Addrs, netip.MustParsePrefix(a))
		}
		return ifc
	}
	lo := Interface{Name: "lo", Up: true, Loopback: true, Addrs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/8")}}
	tests := []struct {
		name   string
		ifaces []Interface
		uplink bool
		want   Severity
		msg    string
	}{
		{"cgnat", []Interface{lo, iface("wan0", "100.72.1.5/10", "fe80::1/64")}, false, Warning, "carrier-grade NAT: 100.72.1.5 on wan0"},
		{"cgnat with relay", []Interface{lo, iface("wan0", "100.72.1.5/10")}, true, OK, "relay mode"},
		{"double nat", []Interface{lo, iface("eth0", "192.168.1.20/24")}, false, Warning, "double NAT"},
		{"ula only", []Interface{iface("eth0", "fd00::20/64")}, false, Warning, "double NAT"},
		{"private with relay", []Interface{iface("eth0", "10.0.0.2/8")}, true, OK, "only private addresses"},
		{"public", []Interface{iface("eth0", "192.168.1.20/24"), iface("eth1", "2001:db8::20/64")}, false, OK, "public address: 2001:db8::20 on eth1"},
		{"down link ignored", []Interface{{Name: "eth9", Addrs: []netip.Prefix{netip.MustParsePrefix("100.64.0.9/10")}}, iface("eth0", "198.51.100.20/24")}, false, OK, "public address"},
		{"tun ignored", []Interface{iface("natbox0", "100.64.0.1/10"), iface("eth0", "198.51.100.20/24")}, false, OK, "public address"},
		{"nothing", []Interface{lo}, false, Warning, "no usable address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &conf.Config{TUN: &conf.TUN{Name: "natbox0"}}
			if tt.uplink {
				cfg.Uplinks = []conf.Uplink{{Relay: "203.0.113.1:51820"}}
			}
			opts := baseOptions()
			opts.Interfaces = func() ([]Interface, error) { return tt.ifaces, nil }
			r := Run(testCtx(t), cfg, opts)
			mustFind(t, r, "addresses", tt.msg, tt.want)
		})
	}
}

// tunFixture writes fake /proc files and a stand-in for /dev/net/tun.
func tunFixture(t *testing.T, capEff string) Options {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	opts := baseOptions()
	opts.TUNDevice = write("tun", "")
	opts.ProcStatus = write("status", "Name:\tnatbox\nCapInh:\t0000000000000000\nCapEff:\t"+capEff+"\nCapBnd:\t000001ffffffffff\n")
	// 198.51.100.0/24 and a default route via eth0; 198.51.100.1/32 into natbox0.
	opts.RouteFile = write("route", ""+
		"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"+
		"eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"+
		"natbox0\t016433C6\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n"+
		"natbox0\t006533C6\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n") // not RTF_UP
	opts.IPv6RouteFile = write("ipv6_route", ""+
		"20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001  natbox0\n"+
		"fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n")
	return opts
}

func TestTUNChecks(t *testing.T) {
	tunCfg := func() *conf.Config {
		return &conf.Config{TUN: &conf.TUN{
			Name:      "natbox0",
			Addresses: []netip.Prefix{netip.MustParsePrefix("198.51.100.1/24"), netip.MustParsePrefix("2001:db8::1/64"), netip.MustParsePrefix("198.51.101.1/24")},
			Routes:    []netip.Prefix{netip.MustParsePrefix("198.51.100.1/32"), netip.MustParsePrefix("198.51.102.0/24")},
		}}
	}
	link := []Interface{{Name: "natbox0", Up: true}, {Name: "eth0", Up: true, Addrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.20/24")}}}

	t.Run("running and mostly right", func(t *testing.T) {
		opts := tunFixture(t, "000001ffffffffff")
		opts.Interfaces = func() ([]Interface, error) { return link, nil }
		opts.Status = func(context.Context) (admin.Status, error) { return admin.Status{}, nil }
		r := Run(testCtx(t), tunCfg(), opts)
		mustFind(t, r, "tun", "opens", OK)
		mustFind(t, r, "tun", "has CAP_NET_ADMIN", OK)
		mustFind(t, r, "tun", `link "natbox0" is up`, OK)
		mustFind(t, r, "tun", "configured route 198.51.102.0/24 into natbox0 is missing", Problem)
		mustFind(t, r, "tun", "no route sends traffic for 198.51.101.1 into natbox0", Warning)
		if got := find(r, "tun", "198.51.100.1 into"); len(got) != 0 {
			t.Errorf("198.51.100.1/32 is routed into natbox0 but was reported: %v", got)
		}
		if got := find(r, "tun", "2001:db8::1 into"); len(got) != 0 {
			t.Errorf("2001:db8::/64 is routed into natbox0 but was reported: %v", got)
		}
	})
	t.Run("all routes present", func(t *testing.T) {
		opts := tunFixture(t, "0000000000001000")
		opts.Interfaces = func() ([]Interface, error) { return link, nil }
		cfg := tunCfg()
		cfg.TUN.Addresses = cfg.TUN.Addresses[:2]
		cfg.TUN.Routes = cfg.TUN.Routes[:1]
		r := Run(testCtx(t), cfg, opts)
		mustFind(t, r, "tun", "has CAP_NET_ADMIN", OK)
		mustFind(t, r, "tun", "routes into natbox0: 198.51.100.1/32, 2001:db8::/64", OK)
	})
	t.Run("unprivileged and not running", func(t *testing.T) {
		opts := tunFixture(t, "0000000000000000")
		opts.TUNDevice = filepath.Join(t.TempDir(), "missing")
		r := Run(testCtx(t), tunCfg(), opts)
		mustFind(t, r, "tun", "no CAP_NET_ADMIN", Problem)
		mustFind(t, r, "tun", "no "+opts.TUNDevice, Problem)
		mustFind(t, r, "tun", "natbox creates it when it starts", OK)
		if got := find(r, "tun", "into natbox0"); len(got) != 0 {
			t.Errorf("routes checked without the link: %v", got)
		}
	})
	t.Run("running without its link", func(t *testing.T) {
		opts := tunFixture(t, "000001ffffffffff")
		opts.Status = func(context.Context) (admin.Status, error) { return admin.Status{}, nil }
		r := Run(testCtx(t), tunCfg(), opts)
		mustFind(t, r, "tun", `natbox is running but has no link "natbox0"`, Problem)
	})
}

func TestRealTUNDevicePermission(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root opens anything")
	}
	dir := t.TempDir()
	dev := filepath.Join(dir, "tun")
	if err := os.WriteFile(dev, nil, 0o000); err != nil {
		t.Fatal(err)
	}
	opts := tunFixture(t, "0")
	opts.TUNDevice = dev
	r := Run(testCtx(t), &conf.Config{TUN: &conf.TUN{Name: "natbox0"}}, opts)
	mustFind(t, r, "tun", "permission denied", Problem)
}

func TestUplink(t *testing.T) {
	uplinkCfg := &conf.Config{Uplinks: []conf.Uplink{{Relay: "relay.example.net:51820"}}, Admin: conf.Admin{Socket: "/run/natbox/natbox.sock"}}
	running := func(us ...*admin.Uplink) func(context.Context) (admin.Status, error) {
		st := admin.Status{Time: testNow}
		for _, u := range us {
			if u.Relay == "" {
				u.Relay = "relay.example.net:51820"
			}
			st.Uplinks = append(st.Uplinks, *u)
		}
		return func(context.Context) (admin.Status, error) { return st, nil }
	}
	t.Run("healthy", func(t *testing.T) {
		opts := baseOptions()
		opts.Status = running(&admin.Uplink{LastHandshake: testNow.Add(-40 * time.Second), Registered: []string{"tcp/443"}})
		r := Run(testCtx(t), uplinkCfg, opts)
		mustFind(t, r, "uplink", "handshake with the relay relay.example.net:51820 40s ago", OK)
		mustFind(t, r, "uplink", "the relay holds tcp/443", OK)
	})
	t.Run("stale and refused", func(t *testing.T) {
		opts := baseOptions()
		opts.Status = running(&admin.Uplink{LastHandshake: testNow.Add(-5 * time.Minute),
			Refused: []admin.PortRefusal{{Port: "tcp/22", Reason: "not in this peer's ports"}}})
		r := Run(testCtx(t), uplinkCfg, opts)
		mustFind(t, r, "uplink", "was 5m0s ago (over 3m0s): the tunnel is down", Problem)
		mustFind(t, r, "uplink", "the relay refused tcp/22: not in this peer's ports", Problem)
	})
	t.Run("never", func(t *testing.T) {
		opts := baseOptions()
		opts.Status = running(&admin.Uplink{})
		r := Run(testCtx(t), uplinkCfg, opts)
		mustFind(t, r, "uplink", "no handshake with the relay relay.example.net:51820 yet", Problem)
	})
	t.Run("transport", func(t *testing.T) {
		cfg := *uplinkCfg
		u := cfg.Uplinks[0]
		u.RelayTCP, u.Transport = "relay.example.net:443", conf.TransportAuto
		cfg.Uplinks = []conf.Uplink{u}
		up := &cfg.Uplinks[0]
		fresh := testNow.Add(-10 * time.Second)
		opts := baseOptions()
		opts.Status = running(&admin.Uplink{LastHandshake: fresh, Transport: conf.TransportTCP, SwitchReason: "no reply over udp for 15s"})
		r := Run(testCtx(t), &cfg, opts)
		c := mustFind(t, r, "uplink", "UDP to the relay is blocked; using TCP/443 (no reply over udp for 15s)", Warning)
		if !strings.Contains(c.Fix, "relay.example.net:51820") {
			t.Errorf("fix %q does not name the relay's UDP address", c.Fix)
		}
		opts.Status = running(&admin.Uplink{LastHandshake: fresh, Transport: conf.TransportTCP, TransportError: "connection refused"})
		r = Run(testCtx(t), &cfg, opts)
		mustFind(t, r, "uplink", "uses TCP/443 but cannot connect to relay.example.net:443: connection refused", Problem)
		lossy := &admin.Uplink{LastHandshake: fresh, Transport: conf.TransportTCP, SwitchReason: "0.008 % of the relay's messages lost over udp",
			TCPCongestion: "cubic", Stats: admin.Counters{Gauges: map[string]int64{"tcp_for_loss": 1}}}
		opts.Status = running(lossy)
		up.TCPCongestion = "bbr"
		r = Run(testCtx(t), &cfg, opts)
		mustFind(t, r, "uplink", "UDP to the relay loses packets; using TCP/443 for a while (0.008 % of the relay's messages lost over udp)", Warning)
		c = mustFind(t, r, "uplink", `the TCP transport runs cubic, not uplink.tcp_congestion "bbr"`, Warning)
		if !strings.Contains(c.Fix, "modprobe tcp_bbr") {
			t.Errorf("fix %q does not say how to get bbr", c.Fix)
		}
		up.TCPCongestion = conf.TCPCongestionSystem
		r = Run(testCtx(t), &cfg, opts)
		for _, c := range r.Checks {
			if strings.Contains(c.Msg, "runs cubic") {
				t.Errorf("with tcp_congestion = \"system\": %q", c.Msg)
			}
		}
		up.Transport = conf.TransportTCP
		opts.Status = running(&admin.Uplink{LastHandshake: fresh, Transport: conf.TransportTCP})
		r = Run(testCtx(t), &cfg, opts)
		mustFind(t, r, "uplink", `using TCP/443 to relay.example.net:443 (uplink.transport = "tcp")`, OK)
		opts.Status = running(&admin.Uplink{LastHandshake: fresh, Transport: conf.TransportUDP})
		r = Run(testCtx(t), &cfg, opts)
		for _, c := range r.Checks {
			if strings.Contains(c.Msg, "TCP/") {
				t.Errorf("on udp: %q", c.Msg)
			}
		}
	})
	t.Run("not running, relay resolves", func(t *testing.T) {
		opts := baseOptions()
		opts.Resolver = fakeResolver{"relay.example.net": {netip.MustParseAddr("203.0.113.1")}}
		r := Run(testCtx(t), uplinkCfg, opts)
		mustFind(t, r, "uplink", "relay host relay.example.net resolves to 203.0.113.1", OK)
		mustFind(t, r, "uplink", "no natbox answers on /run/natbox/natbox.sock", Warning)
	})
	t.Run("runs another config", func(t *testing.T) {
		opts := baseOptions()
		opts.Status = running(&admin.Uplink{Relay: "old.example.net:51820", LastHandshake: testNow})
		r := Run(testCtx(t), uplinkCfg, opts)
		mustFind(t, r, "uplink", "the running natbox has no uplink to relay.example.net:51820", Problem)
	})
	t.Run("two relays, one down", func(t *testing.T) {
		two := &conf.Config{Uplinks: []conf.Uplink{{Relay: "a.example.net:51820"}, {Relay: "b.example.net:51820"}}}
		opts := baseOptions()
		opts.Status = running(
			&admin.Uplink{Relay: "a.example.net:51820", LastHandshake: testNow.Add(-10 * time.Second), Registered: []string{"tcp/443"}},
			&admin.Uplink{Relay: "b.example.net:51820"})
		r := Run(testCtx(t), two, opts)
		mustFind(t, r, "uplink a.example.net:51820", "handshake with the relay a.example.net:51820 10s ago", OK)
		mustFind(t, r, "uplink a.example.net:51820", "the relay holds tcp/443", OK)
		mustFind(t, r, "uplink b.example.net:51820", "no handshake with the relay b.example.net:51820 yet", Problem)
	})
	t.Run("not running, relay does not resolve", func(t *testing.T) {
		r := Run(testCtx(t), uplinkCfg, baseOptions())
		mustFind(t, r, "uplink", `relay host "relay.example.net" does not resolve`, Problem)
	})
	t.Run("default status reads the socket", func(t *testing.T) {
		cfg := *uplinkCfg
		cfg.Admin.Socket = filepath.Join(t.TempDir(), "none.sock")
		opts := baseOptions()
		opts.Status = nil
		opts.Resolver = fakeResolver{"relay.example.net": {netip.MustParseAddr("203.0.113.1")}}
		r := Run(testCtx(t), &cfg, opts)
		c := mustFind(t, r, "uplink", "no natbox answers", Warning)
		if !strings.Contains(c.Msg, "natbox is not running") {
			t.Errorf("want the admin client's reason in %q", c.Msg)
		}
	})
}

func TestExposure(t *testing.T) {
	rdp := tcpMapping("rdp", "10.0.0.5", 3389)
	rdp.Allow = nil
	rdpAllowed := tcpMapping("rdp-office", "10.0.0.5", 3389)
	rdpAcked := rdp
	rdpAcked.Name, rdpAcked.AcknowledgeRisk = "rdp-acked", "honeypot"
	openWorld := tcpMapping("db", "10.0.0.6", 5432)
	openWorld.Allow = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	legacy := tcpMapping("legacy", "10.0.0.7", 20)
	legacy.Allow = nil
	legacy.Listen.Ports, legacy.Target.Ports = conf.PortRange{Lo: 20, Hi: 25}, conf.PortRange{Lo: 20, Hi: 25}
	camera := tcpMapping("camera", "10.0.0.8", 80)
	camera.Allow = nil
	remapped := tcpMapping("vnc-remapped", "10.0.0.9", 5900)
	remapped.Allow = nil
	remapped.Listen.Ports = conf.PortRange{Lo: 15900, Hi: 15900}
	cfg := &conf.Config{Mappings: []conf.Mapping{rdp, rdpAllowed, rdpAcked, openWorld, legacy, camera, remapped}}
	r := Run(testCtx(t), cfg, Options{
		Now: baseOptions().Now, Dialer: &stubDialer{}, Resolver: fakeResolver{},
		Interfaces: func() ([]Interface, error) { return nil, nil },
	})
	c := mustFind(t, r, "exposure", `mapping "rdp" exposes rdp (port 3389)`, Problem)
	if !strings.Contains(c.Fix, "allow = [") || !strings.Contains(c.Fix, "acknowledge_risk") {
		t.Errorf("fix %q should name allow and acknowledge_risk", c.Fix)
	}
	mustFind(t, r, "exposure", `mapping "db" exposes postgresql`, Problem)
	mustFind(t, r, "exposure", `mapping "legacy" exposes ftp (port 21)`, Problem)
	mustFind(t, r, "exposure", `mapping "legacy" exposes telnet (port 23)`, Problem)
	mustFind(t, r, "exposure", `mapping "camera" exposes plain HTTP`, Warning)
	mustFind(t, r, "exposure", `mapping "vnc-remapped" exposes vnc`, Problem)
	for _, quiet := range []string{`"rdp-office"`, `"rdp-acked"`} {
		if got := find(r, "exposure", quiet); len(got) != 0 {
			t.Errorf("%s was flagged: %v", quiet, got)
		}
	}

	r = Run(testCtx(t), &conf.Config{Mappings: []conf.Mapping{rdpAllowed}}, Options{
		Now: baseOptions().Now, Dialer: &stubDialer{}, Interfaces: baseOptions().Interfaces,
	})
	mustFind(t, r, "exposure", "no risky service is open to everyone", OK)
}

func TestReview(t *testing.T) {
	overdue := tcpMapping("nas", "10.0.0.2", 443)
	overdue.ReviewBy = testNow.AddDate(0, 0, -3)
	overdue.Description = "NAS web UI"
	orphan := tcpMapping("orphan", "10.0.0.3", 443)
	orphan.Owner = ""
	expired := tcpMapping("camera", "10.0.0.4", 443)
	expired.Expires = testNow.Add(-24 * time.Hour)
	soon := tcpMapping("temp", "10.0.0.5", 443)
	soon.Expires = testNow.AddDate(0, 0, 10)
	fine := tcpMapping("fine", "10.0.0.6", 443)
	fine.ReviewBy = testNow.AddDate(0, 1, 0)
	disabled := tcpMapping("off", "10.0.0.7", 443)
	disabled.Owner, disabled.Enabled = "", new(bool)

	cfg := &conf.Config{Mappings: []conf.Mapping{overdue, orphan, expired, soon, fine, disabled}}
	opts := baseOptions()
	opts.Dialer = &stubDialer{}
	r := Run(testCtx(t), cfg, opts)
	mustFind(t, r, "review", `mapping "nas" was due for review on 2026-11-17 (owner it@example.com, "NAS web UI")`, Warning)
	mustFind(t, r, "review", `mapping "orphan" has no owner`, Warning)
	mustFind(t, r, "review", `mapping "camera" expired on 2026-11-19 (owner it@example.com); natbox no longer serves it`, Warning)
	mustFind(t, r, "review", `mapping "temp" expires on 2026-11-30`, OK)
	for _, quiet := range []string{`"fine"`, `"off"`} {
		if got := find(r, "review", quiet); len(got) != 0 {
			t.Errorf("%s was flagged: %v", quiet, got)
		}
	}
	if r.HasProblems() {
		t.Error("review findings are warnings, not problems")
	}
}

func TestReportWrite(t *testing.T) {
	r := Report{Checks: []Check{
		{Area: `mapping "web"`, Severity: OK, Msg: "target 127.0.0.1:80 is listening"},
		{Area: `mapping "db"`, Severity: Problem, Msg: "nothing listens on 127.0.0.1:5432", Fix: "start it"},
		{Area: "review", Severity: Warning, Msg: `mapping "db" has no owner`, Fix: "set owner"},
	}}
	var buf bytes.Buffer
	if err := r.Write(&buf); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"ok       mapping \"web\": target 127.0.0.1:80 is listening\n" +
		"problem  mapping \"db\": nothing listens on 127.0.0.1:5432\n" +
		"           fix: start it\n" +
		"warning  review: mapping \"db\" has no owner\n" +
		"           fix: set owner\n" +
		"\n1 ok, 1 warning, 1 problem\n"
	if buf.String() != want {
		t.Errorf("got\n%s\nwant\n%s", buf.String(), want)
	}
	if !r.HasProblems() || (Report{Checks: r.Checks[2:]}).HasProblems() {
		t.Error("HasProblems is wrong")
	}
}

func TestParseRoutesFromThisMachine(t *testing.T) {
	// The real files parse: whatever routes exist, no error.
	if _, err := os.Stat("/proc/net/route"); err != nil {
		t.Skip("no /proc/net/route")
	}
	if _, err := readIPv4Routes("/proc/net/route"); err != nil {
		t.Errorf("/proc/net/route: %v", err)
	}
	if _, err := os.Stat("/proc/net/ipv6_route"); err == nil {
		if _, err := readIPv6Routes("/proc/net/ipv6_route"); err != nil {
			t.Errorf("/proc/net/ipv6_route: %v", err)
		}
	}
	if _, err := hasCapability("/proc/self/status", capNetAdmin); err != nil {
		t.Errorf("/proc/self/status: %v", err)
	}
	if _, err := systemInterfaces(); err != nil {
		t.Errorf("systemInterfaces: %v", err)
	}
}

func TestSeverityJSON(t *testing.T) {
	b, _ := Problem.MarshalText()
	if string(b) != "problem" || Warning.String() != "warning" || OK.String() != "ok" {
		t.Error("severity words")
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestAddressWarning: the warning natbox run shows on its status page is
// checkAddresses' warning with its fix, and nothing where doctor is content.
func TestAddressWarning(t *testing.T) {
	wan := func(a string) []Interface {
		return []Interface{{Name: "wan0", Up: true, Addrs: []netip.Prefix{netip.MustParsePrefix(a)}}}
	}
	gateway := &conf.Config{TUN: &conf.TUN{Name: "natbox0"}}
	uplink := &conf.Config{Uplinks: []conf.Uplink{{Relay: "203.0.113.1:51820"}}}
	if w := addressWarning(gateway, wan("100.72.1.5/10"), nil); !strings.Contains(w, "carrier-grade NAT: 100.72.1.5 on wan0") || !strings.Contains(w, "use relay mode") {
		t.Fatalf("cgnat gateway: %q", w)
	}
	if w := addressWarning(uplink, wan("100.72.1.5/10"), nil); w != "" {
		t.Fatalf("cgnat with an uplink: %q, want none", w)
	}
	if w := addressWarning(gateway, wan("198.51.100.20/24"), nil); w != "" {
		t.Fatalf("public address: %q, want none", w)
	}
	if w := addressWarning(gateway, nil, errors.New("no netlink")); w != "" {
		t.Fatalf("interfaces unreadable: %q, want none (doctor reports that itself)", w)
	}
}
