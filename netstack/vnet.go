package netstack

import (
	"encoding/binary"
	"errors"

	"golang.zx2c4.com/wireguard/tun"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// This file is the virtio-net header of a kernel TUN opened with
// IFF_VNET_HDR (linux/virtio_net.h): every frame read or written starts with
// it. It says whether the frame is a TSO/USO super-packet (several segments
// the kernel would otherwise have split) and whether its checksum is partial
// (NEEDS_CSUM: a local sender's, to be completed) or already verified by the
// kernel (DATA_VALID). Parsing must never panic on any input (FuzzVnetFrame).

// vnetHdrLen is the size of struct virtio_net_hdr.
const vnetHdrLen = 10

// virtio_net_hdr flags and gso_type values.
const (
	vnetFlagNeedsCsum = 1
	vnetFlagDataValid = 2

	vnetGSONone  = 0
	vnetGSOTCPv4 = 1
	vnetGSOTCPv6 = 4
	vnetGSOUDPL4 = 5
	vnetGSOECN   = 0x80
)

// vnetHdr is a decoded virtio_net_hdr. The legacy header a TUN uses is in
// the host's byte order (the kernel's tun_is_little_endian: TUN_VNET_LE
// unset means native).
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

func decodeVnetHdr(b []byte) (h vnetHdr) {
	_ = b[vnetHdrLen-1]
	h.flags, h.gsoType = b[0], b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:4])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:6])
	h.csumStart = binary.NativeEndian.Uint16(b[6:8])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:10])
	return h
}

func (h *vnetHdr) encode(b []byte) {
	_ = b[vnetHdrLen-1]
	b[0], b[1] = h.flags, h.gsoType
	binary.NativeEndian.PutUint16(b[2:4], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:6], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:8], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:10], h.csumOffset)
}

// l4Trusted reports whether the kernel vouches for the frame's transport
// checksum: NEEDS_CSUM (a local sender's segment, whose checksum field holds
// only the pseudo-header sum) or DATA_VALID (the kernel verified it on the
// way in). Anything else natbox verifies itself.
func (h *vnetHdr) l4Trusted() bool {
	return h.flags&(vnetFlagNeedsCsum|vnetFlagDataValid) != 0
}

// gso returns the frame's segmentation type without the ECN bit.
func (h *vnetHdr) gso() uint8 { return h.gsoType &^ vnetGSOECN }

// classifyFrame classifies one frame read from a vnet TUN: the packet as
// classify does, with the transport checksum trusted where the header
// vouches for it. A USO frame (several UDP datagrams behind one header)
// keeps the verdictUDP of its first datagram, with payload covering all of
// them; udpSegments splits it. A header classify cannot honour (an unknown
// GSO type, a USO frame that is not UDP or has no segment size) drops the
// frame as dropVnetHeader.
func classifyFrame(h vnetHdr, b []byte, p *packetInfo) {
	classifyTrusting(b, p, h.l4Trusted())
	if p.verdict == verdictDrop {
		return
	}
	switch h.gso() {
	case vnetGSONone, vnetGSOTCPv4, vnetGSOTCPv6:
		// A TSO frame is one TCP segment with a large payload: gVisor takes
		// it as it is (no split, no re-merge).
	case vnetGSOUDPL4:
		if p.verdict != verdictUDP || h.gsoSize == 0 {
			*p = packetInfo{verdict: verdictDrop, reason: dropVnetHeader}
		}
	default:
		*p = packetInfo{verdict: verdictDrop, reason: dropVnetHeader}
	}
}

// udpSegments calls fn for each datagram payload of a classified UDP frame:
// the one payload, or a USO frame's payload cut every gsoSize bytes (the
// kernel's UDP GSO: equal datagrams, the last one shorter). It returns the
// number of datagrams.
func udpSegments(h vnetHdr, p *packetInfo, fn func(payload []byte)) int {
	if h.gso() != vnetGSOUDPL4 || int(h.gsoSize) >= len(p.payload) {
		fn(p.payload)
		return 1
	}
	n := 0
	for rest, seg := p.payload, int(h.gsoSize); len(rest) > 0; n++ {
		k := min(seg, len(rest))
		fn(rest[:k])
		rest = rest[k:]
	}
	return n
}

// completeChecksum fills in a partial transport checksum (NEEDS_CSUM) the
// way the kernel's skb_checksum_help does: the one's complement sum from
// csum_start to the end, stored at csum_start+csum_offset. Only packets
// classify did not look into need it (IPv6 routing headers and the like):
// gVisor trusts every checksum (RX offload) except a SYN's, which
// synChecksumValid checks. Out-of-range offsets leave b unchanged.
func completeChecksum(h vnetHdr, b []byte) {
	start, at := int(h.csumStart), int(h.csumStart)+int(h.csumOffset)
	if h.flags&vnetFlagNeedsCsum == 0 || start >= len(b) || at+2 > len(b) {
		return
	}
	// The field holds the pseudo-header sum, so the sum over the range
	// (field included) is the whole checksum.
	binary.BigEndian.PutUint16(b[at:], ^checksum.Checksum(b[start:], 0))
}

// outVnetHdr builds the header for one of gVisor's outbound packets (the
// link advertises host GSO on a vnet TUN): a TSO frame when its payload is
// larger than one segment, NEEDS_CSUM whenever gVisor left the TCP checksum
// partial (it does so for every data segment under host GSO), zero
// otherwise.
func outVnetHdr(pkt *stack.PacketBuffer) vnetHdr {
	gso := &pkt.GSOOptions
	if gso.Type != stack.GSOTCPv4 && gso.Type != stack.GSOTCPv6 {
		return vnetHdr{}
	}
	var h vnetHdr
	if gso.NeedsCsum {
		h.flags = vnetFlagNeedsCsum
		h.csumStart = gso.L3HdrLen
		h.csumOffset = gso.CsumOffset
	}
	if gso.MSS > 0 && pkt.Data().Size() > int(gso.MSS) {
		h.gsoType = vnetGSOTCPv4
		if gso.Type == stack.GSOTCPv6 {
			h.gsoType = vnetGSOTCPv6
		}
		h.gsoSize = gso.MSS
		h.hdrLen = gso.L3HdrLen + uint16(len(pkt.TransportHeader().Slice()))
	}
	return h
}

// vnetDevice is a device whose frames carry a virtio-net header and that a
// Stack reads and writes queue by queue itself (vnetTUN on Linux).
type vnetDevice interface {
	tun.Device
	frameQueues() []frameQueue
}

// frameQueue is one queue of a vnetDevice. read and write are each used by
// one goroutine at a time.
type frameQueue interface {
	// read reads one frame's header into hdr and its packet into buf and
	// returns the packet's length; with block false, errWouldBlock when
	// nothing is waiting; os.ErrClosed once the device is closed.
	read(hdr, buf []byte, block bool) (int, error)
	// write writes one frame, header and packet, gathered from parts (at
	// most maxFrameParts).
	write(parts [][]byte) error
}

// errWouldBlock: a frameQueue read with block false found nothing waiting.
var errWouldBlock = errors.New("netstack: no frame waiting")

// flowQueue picks the queue of n for a frame (parts as appendParts returns
// them: virtio-net header first, then the packet, whose IP and transport
// headers are in one part) by its addresses and ports, the same for both
// directions of a flow. Frames it cannot parse go to queue 0.
func flowQueue(parts [][]byte, n int) int {
	var pkt []byte
	switch {
	case len(parts) == 0:
		return 0
	case len(parts[0]) > vnetHdrLen:
		pkt = parts[0][vnetHdrLen:] // header and packet in one buffer
	case len(parts) > 1:
		pkt = parts[1]
	}
	var h uint32
	var l4 []byte
	switch {
	case len(pkt) >= header.IPv4MinimumSize && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0xf) * 4
		h = binary.BigEndian.Uint32(pkt[12:16]) ^ binary.BigEndian.Uint32(pkt[16:20])
		if p := pkt[9]; (p == uint8(header.TCPProtocolNumber) || p == uint8(header.UDPProtocolNumber)) && ihl >= header.IPv4MinimumSize && len(pkt) >= ihl+4 {
			l4 = pkt[ihl:]
		}
	case len(pkt) >= header.IPv6MinimumSize && pkt[0]>>4 == 6:
		for i := 8; i < 40; i += 4 {
			h ^= binary.BigEndian.Uint32(pkt[i : i+4])
		}
		if p := pkt[6]; (p == uint8(header.TCPProtocolNumber) || p == uint8(header.UDPProtocolNumber)) && len(pkt) >= 44 {
			l4 = pkt[40:]
		}
	default:
		return 0
	}
	if l4 != nil {
		h ^= uint32(binary.BigEndian.Uint16(l4[0:2]) ^ binary.BigEndian.Uint16(l4[2:4]))
	}
	h *= 0x9e3779b1 // spread the xor over the high bits
	return int(uint64(h>>16) * uint64(n) >> 16)
}
