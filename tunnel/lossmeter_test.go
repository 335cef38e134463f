package tunnel

import (
	"encoding/binary"
	"testing"
	"time"
)

// transportMsg is a WireGuard transport message header for receiver index
// idx and counter ctr, with a 16-byte tag and size bytes of packet.
func transportMsg(idx uint32, ctr uint64, size int) []byte {
	m := make([]byte, transportHeader+size+16)
	binary.LittleEndian.PutUint32(m, 4)
	binary.LittleEndian.PutUint32(m[4:], idx)
	binary.LittleEndian.PutUint64(m[8:], ctr)
	return m
}

// feed hands msgs to m in batches of three, as a bind's receive does, and
// fails t where observe's count of data messages (the gate's) is not isData's.
func feed(t *testing.T, m *lossMeter, msgs [][]byte) {
	t.Helper()
	for len(msgs) > 0 {
		n := min(3, len(msgs))
		sizes := make([]int, n)
		want := 0
		for i := range n {
			sizes[i] = len(msgs[i])
			if isData(msgs[i]) {
				want++
			}
		}
		if got := m.observe(msgs[:n], sizes, n); got != want {
			t.Fatalf("observe counted %d data messages in a batch, isData %d", got, want)
		}
		msgs = msgs[n:]
	}
}

// TestLossMeter: the estimate is the counters skipped less those that came
// late, per receiver index; other messages, far jumps and stale messages
// count nothing.
func TestLossMeter(t *testing.T) {
	seq := func(idx uint32, from, to uint64, skip func(uint64) bool) (out [][]byte) {
		for c := from; c < to; c++ {
			if skip == nil || !skip(c) {
				out = append(out, transportMsg(idx, c, 100))
			}
		}
		return out
	}
	handshake := make([]byte, 148)
	handshake[0] = 1
	for _, tt := range []struct {
		name           string
		msgs           [][]byte
		received, lost uint64
	}{
		{"in order", seq(7, 0, 1000, nil), 1000, 0},
		{"every 100th lost", seq(7, 0, 1000, func(c uint64) bool { return c%100 == 50 }), 990, 10},
		{"keepalives count as messages", append(seq(7, 0, 10, nil), transportMsg(7, 10, 0), transportMsg(7, 11, 0)), 12, 0},
		{"handshakes and runts are not messages", [][]byte{handshake, {4, 0, 0}, transportMsg(7, 0, 10), transportMsg(7, 2, 10)}, 2, 1},
		{"reordered pairs", func() (out [][]byte) {
			for c := uint64(0); c < 100; c += 2 {
				out = append(out, transportMsg(9, c+1, 10), transportMsg(9, c, 10))
			}
			return out
		}(), 100, 0},
		{"two keypairs interleaved", func() (out [][]byte) {
			// 301: a loss shows once a later message arrives
			for c := uint64(0); c < 301; c++ {
				if c%30 != 29 {
					out = append(out, transportMsg(1, c, 10))
				}
				if c%60 != 59 {
					out = append(out, transportMsg(2, c, 10))
				}
			}
			return out
		}(), 301 - 10 + 301 - 5, 15},
		{"a jump past lossMaxGap starts over", [][]byte{transportMsg(3, 0, 10), transportMsg(3, 1, 10),
			transportMsg(3, 2+lossMaxGap+1, 10), transportMsg(3, 2+lossMaxGap+2, 10), transportMsg(3, 2+lossMaxGap+4, 10)}, 5, 1},
		{"a far forgery, then the genuine flow", [][]byte{transportMsg(3, 0, 10), transportMsg(3, 1, 10),
			transportMsg(3, 1<<40, 10), transportMsg(3, 2, 10), transportMsg(3, 3, 10), transportMsg(3, 5, 10)}, 6, 1},
		{"a near forgery is taken back by the messages it skipped", append(
			[][]byte{transportMsg(3, 0, 10), transportMsg(3, 100, 10)}, seq(3, 1, 100, nil)...), 101, 0},
		{"duplicates never make it negative", [][]byte{transportMsg(3, 0, 10), transportMsg(3, 0, 10), transportMsg(3, 0, 10)}, 3, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := newLossMeter()
			feed(t, m, tt.msgs)
			if rx, lost := m.counts(); rx != tt.received || lost != tt.lost {
				t.Errorf("received %d, lost %d; want %d, %d", rx, lost, tt.received, tt.lost)
			}
		})
	}
}

// TestLossMeterBoundsIndexes: past lossMaxIndexes receiver indexes the table
// starts over instead of growing.
func TestLossMeterBoundsIndexes(t *testing.T) {
	m := newLossMeter()
	for i := range uint32(3 * lossMaxIndexes) {
		feed(t, m, [][]byte{transportMsg(i, 5, 10)})
	}
	if n := len(m.highest); n > lossMaxIndexes {
		t.Fatalf("%d indexes tracked, bound %d", n, lossMaxIndexes)
	}
	if _, lost := m.counts(); lost != 0 {
		t.Fatalf("first messages of new indexes counted %d lost", lost)
	}
}

// TestLossWatchWindow: a window ends at the larger of its minimum and
// enough messages for its rate to be lossMinLost of them, or early once it
// lost lossEarlyLost; a lossy one needs both the share and lossMinLost.
func TestLossWatchWindow(t *testing.T) {
	now := time.Now()
	w := newLossWatch(0.0001, time.Minute, 20_000)
	w.start(now, 0, 0)
	if _, ended, _ := w.check(now, 49_999, 4); ended {
		t.Fatal("a window of 49 999 at 0.01 % ended")
	}
	if share, ended, lossy := w.check(now, 50_000, 6); !ended || !lossy || share < 0.0001 {
		t.Fatalf("6 of 50 006 lost at 0.01 %%: ended %v, lossy %v, share %v", ended, lossy, share)
	}
	w.start(now, 0, 0)
	if _, ended, _ := w.check(now, 2000, 4); ended {
		t.Fatal("4 of 2004 lost at 0.01 %: ended early, want lossEarlyLost first")
	}
	if share, ended, lossy := w.check(now, 2000, 5); !ended || !lossy || share < 0.0001 {
		t.Fatalf("5 of 2005 lost at 0.01 %%: ended %v, lossy %v, share %v; want an early end", ended, lossy, share)
	}
	w = newLossWatch(0.01, time.Minute, 500)
	w.start(now, 0, 0)
	if _, ended, lossy := w.check(now, 500, 4); !ended || lossy {
		t.Fatalf("4 of 504 lost at 1 %%: ended %v, lossy %v; want ended, not lossy (fewer than lossMinLost)", ended, lossy)
	}
	if _, ended, _ := w.check(now.Add(time.Minute), 600, 4); ended || w.in != 600 {
		t.Fatalf("a window past its time with 100 messages: ended %v, restarted at %d (want 600)", ended, w.in)
	}
	w = newLossWatch(0, time.Minute, 500)
	w.start(now, 0, 0)
	if _, _, lossy := w.check(now, 1000, 900); lossy {
		t.Fatal("off, and lossy")
	}
}
