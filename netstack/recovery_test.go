package netstack

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestStatsCountLossRecovery: one data segment of a 512 KiB upload through
// two Direct pairs is lost, or held back until its retransmission passes
// (reordered); all bytes arrive either way, and the sending stack's Stats
// tell the two apart: a recovery (by SACK, or by a timeout when too few
// acknowledgements follow the hole) for the loss, one found spurious for
// the reordering.
func TestStatsCountLossRecovery(t *testing.T) {
	const (
		port  = 9
		total = 512 << 10
		nth   = 20 // the data segment to lose or hold
	)
	for _, tt := range []struct {
		name     string
		reorder  bool
		spurious bool
	}{
		{"lost", false, false},
		{"reordered", true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := make(chan int64, 1)
			client, _, br := newDirectPair(t, 1420, funcHandler{}, sinkServer(got))
			var seen atomic.Int64
			var held []byte
			var heldSeq uint32
			alter := func(p []byte) [][]byte {
				ip := header.IPv4(p)
				if p[0]>>4 != 4 || ip.Protocol() != uint8(header.TCPProtocolNumber) {
					return [][]byte{p}
				}
				tcp := header.TCP(ip.Payload())
				if tcp.DestinationPort() != port || len(tcp.Payload()) == 0 {
					return [][]byte{p}
				}
				switch {
				case held != nil && tcp.SequenceNumber() == heldSeq:
					// The retransmission: the original first, as if it had
					// only been late.
					orig := held
					held = nil
					return [][]byte{orig, p}
				case seen.Add(1) == nth:
					if tt.reorder {
						held, heldSeq = append([]byte(nil), p...), tcp.SequenceNumber()
						// TCP timestamps tick in milliseconds: the recovery
						// must start a tick after the original left for
						// the original's echo to prove it spurious.
						time.Sleep(3 * time.Millisecond)
					}
					return nil
				}
				return [][]byte{p}
			}
			br.alter.Store(&alter)
			before := client.Stats()
			if err := upload(t, client, netip.AddrPort{}, netip.AddrPortFrom(serverPrefix4.Addr(), port), total); err != nil {
				t.Fatal(err)
			}
			waitSunk(t, got, 1, total)
			br.check(t)
			st := client.Stats()
			repaired := st.TCPSackRecovery + st.TCPFastRecovery + st.TCPTimeouts - before.TCPSackRecovery - before.TCPFastRecovery - before.TCPTimeouts
			spurious := st.TCPSpuriousRecovery - before.TCPSpuriousRecovery
			if repaired < 1 || st.TCPRetransmits == before.TCPRetransmits {
				t.Errorf("%d recoveries (SACK, fast or timeout), %d retransmits after a %s segment; want at least one each",
					repaired, st.TCPRetransmits-before.TCPRetransmits, tt.name)
			}
			if (spurious > 0) != tt.spurious {
				t.Errorf("%d spurious recoveries after a %s segment, want spurious %v", spurious, tt.name, tt.spurious)
			}
		})
	}
}

// TestDirectKeepsFlowsInOrder: four uploads at once through two Direct
// pairs, a path that neither loses nor reorders, must not make the sender
// recover from anything. (Packets of flows sharing a GRO bucket used to be
// handed on late, after newer ones: see flushGRO.)
func TestDirectKeepsFlowsInOrder(t *testing.T) {
	const (
		flows = 4
		total = 4 << 20
	)
	got := make(chan int64, flows)
	client, _, br := newDirectPair(t, 1420, funcHandler{}, sinkServer(got))
	before := client.Stats()
	errs := make(chan error, flows)
	for i := range flows {
		go func() {
			// Source ports 8 apart, one destination port: gVisor's GRO puts
			// all four flows in one of its eight buckets.
			errs <- upload(t, client, netip.AddrPortFrom(clientPrefix4.Addr(), uint16(40000+8*i)), netip.AddrPortFrom(serverPrefix4.Addr(), 9), total)
		}()
	}
	for range flows {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	waitSunk(t, got, flows, total)
	br.check(t)
	st := client.Stats()
	retrans, sack, fast := st.TCPRetransmits-before.TCPRetransmits, st.TCPSackRecovery-before.TCPSackRecovery, st.TCPFastRecovery-before.TCPFastRecovery
	timeouts, spurious := st.TCPTimeouts-before.TCPTimeouts, st.TCPSpuriousRecovery-before.TCPSpuriousRecovery
	// Segments held back (the old GRO flush) show as retransmission
	// timeouts the sender never finds spurious, or as recoveries from
	// duplicate ACKs. A host too loaded to run the receiver within the
	// timeout makes timeouts too, but the original arrives, so gVisor counts
	// each one spurious: those are logged, not failed.
	if sack > 0 || fast > 0 || timeouts > spurious {
		t.Errorf("%d retransmits (%d SACK recoveries, %d fast, %d timeouts, %d spurious) over a lossless path", retrans, sack, fast, timeouts, spurious)
	} else if retrans > 0 {
		t.Logf("%d retransmits, all after %d spurious timeouts (a loaded host)", retrans, timeouts)
	}
}

// upload dials dst from local (any, if zero) and writes n zero bytes.
func upload(t testing.TB, s *Stack, local, dst netip.AddrPort, n int) error {
	c, err := s.DialTCP(testContext(t), local, dst)
	if err != nil {
		return fmt.Errorf("dial %s: %w", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(make([]byte, n)); err != nil {
		return fmt.Errorf("upload to %s: %w", dst, err)
	}
	return nil
}

// waitSunk waits for flows reports of total bytes each from sinkServer.
func waitSunk(t testing.TB, got <-chan int64, flows, total int) {
	t.Helper()
	for range flows {
		select {
		case n := <-got:
			if n != int64(total) {
				t.Fatalf("server read %d of %d bytes", n, total)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("an upload never completed")
		}
	}
}
