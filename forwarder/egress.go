package forwarder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"go.uber.org/zap"
)

// Egress originates flows from the client's own address instead of from a
// host socket: the relay's engine reaches its targets (peers' tunnel
// addresses) through the tunnel this way. Targets must be IP literals.
type Egress interface {
	// DialTCP connects from src (the client) to dst. It may return before
	// dst answered (the tunnel's warm streams send the client's first bytes
	// with the connection's request); a target that then refuses or does
	// not answer within ctx's deadline makes the conn's first Read fail
	// with ErrLateDialFailure.
	DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)
	// WriteUDP sends one datagram from src (the client) to dst; it must
	// not block long. Replies come back through Engine.HandleUDPReply.
	WriteUDP(src, dst netip.AddrPort, payload []byte) error
}

// ErrLateDialFailure is what the Read of an Egress conn returns when its
// target refused, or did not answer, after DialTCP returned. HandleTCP
// counts the session as a failed dial (dial_failed), as it would have
// counted a refusal DialTCP returned; the client gets an RST either way.
var ErrLateDialFailure = errors.New("the target refused or did not answer")

// replyKey finds an egress UDP session from a reply: the client it goes to
// and the target it comes from.
type replyKey struct {
	client, target netip.AddrPort
}

// defaultReplyQueueLen bounds the replies an egress UDP session holds for
// its client: the packet path that hands them over never waits for the
// public socket, so what does not fit is dropped and counted.
const defaultReplyQueueLen = 512

// dialTCP opens the target leg of a TCP flow from src that arrived for dst.
func (e *Engine) dialTCP(ctx context.Context, r *Rule, src, dst netip.AddrPort, target string) (net.Conn, error) {
	eg := e.opts.Egress
	if eg == nil {
		return e.dialer.DialContext(ctx, "tcp", target)
	}
	if !r.targetAddr.IsValid() {
		return nil, fmt.Errorf("target %s is not an address; a tunnel egress needs one", r.Mapping.Target.Host)
	}
	return eg.DialTCP(ctx, src, netip.AddrPortFrom(r.targetAddr, r.targetPort(dst.Port())))
}

// HandleUDPReply passes a datagram from a target (from) back to the client
// (to) of the egress UDP session it answers; it reports false, and takes
// nothing, when no session matches. It never blocks: the reply is queued
// for the session's goroutine, or dropped and counted when the queue is
// full. payload is copied.
func (e *Engine) HandleUDPReply(from, to netip.AddrPort, payload []byte) bool {
	k := replyKey{client: unmapAddrPort(to), target: unmapAddrPort(from)}
	e.udp.mu.RLock()
	us := e.udp.replies[k]
	e.udp.mu.RUnlock()
	if us == nil {
		return false
	}
	us.idle.touch()
	if !us.replied.Load() {
		us.replied.Store(true)
	}
	bp := getDatagramBuf(len(payload))
	n := copy(*bp, payload)
	if !us.replyQ.push(datagram{buf: bp, n: n, dst: k.target}) {
		putDatagramBuf(bp)
		us.state.udpDrops.Add(1)
	}
	return true
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// runEgressUDP serves an egress UDP session on one goroutine: client
// datagrams go out through the egress, queued replies go to the client (one
// batch of each in turn, so neither direction starves the other), and the
// session ends when idle for its mapping's timeout.
func (e *Engine) runEgressUDP(us *udpSession) (reason string, err error) {
	r := us.rule.Load()
	if !r.targetAddr.IsValid() {
		us.state.refuse(refusedDialFailed)
		us.shutdown()
		return refusedDialFailed.String(), fmt.Errorf("target %s is not an address; a tunnel egress needs one", r.Mapping.Target.Host)
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	batch := make([]datagram, 0, maxUDPBatch)
	moreIn, moreOut := false, false // a queue may hold more than one batch
	for {
		d, expired := us.idle.deadline()
		if expired {
			us.state.udpExpired.Add(1)
			us.close("idle")
			return "idle", nil
		}
		if !moreIn && !moreOut {
			var wake <-chan time.Time
			if !d.IsZero() {
				timer.Reset(time.Until(d))
				wake = timer.C
			}
			select {
			case <-us.done:
				return "closed", nil
			case <-us.queue.ready:
				moreIn = true
			case <-us.replyQ.ready:
				moreOut = true
			case <-wake:
			}
		} else {
			select {
			case <-us.done:
				return "closed", nil
			case <-us.queue.ready:
				moreIn = true
			case <-us.replyQ.ready:
				moreOut = true
			default:
			}
		}
		if moreIn {
			batch = us.queue.take(batch[:0], maxUDPBatch)
			moreIn = len(batch) == maxUDPBatch
			e.sendEgress(us, batch)
		}
		if moreOut {
			batch = us.replyQ.take(batch[:0], maxUDPBatch)
			moreOut = len(batch) == maxUDPBatch
			e.writeReplies(us, batch)
		}
	}
}

// sendEgress sends client datagrams to the target through the egress.
func (e *Engine) sendEgress(us *udpSession, batch []datagram) {
	r := us.rule.Load()
	for _, d := range batch {
		dst := netip.AddrPortFrom(r.targetAddr, r.targetPort(d.dst.Port()))
		if err := e.opts.Egress.WriteUDP(us.client, dst, (*d.buf)[:d.n]); err != nil {
			us.state.udpDrops.Add(1)
			if ce := e.log.Check(zap.DebugLevel, "udp send failed"); ce != nil {
				ce.Write(zap.Uint64("session", us.id), zap.String("target", us.target), zap.Error(err))
			}
		} else {
			us.in.Add(uint64(d.n))
			us.state.bytesIn.Add(uint64(d.n))
		}
		putDatagramBuf(d.buf)
	}
}

// writeReplies writes queued replies to the client from the public address
// it used and the port the reply answers.
func (e *Engine) writeReplies(us *udpSession, batch []datagram) {
	r := us.rule.Load()
	for _, d := range batch {
		path := us.path.Load()
		pub := netip.AddrPortFrom(path.public, r.listenPort(d.dst.Port()))
		if err := path.via.WriteUDP(pub, us.client, (*d.buf)[:d.n]); err != nil {
			us.state.udpDrops.Add(1)
		} else {
			us.out.Add(uint64(d.n))
			us.state.bytesOut.Add(uint64(d.n))
		}
		putDatagramBuf(d.buf)
	}
}
