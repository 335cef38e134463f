package app_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/app"
)

// reload writes s as the config file and reloads it; it must succeed.
func (h *harness) reload(s spec) forwarder.Diff {
	h.t.Helper()
	h.writeConfig(s)
	res, err := h.app.Reload()
	if err != nil {
		h.t.Fatalf("reload: %v", err)
	}
	return res.Diff
}

// expectClosedWithin checks that natbox ends c (EOF or reset) within d.
func expectClosedWithin(t *testing.T, c net.Conn, since time.Time, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(since.Add(d))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	switch {
	case err == nil:
		t.Fatal("read data from a session that should be closed")
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("session still open %v after the reload", d)
	}
}

func TestReloadUnderLoad(t *testing.T) {
	t.Parallel()
	echoA := serveTCP(t, echo)
	echoB := serveTCP(t, echo)
	udpTarget := serveUDP(t, udpEcho)
	stable := mapping("stream", "tcp", "8300", echoA.String()) + mapping("pings", "udp", "8301", udpTarget.String())
	// Every reload adds, removes or changes mappings other than the stable two.
	variant := func(i int) spec {
		other := []string{
			mapping("other", "tcp", "8310", echoA.String()),
			mapping("other", "tcp", "8310", echoB.String(), `allow = ["203.0.113.0/24"]`),
			mapping("other", "udp", "8310", udpTarget.String(), `idle_timeout = "30s"`),
		}[i%3]
		extra := ""
		if i%2 == 1 {
			extra = mapping(fmt.Sprintf("extra-%d", i), "tcp", fmt.Sprint(8320+i), echoB.String())
		}
		return spec{Mappings: stable + other + extra}
	}
	h := newHarness(t, variant(0), app.Options{})

	// A long-lived TCP transfer through "stream", both directions at once.
	c := h.mustDial(ap(client4, 0), ap(public4, 8300))
	// A guard against a hang only: each reload below has its own 30 s stall
	// check, and 20 of them under -race on a loaded machine took over 60 s.
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	stop := make(chan struct{})
	var sent, received atomic.Int64
	sentSum, recvSum := sha256.New(), sha256.New()
	var writeErr, readErr error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		src := chachaStream(3)
		buf := make([]byte, 32<<10)
		for {
			select {
			case <-stop:
				writeErr = c.(halfCloser).CloseWrite()
				return
			default:
			}
			io.ReadFull(src, buf)
			n, err := c.Write(buf)
			sentSum.Write(buf[:n])
			sent.Add(int64(n))
			if err != nil {
				writeErr = err
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		_, readErr = io.Copy(counter{recvSum, &received}, c)
	}()

	// A UDP stream through "pings": one datagram in flight at a time, so a
	// loss is natbox's, not a full socket buffer's.
	from := ap(client4, 43000)
	var pings, lost atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		payload := make([]byte, 200)
		for seq := uint64(0); ; seq++ {
			select {
			case <-stop:
				return
			default:
			}
			binary.BigEndian.PutUint64(payload, seq)
			if err := h.client.WriteUDP(from, ap(public4, 8301), payload); err != nil {
				lost.Add(1)
				return
			}
			// A reply may come late on a loaded machine: skip the replies to
			// earlier pings, and count a loss only when this ping's reply never
			// comes (or comes wrong).
			for {
				d, err := h.recvUDP(from, 10*time.Second)
				if err == nil && len(d.payload) == len(payload) && binary.BigEndian.Uint64(d.payload) < seq {
					continue
				}
				if err != nil || !bytes.Equal(d.payload, payload) || d.src != ap(public4, 8301) {
					lost.Add(1)
				} else {
					pings.Add(1)
				}
				break
			}
		}
	}()

	for i := 1; i <= 20; i++ {
		// Let traffic move between reloads, so each one lands mid-flow.
		s0, p0, w0 := received.Load(), pings.Load(), sent.Load()
		for deadline := time.Now().Add(30 * time.Second); received.Load() < s0+256<<10 || pings.Load() < p0+3; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				// Say which stream stalled, and where, so a failure can be told
				// from a slow machine.
				dumpGoroutines(t)
				t.Fatalf("no traffic for 30 s before reload %d: tcp sent +%d (total %d), received +%d (total %d); udp pings +%d, lost %d; stack %+v",
					i, sent.Load()-w0, sent.Load(), received.Load()-s0, received.Load(), pings.Load()-p0, lost.Load(), h.client.Stats())
			}
		}
		diff := h.reload(variant(i))
		for _, name := range slices.Concat(diff.Added, diff.Changed, diff.Removed) {
			if name == "stream" || name == "pings" {
				t.Fatalf("reload %d touched %q: %+v", i, name, diff)
			}
		}
		if len(diff.Added)+len(diff.Changed)+len(diff.Removed) == 0 {
			t.Fatalf("reload %d changed nothing; the test must change other mappings", i)
		}
		if i%2 == 1 { // the added mapping serves at once
			e := h.mustDial(ap(client4, 0), ap(public4, uint16(8320+i)))
			expectEcho(t, e, "new mapping")
			e.Close()
		}
	}
	close(stop)
	wg.Wait()

	if writeErr != nil || readErr != nil {
		t.Fatalf("stream broke across reloads: write %v, read %v", writeErr, readErr)
	}
	if sent.Load() != received.Load() || !bytes.Equal(sentSum.Sum(nil), recvSum.Sum(nil)) {
		t.Fatalf("stream: sent %d bytes, got back %d; checksums equal: %v", sent.Load(), received.Load(),
			bytes.Equal(sentSum.Sum(nil), recvSum.Sum(nil)))
	}
	if lost.Load() != 0 {
		t.Fatalf("udp: %d of %d datagrams lost across reloads", lost.Load(), lost.Load()+pings.Load())
	}
	t.Logf("20 reloads during %d MiB each way over tcp and %d udp round trips", sent.Load()>>20, pings.Load())
	for _, name := range []string{"stream", "pings"} {
		if m := h.mappingStatus(name); m.SessionsOpened != 1 {
			t.Fatalf("%s: %d sessions opened, want the one session kept across every reload", name, m.SessionsOpened)
		}
	}
}

// dumpGoroutines writes every goroutine's stack to a file that outlives the
// test, for a stall that cannot be read from counters.
func dumpGoroutines(t *testing.T) {
	f, err := os.CreateTemp("", "natbox-stall-*.txt")
	if err != nil {
		t.Logf("goroutine dump: %v", err)
		return
	}
	defer f.Close()
	pprof.Lookup("goroutine").WriteTo(f, 1)
	t.Logf("goroutines dumped to %s", f.Name())
}

// counter counts what passes through to w.
type counter struct {
	w io.Writer
	n *atomic.Int64
}

func (c counter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func chachaStream(seed byte) io.Reader {
	var s [32]byte
	s[0] = seed
	return rand.NewChaCha8(s)
}

func TestReloadRemovedMappingClosesItsSessions(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	udpTarget := serveUDP(t, udpEcho)
	keep := mapping("keep", "tcp", "8500", target.String())
	h := newHarness(t, spec{Mappings: keep +
		mapping("doomed", "tcp", "8501", target.String()) +
		mapping("doomed-udp", "udp", "8502", udpTarget.String())}, app.Options{})

	kept := h.mustDial(ap(client4, 0), ap(public4, 8500))
	expectEcho(t, kept, "keep")
	doomed := h.mustDial(ap(client4, 0), ap(public4, 8501))
	expectEcho(t, doomed, "doomed")
	from := ap(client4, 44000)
	h.sendUDP(from, ap(public4, 8502), []byte("doomed udp"))
	h.mustRecvUDP(from)

	t0 := time.Now()
	diff := h.reload(spec{Mappings: keep})
	if !slices.Equal(diff.Removed, []string{"doomed", "doomed-udp"}) || len(diff.Added)+len(diff.Changed) != 0 {
		t.Fatalf("diff = %+v, want doomed and doomed-udp removed", diff)
	}
	expectClosedWithin(t, doomed, t0, time.Second)
	waitFor(t, time.Second-time.Since(t0), "the removed mappings' sessions to close", func() bool {
		return len(h.sessionsOf("doomed")) == 0 && len(h.sessionsOf("doomed-udp")) == 0
	})
	expectEcho(t, kept, "kept across the reload")

	// The removed mappings no longer match.
	h.expectRefused(ap(client4, 0), ap(public4, 8501))
	h.sendUDP(from, ap(public4, 8502), []byte("anyone?"))
	waitFor(t, 5*time.Second, "the stray datagram to count as unmatched", func() bool {
		return h.engine().Snapshot().Unmatched["no_match"] == 2
	})
	if d, err := h.recvUDP(from, 100*time.Millisecond); err == nil {
		t.Fatalf("a removed udp mapping answered %q", d.payload)
	}
}

func TestReloadNarrowedAllowClosesExactlyTheSessionsItRefuses(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	udpTarget := serveUDP(t, udpEcho)
	allow := func(prefix string) spec {
		a := fmt.Sprintf("allow = [%q]", prefix)
		return spec{Mappings: mapping("narrow", "tcp", "8600", target.String(), a) +
			mapping("narrow-udp", "udp", "8601", udpTarget.String(), a)}
	}
	h := newHarness(t, allow("203.0.113.0/24"), app.Options{})
	stays, goes := client4, netip.MustParseAddr("203.0.113.9")

	tcpStays := h.mustDial(ap(stays, 0), ap(public4, 8600))
	tcpGoes := h.mustDial(ap(goes, 0), ap(public4, 8600))
	expectEcho(t, tcpStays, "a")
	expectEcho(t, tcpGoes, "b")
	udpStays, udpGoes := ap(stays, 45000), ap(goes, 45000)
	for _, from := range []netip.AddrPort{udpStays, udpGoes} {
		h.sendUDP(from, ap(public4, 8601), []byte("hello"))
		h.mustRecvUDP(from)
	}

	t0 := time.Now()
	diff := h.reload(allow(stays.String() + "/32"))
	if !slices.Equal(diff.Changed, []string{"narrow", "narrow-udp"}) || len(diff.Added)+len(diff.Removed) != 0 {
		t.Fatalf("diff = %+v, want both mappings changed", diff)
	}
	expectClosedWithin(t, tcpGoes, t0, time.Second)
	expectEcho(t, tcpStays, "still admitted")
	h.sendUDP(udpStays, ap(public4, 8601), []byte("still here"))
	if d := h.mustRecvUDP(udpStays); string(d.payload) != "still here" {
		t.Fatalf("udp reply %q", d.payload)
	}
	for _, name := range []string{"narrow", "narrow-udp"} {
		// A closed TCP session leaves the table when its splice has wound
		// down, a moment after its client saw the close.
		var ss []forwarder.SessionInfo
		waitFor(t, 2*time.Second, name+" sessions to shrink to the admitted client's", func() bool {
			ss = h.sessionsOf(name)
			return len(ss) <= 1
		})
		if len(ss) != 1 || ss[0].Client.Addr() != stays {
			t.Fatalf("%s sessions after narrowing: %+v, want only %s's", name, ss, stays)
		}
		if m := h.mappingStatus(name); m.SessionsOpened != 2 {
			t.Fatalf("%s: %d sessions opened, want 2 (the admitted client kept its session)", name, m.SessionsOpened)
		}
	}
	// The dropped client is refused from now on.
	h.expectRefused(ap(goes, 0), ap(public4, 8600))
	h.sendUDP(udpGoes, ap(public4, 8601), []byte("let me in"))
	waitFor(t, 5*time.Second, "the udp refusal", func() bool { return h.mappingStatus("narrow-udp").Refusals["not_allowed"] == 1 })
	if d, err := h.recvUDP(udpGoes, 100*time.Millisecond); err == nil {
		t.Fatalf("a refused client got a udp reply %q", d.payload)
	}
}

func TestReloadInvalidFileChangesNothing(t *testing.T) {
	t.Parallel()
	target := serveTCP(t, echo)
	good := spec{Mappings: mapping("steady", "tcp", "8700", target.String())}
	h := newHarness(t, good, app.Options{})
	c := h.mustDial(ap(client4, 0), ap(public4, 8700))
	expectEcho(t, c, "before")
	before := h.engine().Snapshot().Mappings

	// Two problems at once: both come back, nothing is applied.
	h.writeConfig(spec{Mappings: mapping("steady", "tcp", "70000", target.String()) +
		mapping("typo", "tcp", "8701", target.String(), `protcol = "udp"`)})
	_, err := h.app.Reload()
	var ce *conf.Errors
	if !errors.As(err, &ce) || len(ce.List) != 2 {
		t.Fatalf("reload of an invalid file: %v, want a *conf.Errors with 2 problems", err)
	}
	// A valid file that changes what needs a restart is refused as well.
	for _, change := range []struct{ old, new string }{
		{"mtu = 1500", "mtu = 1400"},
		{"addresses = [", "routes = [\"198.51.100.0/24\"]\naddresses = ["},
	} {
		h.writeFile(replaceOnce(t, good.render(h.socket), change.old, change.new))
		if _, err := h.app.Reload(); err == nil || !strings.Contains(err.Error(), "restart natbox") {
			t.Fatalf("reload with %q: err = %v, want a refusal that says to restart", change.new, err)
		}
	}

	if after := h.engine().Snapshot().Mappings; len(after) != 1 || after[0].Listen != before[0].Listen || after[0].Target != before[0].Target {
		t.Fatalf("mappings changed by refused reloads: %+v, was %+v", after, before)
	}
	expectEcho(t, c, "after")
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8700)), "new connection")
	h.expectRefused(ap(client4, 0), ap(public4, 8701))
}

func replaceOnce(t *testing.T, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("%q not in the config", old)
	}
	return strings.Replace(s, old, new, 1)
}
