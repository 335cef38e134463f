package forwarder

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/natbox/natbox/conf"
)

// TestReloadKeepsUnchangedStream streams through a mapping while 20
// reloads add, change and remove others; every byte must arrive.
func TestReloadKeepsUnchangedStream(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	stream := mapping("stream", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	e := newEngine(t, config(stream), Options{})
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	const chunk, chunks = 32 << 10, 200
	sent := sha256.New()
	writeDone := make(chan error, 1)
	go func() {
		buf := make([]byte, chunk)
		for i := range chunks {
			for j := range buf {
				buf[j] = byte(i + j)
			}
			sent.Write(buf)
			if _, err := f.client.Write(buf); err != nil {
				writeDone <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
		writeDone <- f.client.(*net.TCPConn).CloseWrite()
	}()
	recv := sha256.New()
	readDone := make(chan int64, 1)
	go func() {
		f.client.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, _ := io.Copy(recv, f.client)
		readDone <- n
	}()
	for i := range 20 {
		other := mapping("other", conf.TCP, "81", "127.0.0.1:"+itoa(uint16(9000+i)))
		cfg := config(stream)
		if i%2 == 0 {
			cfg = config(stream, other)
		}
		cfg.Limits.MaxSessions = 1000 + i // a limits change too
		diff, err := e.Reload(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(diff.Changed, "stream") || slices.Contains(diff.Removed, "stream") {
			t.Fatalf("reload %d reported stream changed: %+v", i, diff)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := <-writeDone; err != nil {
		t.Fatalf("write: %v", err)
	}
	if n := <-readDone; n != chunk*chunks {
		t.Fatalf("received %d bytes, want %d", n, chunk*chunks)
	}
	if !bytes.Equal(sent.Sum(nil), recv.Sum(nil)) {
		t.Fatal("stream corrupted across reloads")
	}
	<-f.done
}

func TestReloadRemovedClosesSessions(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	udpPort := udpEcho(t)
	keep := mapping("keep", conf.TCP, "81", "127.0.0.1:"+itoa(echo))
	e := newEngine(t, config(mapping("gone", conf.TCP, "80", "127.0.0.1:"+itoa(echo)), keep,
		mapping("gone-udp", conf.UDP, "53", "127.0.0.1:"+itoa(udpPort))), Options{})
	tun := newIngress(conf.IngressTUN)
	gone := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	kept := startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:81")
	if gone.wait(t) != "accepted" || kept.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.1:3"), netip.MustParseAddrPort("198.51.100.1:53"), []byte("x"))
	tun.next(t)
	waitFor(t, "3 sessions", func() bool { return len(e.Sessions()) == 3 })

	diff, err := e.Reload(config(keep))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(diff.Removed, []string{"gone", "gone-udp"}) || len(diff.Added)+len(diff.Changed) != 0 {
		t.Fatalf("diff %+v", diff)
	}
	start := time.Now()
	gone.client.SetReadDeadline(time.Now().Add(time.Second))
	// Cut, not finished: a reset, never a clean end.
	if _, err := gone.client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("removed mapping's session: read %v, want connection reset", err)
	}
	waitFor(t, "removed sessions gone", func() bool { return len(e.Sessions()) == 1 })
	if el := time.Since(start); el > time.Second {
		t.Fatalf("closing took %v", el)
	}
	// The kept session still works.
	kept.client.Write([]byte("still here"))
	buf := make([]byte, 10)
	kept.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(kept.client, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("kept session: %q %v", buf, err)
	}
}

func TestReloadNarrowedAllow(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	m := mapping("ssh", conf.TCP, "22", "127.0.0.1:"+itoa(echo))
	m.Allow = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	e := newEngine(t, config(m), Options{})
	tun := newIngress(conf.IngressTUN)
	flows := map[string]*flow{}
	for _, src := range []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"} {
		f := startTCP(t, e, tun, src+":1000", "198.51.100.1:22")
		if f.wait(t) != "accepted" {
			t.Fatal("rejected")
		}
		flows[src] = f
	}
	waitFor(t, "3 sessions", func() bool { return len(e.Sessions()) == 3 })
	m.Allow = []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("192.0.2.3/32")}
	diff, err := e.Reload(config(m))
	if err != nil || !slices.Equal(diff.Changed, []string{"ssh"}) {
		t.Fatalf("diff %+v, %v", diff, err)
	}
	select {
	case <-flows["192.0.2.2"].done:
	case <-time.After(5 * time.Second):
		t.Fatal("non-admitted session not closed")
	}
	waitFor(t, "2 sessions", func() bool { return len(e.Sessions()) == 2 })
	for _, s := range e.Sessions() {
		if s.Client.Addr() == netip.MustParseAddr("192.0.2.2") {
			t.Fatal("non-admitted session survived")
		}
	}
	for _, src := range []string{"192.0.2.1", "192.0.2.3"} {
		c := flows[src].client
		c.Write([]byte("ok"))
		buf := make([]byte, 2)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("%s session closed: %v", src, err)
		}
	}
}

func TestReloadChangedTargetCloses(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	echo2 := tcpEcho(t)
	m := mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	e := newEngine(t, config(m), Options{})
	f := startTCP(t, e, newIngress(conf.IngressTUN), "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	// The handler registers the session just after the accept.
	waitFor(t, "session registered", func() bool { return len(e.Sessions()) == 1 })
	m.IdleTimeout = conf.Duration(time.Hour) // keeps sessions
	// Reload decides about every registered session before it returns.
	diff, err := e.Reload(config(m))
	if err != nil {
		t.Fatal(err)
	}
	if diff.SessionsClosed != 0 || len(e.Sessions()) != 1 {
		t.Fatalf("idle change closed the session: %+v", diff)
	}
	expectEcho(t, f.client, "still open")
	m.Target = conf.Target{Host: "127.0.0.1", Ports: conf.PortRange{Lo: echo2, Hi: echo2}}
	if diff, err = e.Reload(config(m)); err != nil {
		t.Fatal(err)
	}
	if diff.SessionsClosed != 1 {
		t.Fatalf("target change closed %d sessions, want 1", diff.SessionsClosed)
	}
	select {
	case <-f.done:
	case <-time.After(5 * time.Second):
		t.Fatal("target change kept the session")
	}
}

func TestReloadInvalidChangesNothing(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	m := mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	e := newEngine(t, config(m), Options{})
	tun := newIngress(conf.IngressTUN)
	f := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	before := e.rules.Load()
	// Drops "web" and adds a broken mapping: if any of it applied, the
	// session would close.
	bad := mapping("x", conf.TCP, "81", "127.0.0.1:81")
	bad.ProxyProtocol = "v9"
	if _, err := e.Reload(config(bad)); err == nil {
		t.Fatal("invalid reload accepted")
	}
	// A failed reload returns before it touches a session: nothing is left
	// to happen later.
	if e.rules.Load() != before {
		t.Fatal("rule set swapped by a failed reload")
	}
	f.client.Write([]byte("hi"))
	buf := make([]byte, 2)
	f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(f.client, buf); err != nil {
		t.Fatalf("session hurt by failed reload: %v", err)
	}
	if g := startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:80"); g.wait(t) != "accepted" {
		t.Fatal("mapping lost after failed reload")
	}
}

func TestExpirySweep(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	clock := newFakeClock()
	m := mapping("temp", conf.TCP, "80", "127.0.0.1:"+itoa(echo))
	m.Expires = clock.Now().Add(time.Hour)
	m.ReviewBy = clock.Now().Add(-time.Hour)
	core, logs := observer.New(zapcore.WarnLevel)
	onSweep, sweeps := ticks[struct{}]()
	e, err := New(config(m), Options{Clock: clock, SweepInterval: 5 * time.Millisecond, onSweep: func() { onSweep(struct{}{}) }}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	runEngine(t, e)
	tun := newIngress(conf.IngressTUN)
	f := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	if f.wait(t) != "accepted" {
		t.Fatal("rejected before expiry")
	}
	if ms := mappingStatus(t, e, "temp"); !ms.ReviewOverdue || ms.Expired {
		t.Fatalf("status %+v", ms)
	}
	clock.Advance(2 * time.Hour)
	select {
	case <-f.done:
	case <-time.After(time.Second):
		t.Fatal("expired mapping's session not closed")
	}
	for range 3 { // several more sweeps, all after the one that closed it
		nextTick(t, sweeps, "expiry sweep")
	}
	if n := logs.FilterMessageSnippet("mapping expired").Len(); n != 1 {
		t.Fatalf("%d expiry warnings, want 1", n)
	}
	if n := logs.FilterMessageSnippet("review overdue").Len(); n != 1 {
		t.Fatalf("%d review warnings, want 1", n)
	}
	if g := startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:80"); g.wait(t) != "rejected" {
		t.Fatal("expired mapping still matches")
	}
	if !mappingStatus(t, e, "temp").Expired {
		t.Fatal("status not expired")
	}
	clock.Advance(25 * time.Hour)
	waitFor(t, "daily review reminder", func() bool { return logs.FilterMessageSnippet("review overdue").Len() == 2 })
}

func TestShutdown(t *testing.T) {
	t.Parallel()
	echo := tcpEcho(t)
	udpPort := udpEcho(t)
	e, err := New(config(mapping("web", conf.TCP, "80", "127.0.0.1:"+itoa(echo)),
		mapping("dns", conf.UDP, "53", "127.0.0.1:"+itoa(udpPort))), Options{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	tun := newIngress(conf.IngressTUN)
	ending := startTCP(t, e, tun, "203.0.113.1:1", "198.51.100.1:80")
	lingering := startTCP(t, e, tun, "203.0.113.1:2", "198.51.100.1:80")
	if ending.wait(t) != "accepted" || lingering.wait(t) != "accepted" {
		t.Fatal("rejected")
	}
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.1:3"), netip.MustParseAddrPort("198.51.100.1:53"), []byte("x"))
	tun.next(t)

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- e.Shutdown(ctx) }()
	waitFor(t, "shutting down", func() bool { return e.Snapshot().ShuttingDown })
	if f := startTCP(t, e, tun, "203.0.113.1:4", "198.51.100.1:80"); f.wait(t) != "rejected" {
		t.Fatal("admitted while shutting down")
	}
	e.HandleUDP(tun, netip.MustParseAddrPort("203.0.113.9:3"), netip.MustParseAddrPort("198.51.100.1:53"), []byte("x"))
	// A session that ends by itself during the grace period ends cleanly.
	ending.client.Close()
	<-ending.done
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 250*time.Millisecond {
		t.Fatalf("shutdown returned after %v, before the grace ended", el)
	}
	<-lingering.done
	lingering.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := lingering.client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("session cut at shutdown: read %v, want connection reset", err)
	}
	if n := len(e.Sessions()); n != 0 {
		t.Fatalf("%d sessions after shutdown", n)
	}
	if n := e.Snapshot().Unmatched["shutting_down"]; n != 2 {
		t.Fatalf("shutting_down refusals %d, want 2", n)
	}
}
