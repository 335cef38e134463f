package netstack

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// firstWrite records the first slice handed to Write.
type firstWrite struct{ p []byte }

func (w *firstWrite) Write(p []byte) (int, error) {
	if w.p == nil {
		w.p = p
	}
	return len(p), nil
}

// TestInboundBufferPayloadStaysInPlace replays what gVisor's IP layer does
// with an inbound packet (hold a clone of the network header's view, then
// pull the header up again) and checks the payload is still the bytes
// natbox read, not a copy: without the headers in a view of their own, the
// pull-up copied the whole packet.
func TestInboundBufferPayloadStaysInPlace(t *testing.T) {
	src := netip.MustParseAddrPort("198.51.100.7:40000")
	dst := netip.MustParseAddrPort("10.0.0.2:80")
	payload := bytes.Repeat([]byte("natbox"), 200)
	for _, handOver := range []bool{true, false} {
		seg := rawTCP(src, dst, 1, 1, header.TCPFlagAck)
		pkt := append(seg, payload...)
		ip := header.IPv4(pkt)
		ip.SetTotalLength(uint16(len(pkt)))
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		var info packetInfo
		classifyTrusting(pkt, &info, true)
		if !info.tcp || info.tcpPayload != len(payload) {
			t.Fatalf("classify: tcp %v payload %d", info.tcp, info.tcpPayload)
		}
		var v *buffer.View
		want := &pkt[len(seg)]
		if handOver {
			v = buffer.NewViewWithData(pkt)
			want = &v.AsSlice()[len(seg)]
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: inboundBuffer(pkt, &info, v)})
		pb.NetworkHeader().Consume(header.IPv4MinimumSize)
		pb.TransportHeader().Consume(header.TCPMinimumSize)
		held := pb.NetworkHeader().View() // as ipv4's HandlePacket holds it
		if got := header.IPv4(pb.NetworkHeader().Slice()).DestinationAddress(); got.String() != dst.Addr().String() {
			t.Fatalf("header after pull-up: destination %v", got)
		}
		var w firstWrite
		if _, err := pb.Data().ReadTo(&w, true); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(w.p, payload) {
			t.Fatalf("handOver %v: payload view holds %d bytes, want the %d of the segment", handOver, len(w.p), len(payload))
		}
		if handOver && &w.p[0] != want {
			t.Fatal("the handed-over payload was copied when the header was pulled up")
		}
		if !handOver && &w.p[0] == want {
			t.Fatal("the caller's bytes were not copied")
		}
		held.Release()
		pb.DecRef()
	}
}

// TestInboundBufferSmallStaysWhole: ACKs and small segments keep one view
// (a split would cost more than the header copy it saves).
func TestInboundBufferSmallStaysWhole(t *testing.T) {
	pkt := rawTCP(netip.MustParseAddrPort("198.51.100.7:40000"), netip.MustParseAddrPort("10.0.0.2:80"), 1, 1, header.TCPFlagAck)
	var info packetInfo
	classifyTrusting(pkt, &info, true)
	buf := inboundBuffer(pkt, &info, nil)
	defer buf.Release()
	if _, ok := buf.PullUp(0, len(pkt)); !ok || buf.Size() != int64(len(pkt)) {
		t.Fatalf("an ACK should stay one view of %d bytes", len(pkt))
	}
}
