package netstack

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// recordingDispatcher notes the TCP segments GRO hands on: destination
// port, first sequence number and payload length.
type recordingDispatcher struct {
	got []groOut
}

type groOut struct {
	port     uint16
	seq, len uint32
}

func (r *recordingDispatcher) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	b := pkt.Data().AsRange().ToSlice()
	ip := header.IPv4(b)
	tcp := header.TCP(b[ip.HeaderLength():])
	r.got = append(r.got, groOut{tcp.DestinationPort(), tcp.SequenceNumber(), uint32(len(b)) - uint32(ip.HeaderLength()) - uint32(tcp.DataOffset())})
}

func (r *recordingDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// rawTCP4Data is rawTCP4 with an ACK and n bytes of payload.
func rawTCP4Data(src, dst netip.AddrPort, seq uint32, n int) []byte {
	h := rawTCP4(src, dst, seq, 1, header.TCPFlagAck)
	b := append(h, make([]byte, n)...)
	ip := header.IPv4(b)
	ip.SetTotalLength(uint16(len(b)))
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())
	tcp := header.TCP(b[header.IPv4MinimumSize:])
	tcp.SetChecksum(0)
	s, d := src.Addr().As4(), dst.Addr().As4()
	binary.BigEndian.PutUint16(tcp[16:18], ^l4Checksum(header.TCPProtocolNumber, s[:], d[:], tcp))
	return b
}

// TestFlushGRODeliversEveryFlow: segments of two flows that share one of
// GRO's eight buckets (their port sums differ by 8) are all handed on,
// merged per flow and in order, by the end of the batch. gVisor's Flush
// alone releases one packet per bucket (see flushGRO); the other flow's
// would wait for a later batch, or in a pooled GRO be overtaken by newer
// segments of its flow.
func TestFlushGRODeliversEveryFlow(t *testing.T) {
	src := netip.MustParseAddrPort("10.0.0.1:5000")
	dsts := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("10.0.0.2:40008")}
	const segs, size = 3, 100
	var rec recordingDispatcher
	cd := countingDispatcher{NetworkDispatcher: &rec}
	var g gro.GRO
	g.Init(true)
	g.Dispatcher = &cd
	for i := range segs {
		for _, dst := range dsts {
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(rawTCP4Data(src, dst, 1000+uint32(i*size), size))})
			pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
			pkt.RXChecksumValidated = true
			g.Enqueue(pkt)
			pkt.DecRef()
		}
	}
	if len(rec.got) != 0 {
		t.Fatalf("GRO handed on %v before the flush: the flows should have been held to merge", rec.got)
	}
	flushGRO(&g, &cd)
	for _, dst := range dsts {
		next, total := uint32(1000), uint32(0)
		for _, o := range rec.got {
			if o.port != dst.Port() {
				continue
			}
			if o.seq != next {
				t.Errorf("port %d: segment at %d handed on where %d was next", dst.Port(), o.seq, next)
			}
			next, total = o.seq+o.len, total+o.len
		}
		if total != segs*size {
			t.Errorf("port %d: %d of %d bytes handed on by the end of the batch (%v)", dst.Port(), total, segs*size, rec.got)
		}
	}
	if cd.n != uint64(len(rec.got)) {
		t.Errorf("counted %d deliveries, recorded %d", cd.n, len(rec.got))
	}
}
