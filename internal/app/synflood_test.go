package app_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/netstack"
)

// TestSynFloodThroughAppliance: spoofed SYNs to one mapping cost its target
// a bounded number of short-lived connections (released and counted as
// handshake_timeout), while real clients of that mapping and of another one
// keep connecting.
func TestSynFloodThroughAppliance(t *testing.T) {
	const floodN = 600
	var open, accepted atomic.Int64
	targetA := serveTCP(t, func(c *net.TCPConn) {
		accepted.Add(1)
		open.Add(1)
		defer open.Add(-1)
		echo(c)
	})
	targetB := serveTCP(t, echo)

	// The link: the appliance's TUN, the client stack, and raw writes of
	// spoofed SYNs; replies to spoofed sources are dropped on the way back.
	appSide, rawSide := netstack.Pipe(linkMTU)
	cliSide, swSide := netstack.Pipe(linkMTU)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // after the harness closed both pipes
	wg.Add(2)
	go pumpPackets(&wg, swSide, rawSide, func([]byte) bool { return true })
	go pumpPackets(&wg, rawSide, swSide, func(p []byte) bool {
		return len(p) >= 20 && p[0]>>4 == 4 && netip.AddrFrom4([4]byte(p[16:20])) == client4
	})
	h := newHarnessOn(t, spec{Mappings: mapping("a", "tcp", "8080", targetA.String()) +
		mapping("b", "tcp", "8081", targetB.String())}, app.Options{}, appSide, cliSide)
	portA, portB := ap(public4, 8080), ap(public4, 8081)

	rng := rand.New(rand.NewPCG(9, 10))
	floodDone := make(chan struct{})
	go func() {
		defer close(floodDone)
		for i := 0; i < floodN; i += 50 {
			if err := writeSYNs(rawSide, rng, portA, 50); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond) // spread it over the clients' dials
		}
	}()
	for i := range 10 {
		if err := echoThrough(h, portB, fmt.Sprintf("to b %d", i)); err != nil {
			t.Fatalf("real client of mapping b, attempt %d, during the flood: %v", i, err)
		}
	}
	<-floodDone
	if err := echoThrough(h, portA, "to a"); err != nil {
		t.Fatalf("real client of mapping a during the flood: %v", err)
	}
	// Every dial the flood caused is released (handshake timeout 3 s).
	waitFor(t, 15*time.Second, "target a to hold no connection", func() bool { return open.Load() == 0 })
	n := accepted.Load()
	t.Logf("target a accepted %d connections for %d spoofed SYNs; mapping a refusals %v", n, floodN, h.mappingStatus("a").Refusals)
	if n > floodN/3 {
		t.Fatalf("target a accepted %d connections for %d spoofed SYNs: SYN cookies did not take over", n, floodN)
	}
	waitFor(t, 10*time.Second, "handshake_timeout counted for every spoofed dial", func() bool {
		return h.mappingStatus("a").Refusals["handshake_timeout"] == uint64(n-1) // less the real client
	})
}

// echoThrough dials dst through the appliance, sends msg and expects it back.
func echoThrough(h *harness, dst netip.AddrPort, msg string) error {
	c, err := h.dial(netip.AddrPortFrom(client4, 0), dst)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if string(b) != msg {
		return fmt.Errorf("echo %q, want %q", b, msg)
	}
	return nil
}

// pumpPackets copies batches from one device to another, keeping the
// packets keep accepts, until either closes.
func pumpPackets(wg *sync.WaitGroup, from, to tun.Device, keep func([]byte) bool) {
	defer wg.Done()
	const batch = 128
	bufs, sizes := make([][]byte, batch), make([]int, batch)
	for i := range bufs {
		bufs[i] = make([]byte, linkMTU+100)
	}
	out := make([][]byte, 0, batch)
	for {
		n, err := from.Read(bufs, sizes, 0)
		if err != nil {
			return
		}
		out = out[:0]
		for i := range n {
			if p := bufs[i][:sizes[i]]; keep(p) {
				out = append(out, p)
			}
		}
		if _, err := to.Write(out, 0); errors.Is(err, os.ErrClosed) {
			return
		}
	}
}

// writeSYNs writes n TCP SYNs to dst from random spoofed sources in
// 198.18.0.0/15 (nothing leaves the process).
func writeSYNs(dev tun.Device, rng *rand.Rand, dst netip.AddrPort, n int) error {
	pkts := make([][]byte, n)
	for i := range pkts {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18 + byte(rng.IntN(2)), byte(rng.IntN(256)), byte(1 + rng.IntN(254))}),
			uint16(1024+rng.IntN(60000)))
		pkts[i] = synPacket(src, dst, rng.Uint32())
	}
	_, err := dev.Write(pkts, 0)
	return err
}

// synPacket builds an IPv4 TCP SYN with valid checksums.
func synPacket(src, dst netip.AddrPort, seq uint32) []byte {
	b := make([]byte, 40)
	b[0], b[8], b[9] = 0x45, 64, 6 // version/IHL, TTL, TCP
	binary.BigEndian.PutUint16(b[2:], 40)
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], ^onesSum(0, b[:20]))
	tcp := b[20:]
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12], tcp[13] = 5<<4, 0x02 // data offset, SYN
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, 6, 0, 20)
	binary.BigEndian.PutUint16(tcp[16:], ^onesSum(onesSum(0, pseudo), tcp))
	return b
}

// onesSum adds b to the one's complement sum sum.
func onesSum(sum uint16, b []byte) uint16 {
	s := uint32(sum)
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}
