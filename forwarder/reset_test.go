package forwarder

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
)

// resetConn closes c with an RST, as a crashing or aborting peer does.
func resetConn(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// wantReset checks that a peer read a prefix of sent and then a reset: the
// splice may pass the reset on before all of sent crossed (a reset discards
// data in flight), but never ends the stream cleanly.
func wantReset(t *testing.T, who string, got []byte, err error, sent []byte) {
	t.Helper()
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s read %d bytes then %v, want connection reset", who, len(got), err)
	}
	if !bytes.HasPrefix(sent, got) {
		t.Fatalf("%s read %d bytes that are not a prefix of the %d sent", who, len(got), len(sent))
	}
}

// TestSplicePassesResets: a reset or failed read on one side reaches the
// other side as a reset, also when the other side has half-closed, and a
// clean close still reaches it as a FIN with every byte.
func TestSplicePassesResets(t *testing.T) {
	t.Parallel()
	partial := bytes.Repeat([]byte("partial answer "), 4000) // 60 KB: many segments
	tests := []struct {
		name string
		// run plays the client (aUser) and target (bUser) ends.
		run func(t *testing.T, aUser, bUser net.Conn)
		// wantErr is the error Splice returns (nil: none).
		wantErr error
	}{
		{"target resets mid-response", func(t *testing.T, aUser, bUser net.Conn) {
			aUser.Write([]byte("GET"))
			if _, err := io.ReadFull(bUser, make([]byte, 3)); err != nil {
				t.Fatal(err)
			}
			writeThenReset(t, bUser, aUser, "client", partial)
		}, syscall.ECONNRESET},
		{"client resets mid-request", func(t *testing.T, aUser, bUser net.Conn) {
			writeThenReset(t, aUser, bUser, "target", partial)
		}, syscall.ECONNRESET},
		{"target resets after the client half-closed", func(t *testing.T, aUser, bUser net.Conn) {
			halfClose(t, aUser, bUser, "GET", "target")
			writeThenReset(t, bUser, aUser, "client", partial)
		}, syscall.ECONNRESET},
		{"client resets after the target half-closed", func(t *testing.T, aUser, bUser net.Conn) {
			halfClose(t, bUser, aUser, "banner", "client")
			writeThenReset(t, aUser, bUser, "target", partial)
		}, syscall.ECONNRESET},
		{"clean close is a FIN with every byte", func(t *testing.T, aUser, bUser net.Conn) {
			aUser.Write([]byte("GET"))
			if _, err := io.ReadFull(bUser, make([]byte, 3)); err != nil {
				t.Fatal(err)
			}
			bUser.Write(partial)
			bUser.Close()
			got, err := testutil.ReadToError(aUser, 10*time.Second)
			if err != io.EOF || !bytes.Equal(got, partial) {
				t.Fatalf("client read %d of %d bytes, then %v; want all, then EOF", len(got), len(partial), err)
			}
			aUser.Close()
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			aUser, a := tcpPair(t)
			bUser, b := tcpPair(t)
			done := make(chan error, 1)
			go func() {
				_, _, err := Splice(t.Context(), a, b, 0)
				done <- err
			}()
			tt.run(t, aUser, bUser)
			select {
			case err := <-done:
				if tt.wantErr == nil && err != nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Fatalf("Splice: %v, want %v", err, tt.wantErr)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Splice did not return")
			}
		})
	}
}

// TestTCPResetsCounted: through the engine, a reset is passed on in each
// direction and counted per mapping.
func TestTCPResetsCounted(t *testing.T) {
	t.Parallel()
	partial := bytes.Repeat([]byte("cut "), 10000)
	cut := testutil.ServeTCP(t, "127.0.0.1:0", testutil.CutResponse(partial))
	targetGot := make(chan error, 1)
	reader := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		_, err := testutil.ReadToError(c, 10*time.Second)
		targetGot <- err
	})
	e := newEngine(t, config(
		mapping("cut", conf.TCP, "80", cut.String()),
		mapping("reader", conf.TCP, "81", reader.String()),
	), Options{})
	tun := newIngress(conf.IngressTUN)

	f := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	f.client.Write([]byte("GET"))
	got, err := testutil.ReadToError(f.client, 10*time.Second)
	wantReset(t, "client", got, err, partial)
	<-f.done
	if ms := mappingStatus(t, e, "cut"); ms.ResetsToClient != 1 || ms.ResetsToTarget != 0 {
		t.Fatalf("cut: resets to client %d, to target %d; want 1 and 0", ms.ResetsToClient, ms.ResetsToTarget)
	}

	f = startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:81")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	f.client.Write([]byte("half a request"))
	resetConn(t, f.client)
	if err := <-targetGot; !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("target read ended with %v, want connection reset", err)
	}
	<-f.done
	if ms := mappingStatus(t, e, "reader"); ms.ResetsToTarget != 1 || ms.ResetsToClient != 0 {
		t.Fatalf("reader: resets to target %d, to client %d; want 1 and 0", ms.ResetsToTarget, ms.ResetsToClient)
	}
}

// writeThenReset writes partial on from, resets it, and wants to (named
// who) to read a prefix of partial and then the reset, never an EOF.
func writeThenReset(t *testing.T, from, to net.Conn, who string, partial []byte) {
	t.Helper()
	from.Write(partial)
	resetConn(t, from)
	got, err := testutil.ReadToError(to, 10*time.Second)
	wantReset(t, who, got, err, partial)
}

// halfClose sends msg from one side and shuts its write half; the other
// side (named who) must read msg and then a clean EOF.
func halfClose(t *testing.T, from, to net.Conn, msg, who string) {
	t.Helper()
	from.Write([]byte(msg))
	from.(*net.TCPConn).CloseWrite()
	if got, err := readAllTimeout(to, 10*time.Second); err != nil || string(got) != msg {
		t.Fatalf("%s read %q, %v; want %q, then EOF", who, got, err, msg)
	}
}
