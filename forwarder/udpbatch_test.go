package forwarder

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/ipv4"
)

// One flush sends every datagram to its own port with its own PROXY v2
// header, and a datagram the kernel refuses (too large) is reported by its
// index while the ones after it still go out.
func TestBatchWriter(t *testing.T) {
	t.Parallel()
	var sinks [2]*net.UDPConn
	for i := range sinks {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		sinks[i] = c
	}
	port := func(i int) uint16 { return uint16(sinks[i].LocalAddr().(*net.UDPAddr).Port) }
	conn, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	w := newBatchWriter(conn, netip.MustParseAddr("127.0.0.1"))
	client := netip.MustParseAddrPort("203.0.113.7:4444")
	public := netip.MustParseAddrPort("198.51.100.1:5000")

	w.add([]byte("first"), port(0), false, client, public)
	w.add(make([]byte, 70000), port(0), false, client, public) // over the IPv4 maximum: refused
	w.add([]byte("third"), port(1), true, client, public)
	w.add([]byte("fourth"), port(0), false, client, public)
	failed, err := w.flush()
	if failed != 1<<1 || err == nil {
		t.Fatalf("failed = %b, err = %v; want only message 1 failed, with its error", failed, err)
	}
	read := func(c *net.UDPConn) []byte {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 2048)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return buf[:n]
	}
	if got := read(sinks[0]); string(got) != "first" {
		t.Fatalf("sink 0 got %q first", got)
	}
	if got := read(sinks[0]); string(got) != "fourth" {
		t.Fatalf("sink 0 got %q second", got)
	}
	want := append(appendProxyV2(nil, true, client, public), "third"...)
	if got := read(sinks[1]); !bytes.Equal(got, want) {
		t.Fatalf("sink 1 got %x, want PROXY v2 header + payload %x", got, want)
	}
	if len(w.msgs) != 0 {
		t.Fatalf("%d messages left after flush", len(w.msgs))
	}
}

// recordingConn passes batches on and records the GSO sends among them.
type recordingConn struct {
	batchConn
	gsoSends []int // datagram bytes of each send with a UDP_SEGMENT
	refuse   error // refuse every GSO send with this error
}

func (c *recordingConn) WriteBatch(ms []ipv4.Message, flags int) (int, error) {
	if len(ms) == 1 && len(ms[0].OOB) > 0 {
		if c.refuse != nil {
			return 0, c.refuse
		}
		n := 0
		for _, b := range ms[0].Buffers {
			n += len(b)
		}
		c.gsoSends = append(c.gsoSends, n)
	}
	return c.batchConn.WriteBatch(ms, flags)
}

// gsoBatch queues a mix that has GSO runs and datagrams that cannot join
// one, and returns what each sink must receive, in order.
func gsoBatch(w *batchWriter, ports [2]uint16, client, public netip.AddrPort) (want [2][][]byte) {
	dgram := func(i, size int) []byte { return bytes.Repeat([]byte{byte('a' + i)}, size) }
	queue := func(sink int, payload []byte, proxy bool) {
		w.add(payload, ports[sink], proxy, client, public)
		if proxy {
			payload = append(appendProxyV2(nil, true, client, public), payload...)
		}
		want[sink] = append(want[sink], payload)
	}
	for i := range 5 { // a run of five, the last one shorter
		size := 1200
		if i == 4 {
			size = 700
		}
		queue(0, dgram(i, size), false)
	}
	queue(0, dgram(5, 1300), false) // alone: larger than the run before it
	for i := range 3 {              // a run of three with PROXY v2 headers
		queue(1, dgram(6+i, 1000), true)
	}
	queue(0, dgram(9, 64), false) // alone: the next one goes elsewhere
	queue(1, dgram(10, 64), false)
	for i := range 50 { // 50 x 1400 B is over one send's 64 KiB: two runs
		queue(0, dgram(11+i%10, 1400), false)
	}
	return want
}

func readDatagrams(t *testing.T, c *net.UDPConn, n int) [][]byte {
	t.Helper()
	var got [][]byte
	for range n {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 2048)
		m, err := c.Read(buf)
		if err != nil {
			t.Fatalf("after %d datagrams: %v", len(got), err)
		}
		got = append(got, buf[:m])
	}
	return got
}

// Runs of same-size datagrams leave as UDP GSO sends, and the target still
// receives every datagram whole, in order, with its own PROXY v2 header.
func TestBatchWriterGSO(t *testing.T) {
	t.Parallel()
	for _, bc := range []struct {
		network, target string
		refused         bool
	}{{"udp4", "127.0.0.1", false}, {"udp6", "::1", false}, {"udp4", "127.0.0.1", true}} {
		refused := bc.refused
		t.Run(fmt.Sprintf("%s/refused=%v", bc.network, refused), func(t *testing.T) {
			target := netip.MustParseAddr(bc.target)
			var sinks [2]*net.UDPConn
			var ports [2]uint16
			for i := range sinks {
				c, err := net.ListenUDP(bc.network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(target, 0)))
				if err != nil {
					if bc.network == "udp6" {
						t.Skipf("no IPv6 loopback: %v", err)
					}
					t.Fatal(err)
				}
				defer c.Close()
				c.SetReadBuffer(1 << 20)
				sinks[i], ports[i] = c, uint16(c.LocalAddr().(*net.UDPAddr).Port)
			}
			conn, err := net.ListenUDP(bc.network, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			w := newBatchWriter(conn, target)
			if !w.gso {
				t.Skip("no UDP GSO on this OS")
			}
			rec := &recordingConn{batchConn: w.conn}
			if refused {
				// What a kernel without UDP GSO on the route answers.
				rec.refuse = syscall.EIO
			}
			w.conn = rec
			var offErr error
			w.gsoOff = func(err error) { offErr = err }
			want := gsoBatch(w, ports, netip.MustParseAddrPort("203.0.113.7:4444"), netip.MustParseAddrPort("198.51.100.1:5000"))
			failed, err := w.flush()
			if failed != 0 || err != nil {
				t.Fatalf("failed = %b, err = %v", failed, err)
			}
			for i, c := range sinks {
				got := readDatagrams(t, c, len(want[i]))
				for j := range want[i] {
					if !bytes.Equal(got[j], want[i][j]) {
						t.Fatalf("sink %d datagram %d: got %d bytes %.8q..., want %d bytes %.8q...", i, j, len(got[j]), got[j], len(want[i][j]), want[i][j])
					}
				}
			}
			if refused {
				if !errors.Is(offErr, syscall.EIO) || w.gso || len(rec.gsoSends) != 0 {
					t.Fatalf("GSO refused: off with %v, still on %v, %d GSO sends; want off with EIO", offErr, w.gso, len(rec.gsoSends))
				}
				return
			}
			// 4 x 1200 + 700, 3 x (header + 1000), 46 x 1400, 4 x 1400.
			hdr := len(appendProxyV2(nil, true, netip.MustParseAddrPort("203.0.113.7:4444"), netip.MustParseAddrPort("198.51.100.1:5000")))
			if wantSends := []int{4*1200 + 700, 3 * (hdr + 1000), 46 * 1400, 4 * 1400}; !slices.Equal(rec.gsoSends, wantSends) || offErr != nil {
				t.Fatalf("GSO sends of %v bytes (off: %v), want %v", rec.gsoSends, offErr, wantSends)
			}
		})
	}
}
