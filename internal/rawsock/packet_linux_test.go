package rawsock_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/natbox/natbox/internal/rawsock"
)

func packetReader(t *testing.T, c *net.UDPConn) *rawsock.PacketReader {
	t.Helper()
	r, err := rawsock.NewPacketReader(c)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A datagram comes back whole with its sender, an IPv4 one as a 4-byte
// address; without a spill, one longer than the buffer fills it and says
// it was truncated; with one, it comes back whole in a spill buffer, up to
// UDP's largest; for both families.
func TestPacketReaderReadsDatagrams(t *testing.T) {
	spill := &sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
	long := bytes.Repeat([]byte("0123456789"), 10)
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			a, _ := udpSocket(t, fam.network, fam.addr)
			b, _ := udpSocket(t, fam.network, fam.addr)
			r := packetReader(t, b)
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			sender := a.LocalAddr().(*net.UDPAddr).AddrPort()
			largest := bytes.Repeat([]byte("abcdefg"), 65507/7)
			for i, want := range []struct {
				sent, got []byte
				spill     *sync.Pool
				truncated bool
			}{
				{[]byte("first"), []byte("first"), nil, false},
				{long, long[:64], nil, true},
				{[]byte("third"), []byte("third"), spill, false},
				{long, long, spill, false},
				{largest, largest, spill, false},
				{[]byte("last"), []byte("last"), spill, false},
			} {
				if _, err := a.WriteTo(want.sent, b.LocalAddr()); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 64)
				dgram, big, truncated, from, err := r.ReadFrom(buf, want.spill)
				if err != nil {
					t.Fatalf("datagram %d: %v", i, err)
				}
				if !bytes.Equal(dgram, want.got) || truncated != want.truncated {
					t.Fatalf("datagram %d: %d bytes %q... truncated=%v, want %d bytes truncated=%v", i, len(dgram), dgram[:min(len(dgram), 20)], truncated, len(want.got), want.truncated)
				}
				if (big != nil) != (len(want.sent) > len(buf) && want.spill != nil) {
					t.Fatalf("datagram %d: spill buffer %v for %d bytes into %d", i, big != nil, len(want.sent), len(buf))
				}
				if big != nil {
					spill.Put(big)
				}
				if from != sender || from.Addr().Is4In6() {
					t.Fatalf("datagram %d from %v, want %v", i, from, sender)
				}
			}
		})
	}
}

// Its errors are the conn's: a passed deadline is a timeout, a closed
// conn is net.ErrClosed, both as a *net.OpError "read".
func TestPacketReaderErrors(t *testing.T) {
	c, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	r := packetReader(t, c)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, _, _, _, err := r.ReadFrom(make([]byte, 64), nil)
	var ne net.Error
	var oe *net.OpError
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("after the deadline: %v, want a read timeout", err)
	}
	c.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, _, _, _, err := r.ReadFrom(make([]byte, 64), nil)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("on close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read waiting on a closed conn did not return")
	}
}

// It reads without entering the scheduler's system-call state, where the
// conn's own ReadMsgUDPAddrPort does.
func TestPacketReaderMakesNoSchedulerSyscalls(t *testing.T) {
	a, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	b, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	to := b.LocalAddr().(*net.UDPAddr).AddrPort()
	r := packetReader(t, b)
	buf := make([]byte, 64)
	const rounds = 50
	run := func(read func() error) func() {
		return func() {
			logStart()
			for range rounds {
				if _, err := a.WriteToUDPAddrPort([]byte("ping"), to); err != nil {
					t.Error(err)
					return
				}
				if err := read(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}
	// The writes are the conn's own on both sides; what differs is the read.
	own := syscallEntries(t, run(func() error { _, _, _, _, err := b.ReadMsgUDPAddrPort(buf, nil); return err }))
	raw := syscallEntries(t, run(func() error { _, _, _, _, err := r.ReadFrom(buf, nil); return err }))
	if own < 2*rounds {
		t.Fatalf("the conn's writes and reads entered the syscall state %d times in %d rounds; the trace cannot tell", own, rounds)
	}
	if raw > own-rounds {
		t.Fatalf("with PacketReader the round entered the syscall state %d times against %d with ReadMsgUDPAddrPort; want %d fewer", raw, own, rounds)
	}
}

// A PacketWriter sends from many goroutines at once, every datagram whole
// to its address, for both families; an address its socket's family
// cannot reach and a closed conn are refused as the conn would refuse them.
func TestPacketWriterSends(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}} {
		t.Run(fam.network, func(t *testing.T) {
			a, _ := udpSocket(t, fam.network, fam.addr)
			b, _ := udpSocket(t, fam.network, fam.addr)
			w, err := rawsock.NewPacketWriter(a)
			if err != nil {
				t.Fatal(err)
			}
			to := b.LocalAddr().(*net.UDPAddr).AddrPort()
			const senders, each = 8, 25 // 200 small datagrams fit the receive buffer
			done := make(chan error, senders)
			for g := range senders {
				go func() {
					var err error
					for i := range each {
						if err = w.WriteTo([]byte{byte(g), byte(i)}, to); err != nil {
							break
						}
					}
					done <- err
				}()
			}
			for range senders {
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			}
			seen := map[[2]byte]bool{}
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 64)
			for len(seen) < senders*each {
				n, from, err := b.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("after %d of %d datagrams: %v", len(seen), senders*each, err)
				}
				if n != 2 || from.Port() != a.LocalAddr().(*net.UDPAddr).AddrPort().Port() {
					t.Fatalf("got %d bytes from %v", n, from)
				}
				seen[[2]byte{buf[0], buf[1]}] = true
			}
		})
	}
	a, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	w, _ := rawsock.NewPacketWriter(a)
	var ae *net.AddrError
	if err := w.WriteTo([]byte("x"), netip.MustParseAddrPort("[::1]:9")); !errors.As(err, &ae) {
		t.Fatalf("an IPv6 address on an IPv4 socket: %v, want an AddrError", err)
	}
	a.Close()
	if err := w.WriteTo([]byte("x"), netip.MustParseAddrPort("127.0.0.1:9")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after Close: %v, want net.ErrClosed", err)
	}
}

// Its sends enter no syscall state, where the conn's own do.
func TestPacketWriterMakesNoSchedulerSyscalls(t *testing.T) {
	a, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	b, _ := udpSocket(t, "udp4", "127.0.0.1:0")
	to := b.LocalAddr().(*net.UDPAddr).AddrPort()
	w, err := rawsock.NewPacketWriter(a)
	if err != nil {
		t.Fatal(err)
	}
	const rounds = 50
	run := func(send func() error) func() {
		return func() {
			logStart()
			for range rounds {
				if err := send(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}
	own := syscallEntries(t, run(func() error { _, err := a.WriteToUDPAddrPort([]byte("ping"), to); return err }))
	raw := syscallEntries(t, run(func() error { return w.WriteTo([]byte("ping"), to) }))
	if own < rounds || raw != 0 {
		t.Fatalf("%d sends entered the syscall state %d times through the conn and %d through PacketWriter; want >= %d and 0", rounds, own, raw, rounds)
	}
}
