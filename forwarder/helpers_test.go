package forwarder

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// mapping builds a conf.Mapping from short strings: listen "443",
// "198.51.100.1:80-90" or "[2001:db8::1]:53"; target "127.0.0.1:8443".
func mapping(name string, proto conf.Proto, listen, target string) conf.Mapping {
	m := conf.Mapping{Name: name, Protocol: proto}
	if i := strings.LastIndex(listen, ":"); i >= 0 {
		m.Listen.Addr = netip.MustParseAddr(strings.Trim(listen[:i], "[]"))
		listen = listen[i+1:]
	}
	m.Listen.Ports = ports(listen)
	i := strings.LastIndex(target, ":")
	m.Target = conf.Target{Host: strings.Trim(target[:i], "[]"), Ports: ports(target[i+1:])}
	return m
}

func ports(s string) conf.PortRange {
	lo, hi, ok := strings.Cut(s, "-")
	l, _ := strconv.Atoi(lo)
	if !ok {
		return conf.PortRange{Lo: uint16(l), Hi: uint16(l)}
	}
	h, _ := strconv.Atoi(hi)
	return conf.PortRange{Lo: uint16(l), Hi: uint16(h)}
}

func config(ms ...conf.Mapping) *conf.Config {
	return &conf.Config{
		Mappings: ms,
		Limits: conf.Limits{
			DialTimeout: conf.Duration(2 * time.Second), MaxInflight: 1024, MaxInflightPerSource: 64,
			MaxInflightPerTarget: 256, MaxSessions: 100000,
		},
	}
}

func newEngine(t testing.TB, cfg *conf.Config, opts Options) *Engine {
	t.Helper()
	e, err := New(cfg, opts, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	runEngine(t, e)
	return e
}

// runEngine runs e until the test ends; the cleanup closes it and waits for
// Run to return.
func runEngine(t testing.TB, e *Engine) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- e.Run(context.Background()) }()
	t.Cleanup(func() {
		e.Close()
		if err := <-done; err != nil && !errors.Is(err, ErrStopped) {
			t.Errorf("engine Run: %v", err)
		}
	})
}

// fakeClock is a settable Clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// fakeIngress records reply datagrams.
type fakeIngress struct {
	name    string
	replies chan reply
}

type reply struct {
	src, dst netip.AddrPort
	payload  string
}

func newIngress(name string) *fakeIngress {
	return &fakeIngress{name: name, replies: make(chan reply, 1024)}
}

func (f *fakeIngress) Name() string { return f.name }

func (f *fakeIngress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	select {
	case f.replies <- reply{src, dst, string(payload)}:
	default:
	}
	return nil
}

func (f *fakeIngress) next(t *testing.T) reply {
	t.Helper()
	select {
	case r := <-f.replies:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no reply datagram")
		return reply{}
	}
}

// tcpEcho serves an echo with half-close on a loopback listener and returns
// its port.
func tcpEcho(t testing.TB) uint16 {
	t.Helper()
	return testutil.ServeTCP(t, "127.0.0.1:0", testutil.Echo).Port()
}

// tcpPair returns the two ends of a loopback TCP connection: client is the
// test's end, accepted stands in for the conn an ingress hands over.
func tcpPair(t testing.TB) (client, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { client.Close(); r.c.Close() })
	return client, r.c
}

// flow drives one HandleTCP call the way netstack would: it is the
// TCPAttempt, and abandon plays a client that sends an RST while waiting.
type flow struct {
	client   net.Conn // test side, valid once accepted
	server   net.Conn
	accepted chan struct{}
	rejected chan struct{}
	ctx      context.Context
	abandon  context.CancelFunc
	done     chan struct{}
}

func startTCP(t testing.TB, e *Engine, in Ingress, src, dst string) *flow {
	t.Helper()
	c, server := tcpPair(t)
	f := &flow{client: c, server: server, accepted: make(chan struct{}), rejected: make(chan struct{}), done: make(chan struct{})}
	f.ctx, f.abandon = context.WithCancel(context.Background())
	t.Cleanup(f.abandon)
	go func() {
		defer close(f.done)
		e.HandleTCP(in, netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst), f)
	}()
	return f
}

func (f *flow) Accept() (net.Conn, error) { close(f.accepted); return f.server, nil }
func (f *flow) Reject()                   { close(f.rejected); f.server.Close() }
func (f *flow) Context() context.Context  { return f.ctx }

// wait reports "accepted" or "rejected", whichever happens first.
func (f *flow) wait(t testing.TB) string {
	t.Helper()
	select {
	case <-f.accepted:
		return "accepted"
	case <-f.rejected:
		return "rejected"
	case <-time.After(10 * time.Second):
		t.Fatal("flow neither accepted nor rejected")
		return ""
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ticks returns a hook that hands each call to a receiver waiting on the
// channel and drops calls nobody waits for, and the channel. A value received
// therefore comes from a call made while the test waited.
func ticks[T any]() (func(T), chan T) {
	c := make(chan T)
	return func(v T) {
		select {
		case c <- v:
		default:
		}
	}, c
}

// nextTick waits for the next value on c.
func nextTick[T any](t testing.TB, c chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("no %s within 10s", what)
		var zero T
		return zero
	}
}

func mappingStatus(t testing.TB, e *Engine, name string) MappingStatus {
	t.Helper()
	for _, m := range e.Snapshot().Mappings {
		if m.Name == name {
			return m
		}
	}
	t.Fatalf("mapping %q not in snapshot", name)
	return MappingStatus{}
}

// hangDialer blocks every dial to addrs until the context ends; others go
// to a real dialer.
type hangDialer struct {
	hang map[string]bool
	real net.Dialer
}

func (d *hangDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if d.hang[addr] {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return d.real.DialContext(ctx, network, addr)
}

// closedPort returns a loopback TCP port with nothing listening.
func closedPort(t testing.TB) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	return p
}

func readAllTimeout(c net.Conn, d time.Duration) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return b, err
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// expectEcho writes msg on c and reads it back from an echo target.
func expectEcho(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo = %q, %v; want %q", buf, err, msg)
	}
	c.SetReadDeadline(time.Time{})
}
