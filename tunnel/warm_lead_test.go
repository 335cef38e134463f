package tunnel

import (
	"context"
	"net"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// writeLog is a warmStream that records each Write and half-close.
type writeLog struct {
	net.Conn                // nil: only the methods below are used
	slowLead  time.Duration // a write of just "L" takes this long
	leadOnce  sync.Once
	leadBegun chan struct{} // closed as a write of just "L" begins (newWriteLog)
	mu        sync.Mutex
	writes    []string
}

func newWriteLog(slowLead time.Duration) *writeLog {
	return &writeLog{slowLead: slowLead, leadBegun: make(chan struct{})}
}

func (w *writeLog) Write(b []byte) (int, error) {
	if string(b) == "L" {
		if w.leadBegun != nil {
			w.leadOnce.Do(func() { close(w.leadBegun) })
		}
		time.Sleep(w.slowLead)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, string(b))
	return len(b), nil
}

func (w *writeLog) CloseWrite() error { w.Write([]byte("<fin>")); return nil }
func (w *writeLog) Close() error      { w.Write([]byte("<close>")); return nil }
func (w *writeLog) CloseRead() error  { return nil }
func (w *writeLog) Standby()          {}
func (w *writeLog) Resume()           {}
func (w *writeLog) Quiet() bool       { return true }
func (w *writeLog) Abort() error      { w.Write([]byte("<rst>")); return nil }
func (w *writeLog) WriteToSocket(syscall.RawConn) (int, error, error) {
	return 0, nil, nil
}
func (w *writeLog) ReadFromSocket(syscall.RawConn) (int, error, error) {
	w.Write([]byte("<zero-copy>"))
	return 0, nil, nil
}

// awaitLead waits (2 s at most: a loaded host can run a 1 ms timer late,
// which a fixed sleep mistook for a coalesced lead) until the lead's timer
// began its write.
func (w *writeLog) awaitLead() {
	select {
	case <-w.leadBegun:
	case <-time.After(2 * time.Second):
	}
}

func (w *writeLog) log() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.writes)
}

// TestLeadBytesCoalesce: a warm stream's header (and the appliance's answer)
// leaves in the same write as the flow's first bytes; alone once
// coalesceWait passed without any, or before a half-close, a close or a
// zero-copy write; never twice, and never after a reset.
func TestLeadBytesCoalesce(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		run  func(c *answerConn, w *writeLog)
		want []string
	}{
		{"first write", func(c *answerConn, w *writeLog) { c.Write([]byte("hi")); c.Write([]byte("there")) }, []string{"Lhi", "there"}},
		{"half-close", func(c *answerConn, w *writeLog) { c.CloseWrite() }, []string{"L", "<fin>"}},
		{"close", func(c *answerConn, w *writeLog) { c.Close() }, []string{"L", "<close>"}},
		{"zero-copy", func(c *answerConn, w *writeLog) { c.ReadFromSocket(nil); c.Write([]byte("x")) }, []string{"L", "<zero-copy>", "x"}},
		{"abort", func(c *answerConn, w *writeLog) { c.Abort(); time.Sleep(5 * coalesceWait) }, []string{"<rst>"}},
		{"silent", func(c *answerConn, w *writeLog) { w.awaitLead(); c.Write([]byte("late")) }, []string{"L", "late"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWriteLog(0)
			c := &answerConn{leadConn{warmStream: w, lead: newLeadBytes(w, []byte("L"))}}
			tc.run(c, w)
			if got := w.log(); !slices.Equal(got, tc.want) {
				t.Fatalf("writes %q, want %q", got, tc.want)
			}
		})
	}
	// The timer's lead, still being written, is not overtaken by the
	// flow's first bytes.
	slow := newWriteLog(20 * time.Millisecond)
	sc := &answerConn{leadConn{warmStream: slow, lead: newLeadBytes(slow, []byte("L"))}}
	slow.awaitLead() // the timer is writing the lead now
	sc.Write([]byte("data"))
	if got := slow.log(); !slices.Equal(got, []string{"L", "data"}) {
		t.Fatalf("writes %q, want the lead first", got)
	}
	// The relay's side: the header leads the client's bytes, and a close
	// before any leaves the stream unused.
	w := &writeLog{}
	c := &warmConn{leadConn: leadConn{warmStream: w, lead: newLeadBytes(w, []byte("H"))}}
	c.Write([]byte("GET"))
	c.Close()
	w2 := &writeLog{}
	c2 := &warmConn{leadConn: leadConn{warmStream: w2, lead: newLeadBytes(w2, []byte("H"))}}
	c2.Close()
	time.Sleep(5 * coalesceWait)
	if got, got2 := w.log(), w2.log(); !slices.Equal(got, []string{"HGET", "<close>"}) || !slices.Equal(got2, []string{"<close>"}) {
		t.Fatalf("relay writes %q and %q", got, got2)
	}
}

// TestWarmPoolDialsAtMostWarmDialing: however far misses raise the pool's
// target, at most warmDialing handshakes run at once (more would look like
// a SYN flood to the appliance), and the pool still fills to the target as
// they finish.
func TestWarmPoolDialsAtMostWarmDialing(t *testing.T) {
	t.Parallel()
	var (
		mu             sync.Mutex
		inFlight, peak int
		release        = make(chan struct{})
	)
	dial := func(ctx context.Context) (net.Conn, error) {
		mu.Lock()
		inFlight++
		peak = max(peak, inFlight)
		mu.Unlock()
		select {
		case <-release:
		case <-ctx.Done():
		}
		mu.Lock()
		inFlight--
		mu.Unlock()
		return &writeLog{}, nil
	}
	var wg sync.WaitGroup
	p := newWarmPool(context.Background(), dial, &warmCounters{}, 128, time.Minute, &wg, zap.NewNop())
	defer func() { p.close(); close(release); wg.Wait() }()
	for range 8 { // each misses: the target doubles to 128
		if c := p.take(); c != nil {
			t.Fatal("a stream before any dial finished")
		}
	}
	// The dials start on their own goroutines: wait for warmDialing of
	// them (a loaded host may take a while), then a little longer for any
	// past it.
	inFlightNow := func() int {
		mu.Lock()
		defer mu.Unlock()
		return inFlight
	}
	for deadline := time.Now().Add(5 * time.Second); inFlightNow() < warmDialing && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	if got := inFlightNow(); got != warmDialing {
		t.Fatalf("%d dials at once, want %d", got, warmDialing)
	}
	for range 128 - warmDialing + 1 {
		release <- struct{}{}
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.idleCount() < 128-warmDialing+1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := p.idleCount(); n != 128-warmDialing+1 || peak != warmDialing {
		t.Fatalf("%d streams ready, peak %d dials at once; want %d, %d", n, peak, 128-warmDialing+1, warmDialing)
	}
}
