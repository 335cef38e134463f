package tunnel

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
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

// maxDatagram is the largest UDP payload.
const maxDatagram = 64 << 10

// udpLoop reads one public UDP socket and forwards each datagram into the
// tunnel from the client's own address.
func (r *Relay) udpLoop(h *holding, pc *net.UDPConn) {
	defer r.wg.Done()
	buf := make([]byte, maxDatagram)
	for {
		n, client, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || h.ctx.Err() != nil {
				return
			}
			continue // a transient error on an unconnected socket
		}
		s := r.udpSession(h, pc, unmapPort(client))
		if s == nil {
			continue
		}
		s.touch()
		if err := r.org.WriteUDP(s.client, s.dst, buf[:n]); err != nil {
			if ce := r.log.Check(zap.DebugLevel, "udp into tunnel"); ce != nil {
				ce.Write(zap.Stringer("src", s.client), zap.Stringer("dst", s.dst), zap.Error(err))
			}
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
