package tunnel

import (
	"net"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// writeLog is a warmStream that records each Write and half-close.
type writeLog struct {
	net.Conn // nil: only the methods below are used
	mu       sync.Mutex
	writes   []string
}

func (w *writeLog) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, string(b))
	return len(b), nil
}

func (w *writeLog) CloseWrite() error { w.Write([]byte("<fin>")); return nil }
func (w *writeLog) Close() error      { w.Write([]byte("<close>")); return nil }
func (w *writeLog) CloseRead() error  { return nil }
func (w *writeLog) Abort() error      { w.Write([]byte("<rst>")); return nil }
func (w *writeLog) WriteToSocket(syscall.RawConn) (int, error, error) {
	return 0, nil, nil
}
func (w *writeLog) ReadFromSocket(syscall.RawConn) (int, error, error) {
	w.Write([]byte("<zero-copy>"))
	return 0, nil, nil
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
		run  func(c *answerConn)
		want []string
	}{
		{"first write", func(c *answerConn) { c.Write([]byte("hi")); c.Write([]byte("there")) }, []string{"Lhi", "there"}},
		{"half-close", func(c *answerConn) { c.CloseWrite() }, []string{"L", "<fin>"}},
		{"close", func(c *answerConn) { c.Close() }, []string{"L", "<close>"}},
		{"zero-copy", func(c *answerConn) { c.ReadFromSocket(nil); c.Write([]byte("x")) }, []string{"L", "<zero-copy>", "x"}},
		{"abort", func(c *answerConn) { c.Abort(); time.Sleep(5 * coalesceWait) }, []string{"<rst>"}},
		{"silent", func(c *answerConn) { time.Sleep(5 * coalesceWait); c.Write([]byte("late")) }, []string{"L", "late"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := &writeLog{}
			c := &answerConn{warmStream: w, answer: newLeadBytes(w, []byte("L"))}
			tc.run(c)
			if got := w.log(); !slices.Equal(got, tc.want) {
				t.Fatalf("writes %q, want %q", got, tc.want)
			}
		})
	}
	// The relay's side: the header leads the client's bytes, and a close
	// before any leaves the stream unused.
	w := &writeLog{}
	c := &warmConn{warmStream: w, header: newLeadBytes(w, []byte("H"))}
	c.Write([]byte("GET"))
	c.Close()
	w2 := &writeLog{}
	c2 := &warmConn{warmStream: w2, header: newLeadBytes(w2, []byte("H"))}
	c2.Close()
	time.Sleep(5 * coalesceWait)
	if got, got2 := w.log(), w2.log(); !slices.Equal(got, []string{"HGET", "<close>"}) || !slices.Equal(got2, []string{"<close>"}) {
		t.Fatalf("relay writes %q and %q", got, got2)
	}
}
