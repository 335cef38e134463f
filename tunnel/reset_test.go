package tunnel_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/testutil"
)

// TestRelayPassesResets: a target that resets mid-response reaches the
// public client, through the appliance, the tunnel and the relay, as a
// reset (never as a clean end that would pass the cut answer off as
// complete); a public client's reset reaches the target the same way.
func TestRelayPassesResets(t *testing.T) {
	t.Parallel()
	partial := bytes.Repeat([]byte("cut answer "), 6000) // 66 KB: many segments
	cut := testutil.ServeTCP(t, "127.0.0.1:0", testutil.CutResponse(partial))
	targetErr := make(chan error, 1)
	targetRead := make(chan struct{})
	reader := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(15 * time.Second))
		if _, err := c.Read(make([]byte, 64)); err != nil {
			targetErr <- err
			return
		}
		close(targetRead)
		_, err := testutil.ReadToError(c, 15*time.Second)
		targetErr <- err
	})
	rude := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) { c.SetLinger(0); c.Close() })
	cutPort, readerPort, rudePort := freePort(t, false), freePort(t, false), freePort(t, false)
	cutSpec, readerSpec, rudeSpec := fmt.Sprintf("tcp/%d", cutPort), fmt.Sprintf("tcp/%d", readerPort), fmt.Sprintf("tcp/%d", rudePort)
	key := mustKey(t)
	relay := startRelay(t, onePeerRelayConfig(t, key, cutSpec, readerSpec, rudeSpec), testLogger(t))
	// No PROXY header: the targets' first bytes are the client's.
	a := startAppliance(t, relay, key, applAddrA,
		mappingTOML("cut", "tcp", cutPort, cut.Port(), "")+mappingTOML("reader", "tcp", readerPort, reader.Port(), "")+
			mappingTOML("rude", "tcp", rudePort, rude.Port(), ""))
	waitRegistered(t, a, cutSpec, readerSpec, rudeSpec)

	t.Run("target resets at once", func(t *testing.T) {
		expectReset(t, netip.AddrPortFrom(loopback4, rudePort))
	})

	t.Run("target resets", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, cutPort).String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("GET"))
		got, err := testutil.ReadToError(c, 15*time.Second)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("public client read %d bytes then %v, want connection reset", len(got), err)
		}
		if !bytes.HasPrefix(partial, got) {
			t.Fatalf("public client read %d bytes that are not a prefix of the %d sent", len(got), len(partial))
		}
	})

	t.Run("client resets", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(loopback4, readerPort).String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("half a request"))
		// Once the flow reaches the target: a client that resets before
		// its bytes left the relay never makes the target connect (on a
		// warm stream, tunnel/warm.go, the target is dialed for the first
		// bytes).
		select {
		case <-targetRead:
		case err := <-targetErr:
			t.Fatalf("target read %v before any byte", err)
		case <-time.After(15 * time.Second):
			t.Fatal("the request never reached the target")
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		select {
		case err := <-targetErr:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("target read ended with %v, want connection reset", err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("target read never ended")
		}
	})
}
