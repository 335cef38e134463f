package app_test

import (
	"bytes"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/internal/testutil"
	"github.com/natbox/natbox/netstack"
)

// TestTCPResetsPassThrough: through the gateway, a target that resets
// mid-response reaches the client as a reset (never as a clean end that
// would pass the cut answer off as complete), and a client's reset reaches
// the target as one. Both are counted on the mapping.
func TestTCPResetsPassThrough(t *testing.T) {
	t.Parallel()
	partial := bytes.Repeat([]byte("cut answer "), 6000) // 66 KB: many segments
	cut := serveTCP(t, testutil.CutResponse(partial))
	targetErr := make(chan error, 1)
	reader := serveTCP(t, func(c *net.TCPConn) {
		_, err := testutil.ReadToError(c, 10*time.Second)
		targetErr <- err
	})
	rude := serveTCP(t, func(c *net.TCPConn) { c.SetLinger(0); c.Close() })
	h := newHarness(t, spec{Mappings: mapping("cut", "tcp", "8080", cut.String()) +
		mapping("reader", "tcp", "8081", reader.String()) + mapping("rude", "tcp", "8082", rude.String())}, app.Options{})

	t.Run("target resets at once", func(t *testing.T) {
		// natbox completes the client's handshake once its dial of the
		// target returned: a reset that beats that dial fails it (the
		// client is refused, as if it had connected directly); a later one
		// meets the client's dial or its first read.
		c, err := h.dial(ap(client4, 0), ap(public4, 8082))
		if errors.Is(err, errRefused) && h.mappingStatus("rude").Refusals["dial_failed"] == 1 {
			return
		}
		if err == nil {
			defer c.Close()
			var got []byte
			got, err = testutil.ReadToError(c, 10*time.Second)
			if len(got) != 0 {
				t.Fatalf("client read %q from a target that sent nothing", got)
			}
		}
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("client: %v, want connection reset", err)
		}
	})

	t.Run("target resets", func(t *testing.T) {
		c := h.mustDial(ap(client4, 0), ap(public4, 8080))
		c.Write([]byte("GET"))
		got, err := testutil.ReadToError(c, 10*time.Second)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("client read %d bytes then %v, want connection reset", len(got), err)
		}
		if !bytes.HasPrefix(partial, got) {
			t.Fatalf("client read %d bytes that are not a prefix of the %d sent", len(got), len(partial))
		}
		waitFor(t, 5*time.Second, "the reset counted", func() bool {
			return h.mappingStatus("cut").ResetsToClient == 1
		})
	})

	t.Run("client resets", func(t *testing.T) {
		c := h.mustDial(ap(client4, 0), ap(public4, 8081))
		c.Write([]byte("half a request"))
		if err := c.(netstack.TCPConn).Abort(); err != nil {
			t.Fatalf("abort: %v", err)
		}
		select {
		case err := <-targetErr:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("target read ended with %v, want connection reset", err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("target read never ended")
		}
		waitFor(t, 5*time.Second, "the reset counted", func() bool {
			// Counted whether the reset met the session or, when it came
			// within the handshake, the accept.
			return h.mappingStatus("reader").ResetsToTarget == 1
		})
	})
	if m := h.mappingStatus("cut"); m.ResetsToTarget != 0 {
		t.Fatalf("cut: %d resets to the target, want 0", m.ResetsToTarget)
	}
}
