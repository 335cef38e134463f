package netstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// A stack has two MTUs. The link's (Config.MTU) is the largest packet it
// takes in or lets out. The path MTU (Config.PathMTU, SetPathMTU) is what
// the path carries: the largest datagram WriteUDP sends, and, unless the
// buffer budget says less, the MTU the link reports to gVisor (RouteMTU,
// linkEndpoint.cur): the MSS of new TCP connections and where gVisor
// fragments. It is the link's reported MTU, not a route-table MTU, since
// gVisor routes loopback peers (the relay's clients on its own host) past
// the route table. A tunnel stack keeps a large link MTU so that a probe
// (ProbePath) can find out whether the path carries more than the MTU it
// uses now.
//
// The budget's say: a connection whose buffers hold less than two segments
// stalls (gVisor's sender then waits for its retransmit timer to send what
// the peer's window cannot take whole), so the reported MTU stays where a
// connection's share of the budget holds two segments (shareMTU), and a
// connection keeps at least two segments' worth of the MTU it started with
// when its buffers are cut (tcpConn.floor, budget.go). On a 1500-byte link
// neither ever binds: the least share, 16 KiB, holds eleven segments.

// Link MTU bounds: IPv6's minimum link MTU (every stack carries IPv6) and
// the largest IP packet.
const (
	minLinkMTU = 1280
	maxLinkMTU = 65535
)

// ErrProbeLost is ProbePath's error when no echo of the probe came back.
var ErrProbeLost = errors.New("netstack: path probe: no echo came back")

// PathMTU is the path's MTU as last set.
func (s *Stack) PathMTU() int { return int(s.pathMTU.Load()) }

// RouteMTU is the MTU new TCP connections use: the path MTU, or less where
// the buffer budget's share could not hold two segments of it.
func (s *Stack) RouteMTU() int { return int(s.routeMTU.Load()) }

// SetPathMTU sets the path's MTU, between 1280 and the link's MTU.
// Connections keep the MSS they started with; new ones, and WriteUDP,
// follow mtu.
func (s *Stack) SetPathMTU(mtu int) error {
	if mtu < minLinkMTU || mtu > s.cfg.MTU {
		return fmt.Errorf("netstack: path mtu %d out of range; use %d-%d (the link's mtu)", mtu, minLinkMTU, s.cfg.MTU)
	}
	s.routeMu.Lock()
	defer s.routeMu.Unlock()
	s.pathMTU.Store(int32(mtu))
	s.applyRoutesLocked()
	return nil
}

// shareMTU is the largest MTU whose segments fit twice in share (0: no
// budget, no limit).
func shareMTU(share int) int {
	if share <= 0 {
		return 0
	}
	return max(minLinkMTU, share/2+header.IPv4MinimumSize+header.TCPMinimumSize)
}

// fitRoutesToShare caps the reported MTU for a new budget share. The
// budget calls it with its lock held; routeMu is taken after that lock,
// never before.
func (s *Stack) fitRoutesToShare(share int) {
	if limit := shareMTU(share); int(s.shareMTU.Swap(int32(limit))) == limit {
		return
	}
	s.routeMu.Lock()
	defer s.routeMu.Unlock()
	s.applyRoutesLocked()
}

// applyRoutesLocked sets the reported MTU to the path MTU within the share's
// limit. routeMu must be held.
func (s *Stack) applyRoutesLocked() {
	mtu := int(s.pathMTU.Load())
	if c := int(s.shareMTU.Load()); c > 0 {
		mtu = min(mtu, c)
	}
	if int(s.routeMTU.Swap(int32(mtu))) != mtu {
		s.link.cur.Store(uint32(mtu))
		s.routes.record(mtu)
	}
}

// routeHistory remembers the last reported MTUs, so that a connection
// learns the largest its handshake may have used: gVisor reads it (for the
// MSS) somewhere inside Connect or CreateEndpoint, and it may change
// meanwhile. Guarded by Stack.routeMu, but for gen.
type routeHistory struct {
	gen  atomic.Uint64 // changes so far
	last [16]int       // MTU after change g at last[g%16]
}

func (h *routeHistory) record(mtu int) {
	g := h.gen.Load() + 1
	h.last[g%uint64(len(h.last))] = mtu
	h.gen.Store(g)
}

// routeGen marks the start of a handshake for routeMTUSince.
func (s *Stack) routeGen() uint64 { return s.routes.gen.Load() }

// routeMTUSince is the largest MTU reported at any time since
// routeGen returned gen (the link's when too much changed meanwhile to
// tell).
func (s *Stack) routeMTUSince(gen uint64) int {
	s.routeMu.Lock()
	defer s.routeMu.Unlock()
	now, h := s.routes.gen.Load(), &s.routes
	mtu := int(s.routeMTU.Load())
	if now-gen >= uint64(len(h.last)) {
		return s.cfg.MTU // the link's: no route had more
	}
	// The MTU in force at gen, and every one since (New records the first,
	// so a handshake never starts at gen 0).
	for g := gen; g <= now; g++ {
		mtu = max(mtu, h.last[g%uint64(len(h.last))])
	}
	return mtu
}

// routeTable sends everything through the one NIC.
func routeTable() []tcpip.Route {
	return []tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	}
}

// ProbePath sends one ICMP echo request of size bytes (IPv4 header
// included) from src to dst, whole (built here and queued on the link
// past gVisor, which would fragment it to the current MTU: size may exceed
// that, not the link's), and waits for the echo of the same size until ctx
// is done (ErrProbeLost). src and dst are IPv4 addresses; dst is typically
// the far end of a tunnel, whose stack answers echo requests for its own
// addresses. The echo comes back through gVisor to a ping endpoint bound
// to the request's ident.
func (s *Stack) ProbePath(ctx context.Context, src, dst netip.Addr, size int) error {
	src, dst = src.Unmap(), dst.Unmap()
	if !src.Is4() || !dst.Is4() {
		return fmt.Errorf("netstack: path probe %s -> %s: IPv4 addresses only", src, dst)
	}
	payload := size - header.IPv4MinimumSize - header.ICMPv4MinimumSize
	if payload < 0 || size > s.cfg.MTU {
		return fmt.Errorf("netstack: path probe of %d bytes: use %d-%d (the link's mtu)",
			size, header.IPv4MinimumSize+header.ICMPv4MinimumSize, s.cfg.MTU)
	}
	if s.closing.Load() {
		return ErrClosed
	}
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(icmp.ProtocolNumber4, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return fmt.Errorf("netstack: path probe: %s", terr)
	}
	defer ep.Close()
	if terr := ep.Bind(tcpip.FullAddress{Addr: tcpip.AddrFrom4(src.As4())}); terr != nil {
		return fmt.Errorf("netstack: path probe: bind %s: %s", src, terr)
	}
	if terr := ep.Connect(tcpip.FullAddress{Addr: tcpip.AddrFrom4(dst.As4())}); terr != nil {
		return fmt.Errorf("netstack: path probe: connect %s: %s", dst, terr)
	}
	bound, terr := ep.GetLocalAddress()
	if terr != nil {
		return fmt.Errorf("netstack: path probe: %s", terr)
	}
	readable, notify := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&readable)
	defer wq.EventUnregister(&readable)

	seq := uint16(s.probeSeq.Add(1)) // a late echo of an earlier probe must not count
	msg := make([]byte, header.ICMPv4MinimumSize+payload)
	echo := header.ICMPv4(msg)
	echo.SetType(header.ICMPv4Echo)
	echo.SetIdent(bound.Port)
	echo.SetSequence(seq)
	for i := range msg[header.ICMPv4MinimumSize:] {
		msg[header.ICMPv4MinimumSize+i] = byte(i)
	}
	echo.SetChecksum(^checksum.Checksum(msg, 0))
	b := s.link.getBuf(size)
	b.n = size
	pkt := b.packet()
	ip := header.IPv4(pkt)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(size),
		Flags:       header.IPv4FlagDontFragment,
		TTL:         ipv4TTL,
		Protocol:    uint8(header.ICMPv4ProtocolNumber),
		SrcAddr:     tcpip.AddrFrom4(src.As4()),
		DstAddr:     tcpip.AddrFrom4(dst.As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(pkt[header.IPv4MinimumSize:], msg)
	if !s.link.writeRaw(b) {
		return ErrClosed
	}
	var got bytes.Buffer
	for {
		got.Reset()
		_, terr := ep.Read(&got, tcpip.ReadOptions{})
		if _, wait := terr.(*tcpip.ErrWouldBlock); wait {
			select {
			case <-notify:
				continue
			case <-ctx.Done():
				return fmt.Errorf("%w (%d bytes to %s)", ErrProbeLost, size, dst)
			case <-s.done:
				return ErrClosed
			}
		}
		if terr != nil {
			return fmt.Errorf("netstack: path probe of %d bytes to %s: %s", size, dst, terr)
		}
		reply := header.ICMPv4(got.Bytes())
		if len(reply) == len(msg) && reply.Sequence() == seq &&
			bytes.Equal(reply[header.ICMPv4MinimumSize:], msg[header.ICMPv4MinimumSize:]) {
			return nil
		}
	}
}
