package tunnel

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// udpKey identifies a public UDP client session: the client and the public
// port it sent to. The same port on two bind addresses cannot collide: each
// socket family only sees clients of its own family.
type udpKey struct {
	client netip.AddrPort
	port   uint16
}

// udpSession is one public UDP client talking to one peer's port.
type udpSession struct {
	h        *holding
	pc       *net.UDPConn   // the public socket the client used; replies leave from it
	client   netip.AddrPort // unmapped
	dst      netip.AddrPort // the peer's tunnel address and the port
	lastSeen atomic.Int64   // unix nanos
}

func (s *udpSession) touch() { s.lastSeen.Store(time.Now().UnixNano()) }

// udpSocketBuffer is the receive and send buffer asked for each public UDP
// socket. The kernel default (212992 bytes, about 90 full datagrams) absorbs
// only ~4 ms of a 200 Mbit/s stream while the reading goroutine waits for a
// CPU. Linux caps it at net.core.rmem_max / wmem_max; the memory is used
// only while datagrams queue.
const udpSocketBuffer = 4 << 20

// setUDPBuffers asks for udpSocketBuffer; failing is not fatal (the kernel
// default stays), as a small buffer only costs loss under bursts.
func setUDPBuffers(pc *net.UDPConn) {
	pc.SetReadBuffer(udpSocketBuffer)
	pc.SetWriteBuffer(udpSocketBuffer)
}

// udpReadBatch is how many datagrams one read of a public UDP socket may
// return (recvmmsg on Linux): a backlog built while the goroutine waited
// for a CPU drains with one syscall per batch instead of one per datagram.
const udpReadBatch = 32

// batchReader is ipv4.PacketConn or ipv6.PacketConn (their Message types
// are the same).
type batchReader interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
}

// udpLoop reads one public UDP socket in batches and forwards each datagram
// into the tunnel from the client's own address. Buffers are MTU-sized: a
// larger datagram could not cross the tunnel anyway (natbox never
// fragments), so one the kernel truncated is dropped.
func (r *Relay) udpLoop(h *holding, pc *net.UDPConn) {
	defer r.wg.Done()
	var br batchReader = ipv4.NewPacketConn(pc)
	if pc.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Is6() {
		br = ipv6.NewPacketConn(pc)
	}
	msgs := make([]ipv4.Message, udpReadBatch)
	backing := make([]byte, udpReadBatch*r.mtu)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{backing[i*r.mtu : (i+1)*r.mtu]}
	}
	for {
		n, err := br.ReadBatch(msgs, 0)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || h.ctx.Err() != nil {
				return
			}
			continue // a transient error on an unconnected socket
		}
		for i := range msgs[:n] {
			m := &msgs[i]
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			if m.Flags&syscall.MSG_TRUNC != 0 {
				if ce := r.log.Check(zap.DebugLevel, "udp datagram larger than the tunnel mtu"); ce != nil {
					ce.Write(zap.Stringer("src", ua), zap.Int("mtu", r.mtu))
				}
				continue
			}
			r.forwardDatagram(h, pc, unmapPort(ua.AddrPort()), m.Buffers[0][:m.N])
		}
	}
}

// forwardDatagram sends one public datagram into the tunnel on client's
// session, creating the session if the budget allows.
func (r *Relay) forwardDatagram(h *holding, pc *net.UDPConn, client netip.AddrPort, payload []byte) {
	s := r.udpSession(h, pc, client)
	if s == nil {
		return
	}
	s.touch()
	if err := r.org.WriteUDP(s.client, s.dst, payload); err != nil {
		if ce := r.log.Check(zap.DebugLevel, "udp into tunnel"); ce != nil {
			ce.Write(zap.Stringer("src", s.client), zap.Stringer("dst", s.dst), zap.Error(err))
		}
	}
}

// udpSession returns the session of client on h's port, creating it if the
// session budget allows; nil means drop.
func (r *Relay) udpSession(h *holding, pc *net.UDPConn, client netip.AddrPort) *udpSession {
	key := udpKey{client: client, port: h.key.port}
	r.udpMu.RLock()
	s := r.udp[key]
	r.udpMu.RUnlock()
	if s != nil && s.h == h {
		return s
	}
	if h.ctx.Err() != nil || !r.admit() {
		return nil
	}
	s = &udpSession{
		h:      h,
		pc:     pc,
		client: client,
		dst:    netip.AddrPortFrom(tunnelAddrFor(h.peer.addr4, client.Addr()), h.key.port),
	}
	r.udpMu.Lock()
	if old := r.udp[key]; old != nil { // a stale session of a released holding, or a racing twin
		if old.h == h {
			r.udpMu.Unlock()
			r.sessions.Add(-1)
			return old
		}
		r.forgetUDPLocked(key, old)
	}
	r.udp[key] = s
	h.peer.opened.Add(1)
	h.peer.active.Add(1)
	r.udpMu.Unlock()
	r.log.Debug("session opened", zap.String("peer", h.peer.name), zap.String("proto", "udp"),
		zap.Stringer("src", client), zap.Stringer("dst", s.dst))
	return s
}

// expireLoop forgets UDP sessions idle for longer than the UDP idle timeout.
func (r *Relay) expireLoop() {
	defer r.wg.Done()
	idle := r.opts.udpIdleTimeout
	tick := time.NewTicker(max(idle/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case now := <-tick.C:
			cutoff := now.Add(-idle).UnixNano()
			r.udpMu.Lock()
			for k, s := range r.udp {
				if s.lastSeen.Load() < cutoff {
					r.forgetUDPLocked(k, s)
					r.log.Debug("session closed", zap.String("peer", s.h.peer.name), zap.String("proto", "udp"),
						zap.Stringer("src", s.client), zap.String("reason", "idle"))
				}
			}
			r.udpMu.Unlock()
		}
	}
}

// forgetUDPLocked removes session s, stored under k, and frees its slot.
// The caller holds udpMu for writing.
func (r *Relay) forgetUDPLocked(k udpKey, s *udpSession) {
	delete(r.udp, k)
	r.sessions.Add(-1)
	s.h.peer.active.Add(-1)
}
