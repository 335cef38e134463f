package tunnel

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
)

// frames encodes msgs as a stream.
func frames(t testing.TB, msgs ...[]byte) []byte {
	t.Helper()
	var b bytes.Buffer
	w := bufio.NewWriter(&b)
	for _, m := range msgs {
		if err := writeFrame(w, m); err != nil {
			t.Fatal(err)
		}
	}
	w.Flush()
	return b.Bytes()
}

// testFrameLimit is a 1420-byte packet in a transport message.
const testFrameLimit = 1420 + 32

func msgOf(n int, fill byte) []byte { return bytes.Repeat([]byte{fill}, n) }

// TestReadFramePartialReads: frames split anywhere (one byte per read, half
// reads) come out whole and in order, and a stream cut inside a frame is
// an unexpected EOF, not a short message.
func TestReadFramePartialReads(t *testing.T) {
	limit := testFrameLimit
	msgs := [][]byte{msgOf(minFrame, 1), msgOf(148, 2), msgOf(limit, 3), msgOf(poolFrame+1, 4)}
	data := frames(t, msgs[:3]...)
	for name, r := range map[string]io.Reader{
		"one byte": iotest.OneByteReader(bytes.NewReader(data)),
		"half":     iotest.HalfReader(bytes.NewReader(data)),
		"data+err": iotest.DataErrReader(bytes.NewReader(data)),
	} {
		for i, want := range msgs[:3] {
			b, n, err := readFrame(r, limit)
			if err != nil || !bytes.Equal((*b)[:n], want) {
				t.Fatalf("%s: frame %d: %d bytes, %v", name, i, n, err)
			}
			putFrameBuf(b)
		}
		if _, _, err := readFrame(r, limit); err != io.EOF {
			t.Fatalf("%s: after the last frame: %v, want EOF", name, err)
		}
	}
	// Larger than the pool's buffers (a big tunnel MTU).
	big := frames(t, msgs[3])
	if b, n, err := readFrame(bytes.NewReader(big), 9032); err != nil || !bytes.Equal((*b)[:n], msgs[3]) {
		t.Fatalf("big frame: %d, %v", n, err)
	}
	for cut := 1; cut < frameHeader+minFrame; cut++ {
		if _, _, err := readFrame(bytes.NewReader(data[:cut]), limit); err != io.ErrUnexpectedEOF {
			t.Fatalf("stream cut at %d: %v, want unexpected EOF", cut, err)
		}
	}
}

// TestReadFrameSizeRefused: lengths under a keepalive or over the limit are
// refused before anything is read or allocated for them.
func TestReadFrameSizeRefused(t *testing.T) {
	limit := testFrameLimit
	for _, n := range []int{0, 1, minFrame - 1, limit + 1, 0xffff} {
		var h [2]byte
		binary.BigEndian.PutUint16(h[:], uint16(n))
		r := bytes.NewReader(append(h[:], make([]byte, 16)...))
		_, _, err := readFrame(r, limit)
		if !errors.Is(err, errFrameSize) {
			t.Fatalf("length %d: %v, want errFrameSize", n, err)
		}
		if r.Len() != 16 {
			t.Fatalf("length %d: read %d bytes past the header", n, 16-r.Len())
		}
	}
	w := bufio.NewWriter(io.Discard)
	if err := writeFrame(w, msgOf(minFrame-1, 0)); !errors.Is(err, errFrameSize) {
		t.Fatalf("write of a short message: %v", err)
	}
	if err := writeFrame(w, msgOf(0x10000, 0)); !errors.Is(err, errFrameSize) {
		t.Fatalf("write of a 64 KiB message: %v", err)
	}
}

// FuzzReadFrame: any byte stream yields frames of valid sizes that
// re-encode to a prefix of the input, then one error; never a panic.
func FuzzReadFrame(f *testing.F) {
	f.Add(frames(f, msgOf(minFrame, 1), msgOf(148, 2)))
	f.Add([]byte{0, 0})
	f.Add([]byte{0xff, 0xff, 1, 2, 3})
	f.Add([]byte{0, 40, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		limit := testFrameLimit
		r := bytes.NewReader(data)
		var out bytes.Buffer
		w := bufio.NewWriter(&out)
		for {
			b, n, err := readFrame(r, limit)
			if err != nil {
				break
			}
			if n < minFrame || n > limit {
				t.Fatalf("frame of %d bytes accepted", n)
			}
			if err := writeFrame(w, (*b)[:n]); err != nil {
				t.Fatal(err)
			}
			putFrameBuf(b)
		}
		w.Flush()
		if !bytes.HasPrefix(data, out.Bytes()) {
			t.Fatalf("re-encoded frames are not a prefix of the input")
		}
	})
}

// TestStreamQueueBounded: a peer that stops reading fills its stream's
// write queue; sends past it are dropped and counted, and never block.
func TestStreamQueueBounded(t *testing.T) {
	a, b := net.Pipe() // unbuffered: nothing is written until b reads
	defer b.Close()
	var cnt streamCounters
	s := newStream(a, testFrameLimit, &cnt)
	defer s.closeWith(nil)
	go s.writeLoop()
	msg := msgOf(100, 7)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 4 * streamQueue {
			s.enqueue([][]byte{msg})
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("enqueue blocked on a peer that does not read")
	}
	// Held: the queue, and what the writer took into its buffer before the
	// flush blocked.
	total := uint64(4 * streamQueue)
	held := uint64(streamQueue + streamBufSize/(len(msg)+frameHeader) + 1)
	d := cnt.dropped.Load()
	if d+held < total || d >= total {
		t.Fatalf("dropped %d of %d, want all but at most %d", d, total, held)
	}
	// Everything not dropped arrives intact once the peer reads.
	r := bufio.NewReader(b)
	for i := range total - d {
		b.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, n, err := readFrame(r, testFrameLimit)
		if err != nil || !bytes.Equal((*got)[:n], msg) {
			t.Fatalf("queued frame %d of %d: %v", i, total-d, err)
		}
	}
}

// testRelayKeys is a relay key and one peer key.
func testRelayKeys(t *testing.T) (relay, peer conf.Key) {
	t.Helper()
	var err error
	if relay, err = conf.GenerateKey(); err != nil {
		t.Fatal(err)
	}
	if peer, err = conf.GenerateKey(); err != nil {
		t.Fatal(err)
	}
	return relay, peer
}

func testStreamServer(t *testing.T, relay, peer conf.Key, o options) *streamServer {
	t.Helper()
	lookup := func(k conf.Key) (string, bool) { return "a", k == peer.Public() }
	s, err := listenStreams("127.0.0.1:0", conf.DefaultTCPCongestion, newStreamBind(newUDPBind()), relay, lookup, o,
		zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	return s
}

// dialAuth dials addr with TLS and runs the appliance's proof.
func dialAuth(addr string, priv, relayPub conf.Key) error {
	tc, err := tls.Dial("tcp", addr, streamClientTLS(""))
	if err != nil {
		return err
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if tc.ConnectionState().NegotiatedProtocol != "h2" {
		return errors.New("alpn " + tc.ConnectionState().NegotiatedProtocol)
	}
	return streamAuthClient(tc, priv, relayPub)
}

// TestStreamAuth: the right keys pass; a wrong relay key, an unknown
// appliance key, and a proxy terminating TLS in the middle are refused.
func TestStreamAuth(t *testing.T) {
	relay, peer := testRelayKeys(t)
	s := testStreamServer(t, relay, peer, buildOptions(nil))
	addr := s.Addr().String()
	if err := dialAuth(addr, peer, relay.Public()); err != nil {
		t.Fatalf("right keys: %v", err)
	}
	waitCond(t, "an accepted stream", func() bool { return s.status().accepted == 1 })

	other, _ := conf.GenerateKey()
	if err := dialAuth(addr, peer, other.Public()); !errors.Is(err, errRelayProof) {
		t.Fatalf("wrong relay key: %v, want errRelayProof", err)
	}
	if err := dialAuth(addr, other, relay.Public()); !errors.Is(err, errRelayProof) {
		t.Fatalf("unknown appliance: %v, want errRelayProof", err)
	}

	// A TLS-terminating proxy with its own certificate, passing the
	// plaintext through: the proofs are bound to each leg's session.
	mitmCfg, err := streamServerTLS("relay.example.net")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", mitmCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		up, err := tls.Dial("tcp", addr, streamClientTLS(""))
		if err != nil {
			return
		}
		defer up.Close()
		go io.Copy(up, c)
		io.Copy(c, up)
	}()
	if err := dialAuth(ln.Addr().String(), peer, relay.Public()); !errors.Is(err, errRelayProof) {
		t.Fatalf("through a TLS-terminating proxy: %v, want errRelayProof", err)
	}
	waitCond(t, "the refusals counted", func() bool {
		st := s.status()
		return st.accepted == 1 && st.refused[streamRefusedAuth]+st.refused[streamRefusedHandshake] == 3
	})
}

// TestStreamServerPendingBound: connections that never finish TLS hold one
// of the pending slots for at most the handshake deadline; past the slots,
// new connections are closed at once and counted.
func TestStreamServerPendingBound(t *testing.T) {
	relay, peer := testRelayKeys(t)
	o := buildOptions([]Option{WithStreamLimits(2, 500*time.Millisecond)})
	s := testStreamServer(t, relay, peer, o)
	var idle []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	waitCond(t, "both slots taken", func() bool { return len(s.pending) == 2 })
	c, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF && !isReset(err) {
		t.Fatalf("third connection: %v, want closed", err)
	}
	if n := s.status().refused[streamRefusedBusy]; n != 1 {
		t.Fatalf("busy refusals %d, want 1", n)
	}
	start := time.Now()
	for _, c := range idle {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c); err != nil && !isReset(err) {
			t.Fatalf("idle connection: %v, want closed by the deadline", err)
		}
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("idle connections closed after %v, deadline 500ms", d)
	}
	waitCond(t, "handshake refusals", func() bool { return s.status().refused[streamRefusedHandshake] == 2 && len(s.pending) == 0 })
	if err := dialAuth(s.Addr().String(), peer, relay.Public()); err != nil {
		t.Fatalf("after the slots freed: %v", err)
	}
}

// TestStreamServerFrameRefused: an authenticated peer sending an oversize
// frame loses its stream, counted as "frame".
func TestStreamServerFrameRefused(t *testing.T) {
	relay, peer := testRelayKeys(t)
	s := testStreamServer(t, relay, peer, buildOptions(nil))
	tc, err := tls.Dial("tcp", s.Addr().String(), streamClientTLS(""))
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := streamAuthClient(tc, peer, relay.Public()); err != nil {
		t.Fatal(err)
	}
	waitCond(t, "the stream up", func() bool { return s.status().streams == 1 })
	var h [2]byte
	binary.BigEndian.PutUint16(h[:], uint16(maxStreamFrame+1))
	tc.Write(h[:])
	if _, err := io.ReadAll(tc); err != nil && !isReset(err) && !strings.Contains(err.Error(), "closed") {
		t.Fatalf("after an oversize frame: %v", err)
	}
	waitCond(t, "the frame refusal", func() bool {
		st := s.status()
		return st.refused[streamRefusedFrame] == 1 && st.streams == 0
	})
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "broken pipe"))
}

func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
