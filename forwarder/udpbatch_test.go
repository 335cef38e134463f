package forwarder

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"
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
