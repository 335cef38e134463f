package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Addresses of the two in-memory stacks (nothing leaves the process).
var (
	clientPrefix4 = netip.MustParsePrefix("10.0.0.1/24")
	serverPrefix4 = netip.MustParsePrefix("10.0.0.2/24")
	clientPrefix6 = netip.MustParsePrefix("fd00::1/64")
	serverPrefix6 = netip.MustParsePrefix("fd00::2/64")
)

// funcHandler adapts functions to Handler; nil tcp rejects, nil udp ignores.
type funcHandler struct {
	tcp func(r *TCPRequest)
	udp func(src, dst netip.AddrPort, payload []byte)
}

func (h funcHandler) HandleTCP(r *TCPRequest) {
	if h.tcp == nil {
		r.Reject()
		return
	}
	h.tcp(r)
}

func (h funcHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	if h.udp != nil {
		h.udp(src, dst, payload)
	}
}

// echoTCP accepts every connection and echoes it, half-closing after the
// client's end of stream.
func echoTCP(r *TCPRequest) {
	c, err := r.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	io.Copy(c, c)
	c.(closeWriter).CloseWrite()
}

// sinkServer accepts every connection, reads it to its end and reports on
// got how many bytes it read.
func sinkServer(got chan<- int64) funcHandler {
	return funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}}
}

// newPair joins a client Stack and a server Stack with a Pipe.
func newPair(t testing.TB, client, server Handler) (c, s *Stack) {
	t.Helper()
	return newPairConfig(t, Config{}, client, server)
}

// newPairConfig is newPair with the server's Config (Addresses are set
// here).
func newPairConfig(t testing.TB, serverCfg Config, client, server Handler) (c, s *Stack) {
	t.Helper()
	return newPairMTU(t, 1500, serverCfg, client, server)
}

// newPairMTU is newPairConfig over a Pipe of the given MTU.
func newPairMTU(t testing.TB, mtu int, serverCfg Config, client, server Handler) (c, s *Stack) {
	t.Helper()
	a, b := Pipe(mtu)
	log := zap.NewNop()
	if tt, ok := t.(*testing.T); ok {
		log = zaptest.NewLogger(tt, zaptest.Level(zap.WarnLevel))
	}
	c, err := New(a, Config{Addresses: []netip.Prefix{clientPrefix4, clientPrefix6}}, client, log.Named("client"))
	if err != nil {
		t.Fatalf("new client stack: %v", err)
	}
	serverCfg.Addresses = []netip.Prefix{serverPrefix4, serverPrefix6}
	s, err = New(b, serverCfg, server, log.Named("server"))
	if err != nil {
		c.Close()
		t.Fatalf("new server stack: %v", err)
	}
	t.Cleanup(func() {
		s.Close()
		c.Close()
	})
	runStack(t, c)
	runStack(t, s)
	return c, s
}

// closeWriter is what both gonet and net.TCPConn offer.
type closeWriter interface {
	CloseWrite() error
	CloseRead() error
}

// splice copies both ways with half-close and returns when both are done.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.(closeWriter).CloseWrite()
		src.(closeWriter).CloseRead()
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// spliceTo returns a TCP handler that dials target on loopback first and
// splices the accepted client conn to it, or rejects if the dial fails.
func spliceTo(target string) func(r *TCPRequest) {
	return func(r *TCPRequest) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var d net.Dialer
		up, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			r.Reject()
			return
		}
		c, err := r.Accept()
		if err != nil {
			up.Close()
			return
		}
		splice(c, up)
	}
}

// loopbackServer serves each connection with fn on 127.0.0.1 until the test
// ends.
func loopbackServer(t testing.TB, fn func(c *net.TCPConn)) string {
	t.Helper()
	return testutil.ServeTCP(t, "127.0.0.1:0", fn).String()
}

// echo copies everything back and then closes its write side.
var echo = testutil.Echo

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF)
}

func contextWithTimeout(t testing.TB, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
