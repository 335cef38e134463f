package netstack

import "gvisor.dev/gvisor/pkg/buffer"

// headerSplitMin: a TCP segment carrying at least this much payload reaches
// gVisor with its IP and TCP headers in a view of their own.
const headerSplitMin = 256

// inboundBuffer returns the gVisor buffer of the inbound packet pkt, which
// classify described in info. v, if not nil, is a view holding exactly pkt
// and is handed over; otherwise pkt is copied.
//
// Why the headers get a view of their own: gVisor's IP layer keeps a clone
// of the network header's view while it handles a packet and then asks for
// the header again (HandlePacket in gVisor's network/ipv4 and ipv6), and a
// pull-up from a view whose chunk is shared copies the whole chunk
// (buffer.Buffer.PullUp): a zeroed allocation and a copy of the entire
// packet, for every packet in. With the headers apart, that copy is their
// few dozen bytes (netstack/BENCH.md, "header split").
func inboundBuffer(pkt []byte, info *packetInfo, v *buffer.View) buffer.Buffer {
	if !info.tcp || info.tcpPayload < headerSplitMin { // fragments are never tcp (classify)
		if v == nil {
			v = buffer.NewViewWithData(pkt)
		}
		return buffer.MakeWithView(v)
	}
	hl := len(pkt) - info.tcpPayload
	if v == nil {
		v = buffer.NewViewWithData(pkt[hl:])
	} else {
		v.TrimFront(hl)
	}
	buf := buffer.MakeWithView(buffer.NewViewWithData(pkt[:hl]))
	payload := buffer.MakeWithView(v)
	buf.Merge(&payload) // Append would fill the header chunk's room from the payload
	return buf
}
