package app_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/netstack"
)

// Addresses inside the in-memory stacks; nothing leaves the process.
var (
	public4 = netip.MustParseAddr("198.51.100.1") // natbox's public address
	public6 = netip.MustParseAddr("2001:db8::1")
	client4 = netip.MustParseAddr("203.0.113.7") // the public client
	client6 = netip.MustParseAddr("2001:db8:1::7")
)

const linkMTU = 1500

// spec is the variable part of a test config; the harness adds [tun] and
// [admin] socket.
type spec struct {
	Limits   string // lines inside [limits]
	Admin    string // extra lines inside [admin]
	Mappings string // [[mapping]] tables
	// clientTCP configures the client stack's TCP (not rendered).
	clientTCP netstack.TCPConfig
}

// mapping renders one [[mapping]] table; extra lines are appended as is.
func mapping(name, proto, listen, target string, extra ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\n[[mapping]]\nname = %q\nprotocol = %q\nlisten = %q\ntarget = %q\nowner = \"tests\"\n", name, proto, listen, target)
	for _, e := range extra {
		b.WriteString(e + "\n")
	}
	return b.String()
}

func (s spec) render(socket string) string {
	// Short defaults keep failures fast; a test's own value wins.
	limits := s.Limits
	for _, def := range []string{`dial_timeout = "2s"`, `shutdown_grace = "1s"`} {
		if key, _, _ := strings.Cut(def, " "); !strings.Contains(limits, key) {
			limits += "\n" + def
		}
	}
	return fmt.Sprintf(`
[tun]
name = "nbtest0"
mtu = %d
addresses = ["%s/32", "%s/128"]

[limits]
%s

[admin]
socket = %q
%s
%s`, linkMTU, public4, public6, limits, socket, s.Admin, s.Mappings)
}

// harness is a whole appliance whose TUN is one side of an in-memory pipe,
// and a client gVisor stack on the other side standing in for the Internet.
type harness struct {
	t      testing.TB
	app    *app.Appliance
	client *netstack.Stack
	inbox  *udpInbox
	path   string // the config file, for Reload
	socket string // the admin socket

	runDone    chan error // the appliance's Run
	clientDone chan error // the client stack's Run
	cancel     context.CancelFunc
}

func newHarness(t testing.TB, s spec, opts app.Options) *harness {
	t.Helper()
	appSide, clientSide := netstack.Pipe(linkMTU)
	return newHarnessOn(t, s, opts, appSide, clientSide)
}

// newHarnessOn is newHarness on a link the caller made: appSide becomes the
// appliance's TUN, clientSide the client stack's device.
func newHarnessOn(t testing.TB, s spec, opts app.Options, appSide, clientSide tun.Device) *harness {
	t.Helper()
	dir := t.TempDir()
	h := &harness{t: t, inbox: newUDPInbox(), path: filepath.Join(dir, "natbox.toml"), socket: filepath.Join(dir, "admin.sock")}
	h.writeConfig(s)
	cfg, _, err := conf.Load(h.path)
	if err != nil {
		appSide.Close()
		clientSide.Close()
		t.Fatalf("load test config: %v", err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	opts.TUNDevice = appSide
	h.app, err = app.NewAppliance(cfg, opts, log.Named("appliance"))
	if err != nil {
		appSide.Close()
		clientSide.Close()
		t.Fatalf("new appliance: %v", err)
	}
	h.client, err = netstack.New(clientSide, netstack.Config{
		MTU:       linkMTU,
		Addresses: []netip.Prefix{netip.PrefixFrom(client4, 24), netip.PrefixFrom(client6, 64)},
		TCP:       s.clientTCP,
	}, h.inbox, log.Named("client"))
	if err != nil {
		h.app.Close()
		t.Fatalf("client stack: %v", err)
	}
	t.Cleanup(h.close)
	// Nothing flows before Run: the appliance and the client stack run
	// until cleanup, which checks that both returned cleanly.
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.runDone = make(chan error, 1)
	go func() { h.runDone <- h.app.Run(ctx) }()
	h.clientDone = make(chan error, 1)
	go func() { h.clientDone <- h.client.Run(context.Background()) }()
	return h
}

func (h *harness) close() {
	h.cancel()
	if err := <-h.runDone; err != nil {
		h.t.Errorf("appliance Run: %v", err)
	}
	if err := h.app.Close(); err != nil {
		h.t.Errorf("appliance Close: %v", err)
	}
	h.client.Close()
	// A test that ends at once may close the client stack before its Run
	// starts, which then returns ErrClosed (the lifecycle contract).
	if err := <-h.clientDone; err != nil && !errors.Is(err, netstack.ErrClosed) {
		h.t.Errorf("client stack Run: %v", err)
	}
}

// run waits until the appliance's admin server serves (it runs from
// newHarness on; NewAppliance already bound its socket).
func (h *harness) run() {
	waitFor(h.t, 5*time.Second, "admin socket", func() bool {
		_, err := os.Stat(h.socket)
		return err == nil
	})
}

func (h *harness) writeConfig(s spec) { h.writeFile(s.render(h.socket)) }

func (h *harness) writeFile(content string) {
	h.t.Helper()
	// Write and rename, so a reload never reads half a file.
	tmp := h.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(tmp, h.path); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) engine() *forwarder.Engine { return h.app.Engine() }

// dial opens a TCP connection from src (port 0: ephemeral) through natbox.
func (h *harness) dial(src, dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return h.client.DialTCP(ctx, src, dst)
}

func (h *harness) mustDial(src, dst netip.AddrPort) net.Conn {
	h.t.Helper()
	c, err := h.dial(src, dst)
	if err != nil {
		h.t.Fatalf("dial %s -> %s: %v", src, dst, err)
	}
	h.t.Cleanup(func() { c.Close() })
	return c
}

// mappingStatus returns the engine's counters for one mapping.
func (h *harness) mappingStatus(name string) forwarder.MappingStatus {
	h.t.Helper()
	for _, m := range h.engine().Snapshot().Mappings {
		if m.Name == name {
			return m
		}
	}
	h.t.Fatalf("no mapping %q in the snapshot", name)
	return forwarder.MappingStatus{}
}

// sessionsOf returns the live sessions of one mapping.
func (h *harness) sessionsOf(name string) []forwarder.SessionInfo {
	var out []forwarder.SessionInfo
	for _, s := range h.engine().Sessions() {
		if s.Mapping == name {
			out = append(out, s)
		}
	}
	return out
}

// sendUDP sends one datagram from the client stack.
func (h *harness) sendUDP(src, dst netip.AddrPort, payload []byte) {
	h.t.Helper()
	if err := h.client.WriteUDP(src, dst, payload); err != nil {
		h.t.Fatalf("write udp %s -> %s: %v", src, dst, err)
	}
}

// recvUDP waits for the next datagram to client address to.
func (h *harness) recvUDP(to netip.AddrPort, timeout time.Duration) (datagram, error) {
	select {
	case d := <-h.inbox.of(to):
		return d, nil
	case <-time.After(timeout):
		return datagram{}, fmt.Errorf("no datagram for %s within %v", to, timeout)
	}
}

func (h *harness) mustRecvUDP(to netip.AddrPort) datagram {
	h.t.Helper()
	d, err := h.recvUDP(to, 5*time.Second)
	if err != nil {
		h.t.Fatal(err)
	}
	return d
}

type datagram struct {
	src, dst netip.AddrPort
	payload  []byte
}

// udpInbox is the client stack's Handler: UDP datagrams land in one queue
// per client address; TCP connections to the client are refused.
type udpInbox struct {
	mu      sync.Mutex // guards byDst
	byDst   map[netip.AddrPort]chan datagram
	dropped atomic.Int64
}

func newUDPInbox() *udpInbox { return &udpInbox{byDst: map[netip.AddrPort]chan datagram{}} }

func (u *udpInbox) of(dst netip.AddrPort) chan datagram {
	u.mu.Lock()
	defer u.mu.Unlock()
	ch := u.byDst[dst]
	if ch == nil {
		ch = make(chan datagram, 1024)
		u.byDst[dst] = ch
	}
	return ch
}

func (u *udpInbox) HandleTCP(r *netstack.TCPRequest) { r.Reject() }

func (u *udpInbox) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	select {
	case u.of(dst) <- datagram{src: src, dst: dst, payload: bytes.Clone(payload)}:
	default:
		u.dropped.Add(1) // the packet path must not block; tests check dropped
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// errRefused is what a dial through natbox gets when natbox answers with RST.
var errRefused = syscall.ECONNREFUSED
