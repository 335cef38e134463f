package forwarder

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/testutil"
)

func TestTCPForwardHalfClose(t *testing.T) {
	t.Parallel()
	port := tcpEcho(t)
	core, logs := observer.New(zapcore.InfoLevel)
	cfg := config(mapping("echo", conf.TCP, "8000", "127.0.0.1:"+itoa(port)))
	cfg.Log.Connections = true
	e := newEngine(t, cfg, Options{ConnLog: zap.New(core)})
	tun := newIngress(conf.IngressTUN)

	f := startTCP(t, e, tun, "203.0.113.5:40000", "198.51.100.1:8000")
	if got := f.wait(t); got != "accepted" {
		t.Fatalf("flow %s, want accepted", got)
	}
	msg := []byte("hello through natbox")
	if _, err := f.client.Write(msg); err != nil {
		t.Fatal(err)
	}
	// Half-close: the echo only finishes after our EOF, so getting the echo
	// and then EOF proves the FIN crossed and came back.
	f.client.(*net.TCPConn).CloseWrite()
	got, err := readAllTimeout(f.client, 5*time.Second)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, %v; want %q", got, err, msg)
	}
	<-f.done
	ms := mappingStatus(t, e, "echo")
	if ms.BytesIn != uint64(len(msg)) || ms.BytesOut != uint64(len(msg)) || ms.SessionsOpened != 1 || ms.SessionsActive != 0 {
		t.Fatalf("status = %+v", ms)
	}
	if ms.DialLatency.Count != 1 {
		t.Fatalf("dial latency count = %d, want 1", ms.DialLatency.Count)
	}
	entries := logs.FilterMessage("connection").All()
	if len(entries) != 1 {
		t.Fatalf("connection log has %d lines, want 1", len(entries))
	}
	fields := entries[0].ContextMap()
	if fields["src"] != "203.0.113.5:40000" || fields["rule"] != "echo" || fields["bytes_rx"] != uint64(len(msg)) {
		t.Fatalf("connection log fields = %v", fields)
	}
}

func TestTCPLargeTransfer(t *testing.T) {
	t.Parallel()
	port := tcpEcho(t)
	e := newEngine(t, config(mapping("echo", conf.TCP, "8000", "127.0.0.1:"+itoa(port))), Options{})
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.5:40000", "198.51.100.1:8000")
	if f.wait(t) != "accepted" {
		t.Fatal("not accepted")
	}
	const size = 16 << 20
	data := make([]byte, size)
	rand.Read(data)
	want := sha256.Sum256(data)
	go func() {
		f.client.Write(data)
		f.client.(*net.TCPConn).CloseWrite()
	}()
	h := sha256.New()
	f.client.SetReadDeadline(time.Now().Add(20 * time.Second))
	n, err := io.Copy(h, f.client)
	if err != nil || n != size {
		t.Fatalf("read %d bytes, %v; want %d", n, err, size)
	}
	if !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("checksum mismatch")
	}
	<-f.done
}

func TestTCPRefusals(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	dead := closedPort(t)
	guarded := mapping("guarded", conf.TCP, "22", "127.0.0.1:"+itoa(echo))
	guarded.Allow = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	guarded.Deny = []netip.Prefix{netip.MustParsePrefix("192.0.2.66/32")}
	e := newEngine(t, config(guarded, mapping("dead", conf.TCP, "81", "127.0.0.1:"+itoa(dead))), Options{})
	tun := newIngress(conf.IngressTUN)
	tests := []struct {
		name, src, dst, rule, reason string
	}{
		{"no match", "192.0.2.1:1000", "198.51.100.1:9999", "", "no_match"},
		{"denied", "192.0.2.66:1000", "198.51.100.1:22", "guarded", "denied"},
		{"not allowed", "203.0.113.1:1000", "198.51.100.1:22", "guarded", "not_allowed"},
		{"dial failed", "203.0.113.1:1000", "198.51.100.1:81", "dead", "dial_failed"},
	}
	for _, tt := range tests {
		f := startTCP(t, e, tun, tt.src, tt.dst)
		if got := f.wait(t); got != "rejected" {
			t.Fatalf("%s: flow %s, want rejected", tt.name, got)
		}
		<-f.done
		st := e.Snapshot()
		var n uint64
		if tt.rule == "" {
			n = st.Unmatched[tt.reason]
		} else {
			n = mappingStatus(t, e, tt.rule).Refusals[tt.reason]
		}
		if n != 1 {
			t.Fatalf("%s: refusals[%s] = %d, want 1", tt.name, tt.reason, n)
		}
	}
	// The allowed client still gets through.
	f := startTCP(t, e, tun, "192.0.2.1:1000", "198.51.100.1:22")
	if f.wait(t) != "accepted" {
		t.Fatal("allowed client rejected")
	}
}

// TestTCPDialFirst: the client's handshake completes only after the target
// answered, and a target that never answers is rejected after dial_timeout.
func TestTCPDialFirst(t *testing.T) {
	t.Parallel()
	cfg := config(mapping("slow", conf.TCP, "80", "127.0.0.1:1"))
	cfg.Limits.DialTimeout = conf.Duration(300 * time.Millisecond)
	e := newEngine(t, cfg, Options{Dialer: &hangDialer{hang: map[string]bool{"127.0.0.1:1": true}}})
	start := time.Now()
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1000", "198.51.100.1:80")
	select {
	case <-f.accepted:
		t.Fatal("accepted before the dial finished")
	case <-f.rejected:
		if el := time.Since(start); el < 250*time.Millisecond {
			t.Fatalf("rejected after %v, before the dial timeout", el)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("never rejected")
	}
	<-f.done
	if n := mappingStatus(t, e, "slow").Refusals["dial_failed"]; n != 1 {
		t.Fatalf("dial_failed = %d, want 1", n)
	}
}

// TestTCPAbandonedDialCancelled: a client that gives up (RST) while the
// target does not answer stops the dial at once, frees its in-flight budget
// and is not counted as the target's failure.
func TestTCPAbandonedDialCancelled(t *testing.T) {
	t.Parallel()
	cfg := config(mapping("slow", conf.TCP, "80", "127.0.0.1:1"))
	cfg.Limits.DialTimeout = conf.Duration(time.Minute)
	cfg.Limits.MaxInflightPerSource = 1
	e := newEngine(t, cfg, Options{Dialer: &hangDialer{hang: map[string]bool{"127.0.0.1:1": true}}})
	tun := newIngress(conf.IngressTUN)
	f := startTCP(t, e, tun, "203.0.113.1:1000", "198.51.100.1:80")
	waitFor(t, "the dial in flight", func() bool { return e.Snapshot().InflightDials == 1 })
	// While it hangs, the source's only in-flight slot is taken.
	if g := startTCP(t, e, tun, "203.0.113.1:1001", "198.51.100.1:80"); g.wait(t) != "rejected" {
		t.Fatal("second attempt from the source admitted while the first one held its budget")
	}
	f.abandon()
	select {
	case <-f.done:
	case <-time.After(5 * time.Second):
		t.Fatal("abandoned attempt still dialing after 5 s (dial_timeout 1m)")
	}
	if n := e.Snapshot().InflightDials; n != 0 {
		t.Fatalf("in-flight dials = %d after the client gave up, want 0", n)
	}
	if n := mappingStatus(t, e, "slow").Refusals["dial_failed"]; n != 0 {
		t.Fatalf("dial_failed = %d, want 0: the client gave up, the target did not fail", n)
	}
	// The budget is free again: the next attempt from that source dials.
	h := startTCP(t, e, tun, "203.0.113.1:1002", "198.51.100.1:80")
	waitFor(t, "the next attempt dialing", func() bool { return e.Snapshot().InflightDials == 1 })
	h.abandon()
	<-h.done
}

// TestTCPBudgets: flows stuck dialing a dead target hit the per-target
// budget while another mapping keeps working.
func TestTCPBudgets(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	cfg := config(mapping("dead", conf.TCP, "80", "127.0.0.1:1"), mapping("live", conf.TCP, "81", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxInflightPerTarget = 4
	cfg.Limits.MaxInflightPerSource = 6
	cfg.Limits.DialTimeout = conf.Duration(2 * time.Second)
	e := newEngine(t, cfg, Options{Dialer: &hangDialer{hang: map[string]bool{"127.0.0.1:1": true}}})
	tun := newIngress(conf.IngressTUN)

	var stuck []*flow
	for i := range 4 {
		stuck = append(stuck, startTCP(t, e, tun, "203.0.113."+itoa(uint16(i+1))+":1000", "198.51.100.1:80"))
	}
	waitFor(t, "4 dials in flight", func() bool { return e.Snapshot().InflightDials == 4 })
	// A fifth flow to the dead target is refused at once.
	f := startTCP(t, e, tun, "203.0.113.99:1000", "198.51.100.1:80")
	start := time.Now()
	if f.wait(t) != "rejected" || time.Since(start) > time.Second {
		t.Fatal("over-budget flow not rejected promptly")
	}
	if n := mappingStatus(t, e, "dead").Refusals["over_limit_inflight_per_target"]; n != 1 {
		t.Fatalf("per-target refusals = %d, want 1", n)
	}
	// The other mapping is unaffected.
	live := startTCP(t, e, tun, "203.0.113.1:2000", "198.51.100.1:81")
	if live.wait(t) != "accepted" || time.Since(start) > time.Second {
		t.Fatal("a dead target stalled another mapping")
	}
	// Per-source: source .1 has one stuck dial; five more from it to the
	// live mapping fit (6), a dead-target one from it is refused by target.
	if budgetHits := mappingStatus(t, e, "dead").BudgetHits; budgetHits != 1 {
		t.Fatalf("budget hits = %d, want 1", budgetHits)
	}
	for _, s := range stuck {
		<-s.done
	}
}

func TestTCPLimits(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	m := mapping("capped", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	m.MaxSessions = 2
	cfg := config(m, mapping("other", conf.TCP, "81", "127.0.0.1:"+itoa(echo)))
	cfg.Limits.MaxSessions = 3
	cfg.Limits.MaxInflightPerSource = 1
	hang := &hangDialer{hang: map[string]bool{"127.0.0.1:1": true}}
	e := newEngine(t, cfg, Options{Dialer: hang})
	tun := newIngress(conf.IngressTUN)
	var open []*flow
	for i := range 2 {
		f := startTCP(t, e, tun, "203.0.113.1:"+itoa(uint16(1000+i)), "198.51.100.1:80")
		if f.wait(t) != "accepted" {
			t.Fatal("under the cap, rejected")
		}
		open = append(open, f)
	}
	waitFor(t, "2 active", func() bool { return mappingStatus(t, e, "capped").SessionsActive == 2 })
	if f := startTCP(t, e, tun, "203.0.113.1:1100", "198.51.100.1:80"); f.wait(t) != "rejected" {
		t.Fatal("mapping max_sessions not enforced")
	}
	f := startTCP(t, e, tun, "203.0.113.1:1200", "198.51.100.1:81")
	if f.wait(t) != "accepted" {
		t.Fatal("third session overall rejected")
	}
	open = append(open, f)
	waitFor(t, "3 active", func() bool { return e.Snapshot().ActiveSessions == 3 })
	if f := startTCP(t, e, tun, "203.0.113.1:1300", "198.51.100.1:81"); f.wait(t) != "rejected" {
		t.Fatal("global max_sessions not enforced")
	}
	if n := mappingStatus(t, e, "capped").Refusals["over_limit_mapping_sessions"]; n != 1 {
		t.Fatalf("mapping sessions refusals = %d", n)
	}
	if n := mappingStatus(t, e, "other").Refusals["over_limit_sessions"]; n != 1 {
		t.Fatalf("global sessions refusals = %d", n)
	}
	for _, f := range open {
		f.client.Close()
		<-f.done
	}
	waitFor(t, "0 active", func() bool { return e.Snapshot().ActiveSessions == 0 })

	// Global and per-source in-flight budgets.
	if err := func() error {
		cfg := config(mapping("dead", conf.TCP, "80", "127.0.0.1:1"), mapping("dead2", conf.TCP, "82", "127.0.0.2:1"))
		cfg.Limits.MaxInflight = 2
		cfg.Limits.MaxInflightPerSource = 1
		cfg.Limits.DialTimeout = conf.Duration(time.Second)
		_, err := e.Reload(cfg)
		return err
	}(); err != nil {
		t.Fatal(err)
	}
	a := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	waitFor(t, "1 in flight", func() bool { return e.Snapshot().InflightDials == 1 })
	if f := startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:80"); f.wait(t) != "rejected" {
		t.Fatal("per-source budget not enforced")
	}
	b := startTCP(t, e, tun, "203.0.113.2:1", "198.51.100.1:80")
	waitFor(t, "2 in flight", func() bool { return e.Snapshot().InflightDials == 2 })
	if f := startTCP(t, e, tun, "203.0.113.3:1", "198.51.100.1:82"); f.wait(t) != "rejected" {
		t.Fatal("global budget not enforced")
	}
	ms := mappingStatus(t, e, "dead")
	if ms.Refusals["over_limit_inflight_per_source"] != 1 || mappingStatus(t, e, "dead2").Refusals["over_limit_inflight"] != 1 {
		t.Fatalf("refusals = %v / %v", ms.Refusals, mappingStatus(t, e, "dead2").Refusals)
	}
	<-a.done
	<-b.done
}

func TestTCPIdleTimeout(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	m := mapping("idle", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	m.IdleTimeout = conf.Duration(time.Second)
	clock := newFakeClock()
	onCheck, checks := ticks[bool]()
	e := newEngine(t, config(m), Options{Clock: clock, IdleCheckInterval: 5 * time.Millisecond, onIdleCheck: onCheck})
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	// Each direction checks on its own goroutine, so of three checks the
	// test sees, at least one began after it started waiting.
	const checksSeen = 3
	noExpiry := func(what string) {
		t.Helper()
		for range checksSeen {
			if nextTick(t, checks, "idle check") {
				t.Fatalf("session closed %s", what)
			}
		}
	}
	// Traffic every 200 ms for 2 s keeps it open past 2 idle periods.
	for range 10 {
		clock.Advance(200 * time.Millisecond)
		expectEcho(t, f.client, "x")
		noExpiry("while active")
	}
	clock.Advance(time.Second - time.Millisecond)
	noExpiry("before the timeout")
	clock.Advance(time.Millisecond)
	select {
	case <-f.done:
	case <-time.After(5 * time.Second):
		t.Fatal("idle session not closed")
	}
	// The stream was cut, so the client reads a reset, not a clean end.
	buf := make([]byte, 1)
	f.client.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := f.client.Read(buf); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after the idle timeout: %v, want connection reset", err)
	}
	if ms := mappingStatus(t, e, "idle"); ms.TCPExpired != 1 || ms.ResetsToClient != 0 || ms.ResetsToTarget != 0 {
		t.Fatalf("expired %d, resets %d/%d; want 1, 0/0", ms.TCPExpired, ms.ResetsToClient, ms.ResetsToTarget)
	}
}

// TestSpliceHalfClose uses Splice directly: each side's EOF reaches the
// other while the reverse direction keeps flowing.
func TestSpliceHalfClose(t *testing.T) {
	t.Parallel()
	aUser, a := tcpPair(t)
	bUser, b := tcpPair(t)
	type result struct {
		ab, ba int64
		err    error
	}
	done := make(chan result, 1)
	go func() {
		ab, ba, err := Splice(t.Context(), a, b, 0)
		done <- result{ab, ba, err}
	}()
	aUser.Write([]byte("ping"))
	aUser.(*net.TCPConn).CloseWrite()
	got, err := readAllTimeout(bUser, 5*time.Second)
	if err != nil || string(got) != "ping" {
		t.Fatalf("b read %q, %v", got, err)
	}
	// b can still answer after a's half-close.
	bUser.Write([]byte("pong!"))
	bUser.(*net.TCPConn).CloseWrite()
	got, err = readAllTimeout(aUser, 5*time.Second)
	if err != nil || string(got) != "pong!" {
		t.Fatalf("a read %q, %v", got, err)
	}
	r := <-done
	if r.err != nil || r.ab != 4 || r.ba != 5 {
		t.Fatalf("Splice = %d, %d, %v", r.ab, r.ba, r.err)
	}
}

// TestSplicePipe covers conns without half-close (net.Pipe).
func TestSplicePipe(t *testing.T) {
	t.Parallel()
	aUser, a := net.Pipe()
	bUser, b := net.Pipe()
	defer aUser.Close()
	defer bUser.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(bUser, bUser) // echo on b's side
	}()
	done := make(chan error, 1)
	go func() {
		_, _, err := Splice(t.Context(), a, b, 0)
		done <- err
	}()
	aUser.Write([]byte("abc"))
	buf := make([]byte, 3)
	aUser.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(aUser, buf); err != nil || string(buf) != "abc" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	aUser.Close()
	if err := <-done; err != nil {
		t.Fatalf("Splice: %v", err)
	}
	bUser.Close()
	wg.Wait()
}

// handshakeTimeoutError is what netstack's Accept returns when the client
// never completed its handshake (forwarder knows it only by its method).
type handshakeTimeoutError struct{}

func (handshakeTimeoutError) Error() string          { return "client did not complete the handshake" }
func (handshakeTimeoutError) HandshakeTimeout() bool { return true }

// silentClient is a TCPAttempt whose client never answers the SYN-ACK.
type silentClient struct{ rejected chan struct{} }

func (a silentClient) Accept() (net.Conn, error) {
	return nil, fmt.Errorf("accept: %w", handshakeTimeoutError{})
}
func (a silentClient) Reject()                  { close(a.rejected) }
func (a silentClient) Context() context.Context { return context.Background() }

// TestTCPHandshakeTimeout: when the client never completes its handshake
// after the target was dialed, the target connection is closed at once and
// the mapping counts handshake_timeout (not dial_failed).
func TestTCPHandshakeTimeout(t *testing.T) {
	t.Parallel()
	closed := make(chan struct{}, 1)
	target := testutil.ServeTCP(t, "127.0.0.1:0", func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		// natbox resets the unused connection (no TIME_WAIT kept for a
		// spoofed SYN): the target reads a reset.
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, syscall.ECONNRESET) {
			closed <- struct{}{}
		}
	})
	cfg := config(mapping("web", conf.TCP, "80", target.String()))
	cfg.Limits.MaxSessions = 1
	e := newEngine(t, cfg, Options{})
	a := silentClient{rejected: make(chan struct{})}
	e.HandleTCP(newIngress(conf.IngressTUN), netip.MustParseAddrPort("192.0.2.9:1000"), netip.MustParseAddrPort("198.51.100.1:80"), a)
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the target connection was not closed after the handshake timed out")
	}
	ms := mappingStatus(t, e, "web")
	if ms.Refusals["handshake_timeout"] != 1 || ms.Refusals["dial_failed"] != 0 || ms.SessionsOpened != 0 {
		t.Fatalf("status = %+v; want one handshake_timeout refusal and no session", ms)
	}
	// The session slot is free again: a real client gets through.
	f := startTCP(t, e, newIngress(conf.IngressTUN), "192.0.2.10:1000", "198.51.100.1:80")
	if got := f.wait(t); got != "accepted" {
		t.Fatalf("next flow %s, want accepted (slot leaked)", got)
	}
}

// TestTargetDown: a failed dial marks the mapping's target down (the status
// page warns), the next good dial clears it.
func TestTargetDown(t *testing.T) {
	t.Parallel()
	port := closedPort(t)
	e := newEngine(t, config(mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(port))), Options{})
	if f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1000", "198.51.100.1:80"); f.wait(t) != "rejected" {
		t.Fatal("a dial to a closed port was accepted")
	}
	if !mappingStatus(t, e, "web").TargetDown {
		t.Fatal("target not down after a failed dial")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:"+itoa(port))
	if err != nil {
		t.Skipf("the closed port was taken meanwhile: %v", err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1001", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("the dial to the listening target failed")
	}
	if mappingStatus(t, e, "web").TargetDown {
		t.Fatal("target still down after a good dial")
	}
	f.client.Close()
	<-f.done
}

// shutdownSpy is a kernel TCP conn that counts its half-close calls.
type shutdownSpy struct {
	*net.TCPConn
	closeWrites, closeReads atomic.Int32
}

func (c *shutdownSpy) CloseWrite() error { c.closeWrites.Add(1); return c.TCPConn.CloseWrite() }
func (c *shutdownSpy) CloseRead() error  { c.closeReads.Add(1); return c.TCPConn.CloseRead() }

// TestSpliceSecondEOFCloses: pmbench crr's shape, the target answers and
// closes, then the client closes. Both peers read every byte and a clean
// EOF, and the splice passes the second EOF on by closing, with no
// shutdown call: the first EOF shuts the client's write half only (the
// target's read half stays as it is), the second shuts nothing.
func TestSpliceSecondEOFCloses(t *testing.T) {
	t.Parallel()
	aUser, a := tcpPair(t)
	bUser, b := tcpPair(t)
	spyA := &shutdownSpy{TCPConn: a.(*net.TCPConn)}
	spyB := &shutdownSpy{TCPConn: b.(*net.TCPConn)}
	done := make(chan error, 1)
	go func() {
		_, _, err := Splice(t.Context(), spyA, spyB, 0)
		done <- err
	}()
	bUser.Write([]byte("answer"))
	bUser.(*net.TCPConn).CloseWrite()
	if got, err := readAllTimeout(aUser, 5*time.Second); err != nil || string(got) != "answer" {
		t.Fatalf("client read %q, %v; want the answer and EOF", got, err)
	}
	aUser.Write([]byte("bye"))
	aUser.(*net.TCPConn).CloseWrite()
	if got, err := readAllTimeout(bUser, 5*time.Second); err != nil || string(got) != "bye" {
		t.Fatalf("target read %q, %v; want bye and a clean EOF", got, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Splice: %v", err)
	}
	if w, r := spyA.closeWrites.Load(), spyB.closeReads.Load(); w != 1 || r != 0 {
		t.Fatalf("first EOF: client CloseWrite %d, target CloseRead %d; want 1, 0", w, r)
	}
	if w, r := spyB.closeWrites.Load(), spyA.closeReads.Load(); w != 0 || r != 0 {
		t.Fatalf("second EOF: target CloseWrite %d, client CloseRead %d; want 0, 0 (the close sends the FIN)", w, r)
	}
}

// keepAliveOpts reads a kernel TCP socket's keepalive settings: SO_KEEPALIVE
// and TCP_KEEPIDLE, TCP_KEEPINTVL in seconds, TCP_KEEPCNT.
func keepAliveOpts(t *testing.T, c net.Conn) (on, idle, intvl, cnt int) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var gerr error
	rc.Control(func(fd uintptr) {
		get := func(level, opt int) int {
			v, err := syscall.GetsockoptInt(int(fd), level, opt)
			if err != nil && gerr == nil {
				gerr = err
			}
			return v
		}
		on = get(syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
		idle = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
		intvl = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL)
		cnt = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT)
	})
	if gerr != nil {
		t.Fatal(gerr)
	}
	return on, idle, intvl, cnt
}

// TestTCPTargetKeepAliveLate: the default dialer opens target sockets
// without keepalive (four setsockopt calls a short connection never needs);
// a session that outlives the delay gets it, and its bytes keep crossing.
func TestTCPTargetKeepAliveLate(t *testing.T) {
	t.Parallel()
	port := tcpEcho(t)
	type armed struct {
		c   net.Conn
		err error
	}
	kaSet := make(chan armed, 1)
	e := newEngine(t, config(mapping("echo", conf.TCP, "8000", "127.0.0.1:"+itoa(port))), Options{
		keepAliveDelay: 20 * time.Millisecond,
		onKeepAlive:    func(c net.Conn, err error) { kaSet <- armed{c, err} },
	})

	direct, err := e.dialer.DialContext(t.Context(), "tcp", "127.0.0.1:"+itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	if on, _, _, _ := keepAliveOpts(t, direct); on != 0 {
		t.Fatalf("the default dialer set SO_KEEPALIVE=%d at dial, want 0", on)
	}

	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.5:40000", "198.51.100.1:8000")
	if got := f.wait(t); got != "accepted" {
		t.Fatalf("flow %s, want accepted", got)
	}
	var ka armed
	select {
	case ka = <-kaSet:
	case <-time.After(10 * time.Second):
		t.Fatal("keepalive never set on the session's target socket")
	}
	if ka.err != nil {
		t.Fatalf("set keepalive: %v", ka.err)
	}
	on, idle, intvl, cnt := keepAliveOpts(t, ka.c)
	if on != 1 || idle != 60 || intvl != 15 || cnt != 4 {
		t.Fatalf("keepalive = on %d idle %ds intvl %ds cnt %d, want 1 60 15 4", on, idle, intvl, cnt)
	}
	msg := []byte("still here")
	f.client.Write(msg)
	f.client.(*net.TCPConn).CloseWrite()
	if got, err := readAllTimeout(f.client, 5*time.Second); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, %v; want %q", got, err, msg)
	}
	<-f.done
}
