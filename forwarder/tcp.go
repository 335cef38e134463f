package forwarder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// TCPAttempt is a client's connection attempt that waits for natbox's answer
// (netstack.TCPRequest is one).
type TCPAttempt interface {
	// Accept completes the client's handshake. An error with a
	// HandshakeTimeout() bool method reporting true means the client never
	// answered (a vanished client or a spoofed SYN). If the handshake was
	// already complete (SYN cookies under a flood), Accept returns the
	// connection at once.
	Accept() (net.Conn, error)
	// Reject answers with an RST: "connection refused" before the
	// handshake, a reset of the connection after it.
	Reject()
	// Context is cancelled if the client gives up first (it sent an RST).
	Context() context.Context
}

// HandleTCP forwards one TCP connection attempt from src to dst that came in
// on in. It dials the target first and only then accepts the client's
// handshake; a refusal or failed dial rejects it (RST) instead, and a client
// that gives up during the dial cancels it, so it holds no in-flight budget
// for the rest of the dial timeout. Exactly one of Accept and Reject is
// called. It blocks for the life of the session, so the caller runs it on
// its own goroutine.
func (e *Engine) HandleTCP(in Ingress, src, dst netip.AddrPort, attempt TCPAttempt) {
	reject := attempt.Reject
	if !e.track() {
		e.unmatched.refuse(refusedShuttingDown)
		reject()
		return
	}
	defer e.flows.Done()
	rs := e.rules.Load()
	now := e.clock.Now()
	r := rs.Lookup(in.Name(), conf.TCP, dst, now)
	if r == nil {
		e.unmatched.refuse(refusedNoMatch)
		e.debugRefusal(nil, conf.TCP, src, dst, refusedNoMatch, nil)
		reject()
		return
	}
	if why := e.admit(r, src.Addr(), now); why != refusalNone {
		e.debugRefusal(r, conf.TCP, src, dst, why, nil)
		reject()
		return
	}
	srcKey := sourceKey(src.Addr())
	if why := e.allowNew(rs, r, srcKey, now); why != refusalNone {
		r.state.refuse(why)
		e.debugRefusal(r, conf.TCP, src, dst, why, nil)
		reject()
		return
	}
	target := r.targetHostPort(dst.Port())
	if why := e.acquireDial(rs, r, srcKey, target); why != refusalNone {
		r.state.refuse(why)
		e.debugRefusal(r, conf.TCP, src, dst, why, nil)
		reject()
		return
	}
	sl, why := e.reserveSlot(rs, r, conf.TCP, srcKey)
	if why == refusedSessions || why == refusedMappingSessions || why == refusedGroupSessions {
		// UDP sessions that never had a reply (a spoofed flood's) give way
		// to TCP too where the two share a bound (a relay peer's quota
		// among them).
		sl, why = e.reserveEvicting(rs, r, conf.TCP, srcKey)
	}
	if why != refusalNone {
		e.releaseDial(r, srcKey, target)
		r.state.refuse(why)
		e.debugRefusal(r, conf.TCP, src, dst, why, nil)
		reject()
		return
	}
	upstream, err := e.dialTarget(rs, r, src, dst, target, attempt.Context())
	e.releaseDial(r, srcKey, target)
	if err != nil && clientGone(attempt) {
		// Not the target's fault: nobody is left to refuse.
		e.releaseSlot(sl)
		e.log.Debug("client gave up during the dial", zap.String("rule", r.Name), zap.Stringer("src", src), zap.Error(err))
		reject()
		return
	}
	if err != nil {
		e.releaseSlot(sl)
		r.state.refuse(refusedDialFailed)
		e.debugRefusal(r, conf.TCP, src, dst, refusedDialFailed, err)
		reject()
		return
	}
	if ka := e.armKeepAlive(upstream); ka != nil {
		defer ka.Stop()
	}
	client, err := attempt.Accept()
	if err != nil {
		if handshakeTimedOut(err) {
			// Most likely a spoofed SYN: its target connection goes at once
			// (with a reset, so natbox keeps no TIME_WAIT for it).
			closeWithReset(upstream)
			e.releaseSlot(sl)
			r.state.refuse(refusedHandshakeTimeout)
			e.debugRefusal(r, conf.TCP, src, dst, refusedHandshakeTimeout, err)
			return
		}
		// The client is gone (typically it reset while its handshake
		// completed): the target must not read a clean, empty request.
		closeWithReset(upstream)
		if !e.closing.Load() {
			r.state.resetsToTarget.Add(1)
		}
		e.releaseSlot(sl)
		e.log.Debug("client gone before accept", zap.String("rule", r.Name), zap.Stringer("src", src), zap.Error(err))
		return
	}
	s := e.newSession(conf.TCP, in, r, src, dst, target, sl)
	sp := newSplicer(client, upstream, &s.idle)
	sp.bufs = e.bufs
	sp.resets = &resetCounter{toClient: &r.state.resetsToClient, toTarget: &r.state.resetsToTarget}
	s.stop = sp.resetBoth // shutdown, expiry, reload: the stream is cut
	e.register(s, rs)
	_, _, err = sp.run(
		&byteCounter{session: &s.in, mapping: &r.state.bytesIn},
		&byteCounter{session: &s.out, mapping: &r.state.bytesOut},
	)
	reason := "closed"
	switch {
	case errors.Is(err, ErrIdleTimeout):
		reason, err = "idle", nil
		s.state.tcpExpired.Add(1)
	case errors.Is(err, ErrLateDialFailure):
		reason = refusedDialFailed.String()
		r.state.refuse(refusedDialFailed)
	case err != nil:
		reason = "error"
	}
	e.finish(s, reason, err)
}

// handshakeTimedOut reports whether err says the client never completed its
// handshake (netstack.ErrHandshakeTimeout; forwarder does not import
// netstack).
func handshakeTimedOut(err error) bool {
	var ht interface{ HandshakeTimeout() bool }
	return errors.As(err, &ht) && ht.HandshakeTimeout()
}

// clientGone reports whether the client of a has given up.
func clientGone(a TCPAttempt) bool {
	return a.Context().Err() != nil
}

// dialTarget opens the host leg, bounded by dial_timeout, by engine
// shutdown and by the client giving up (attempt), and writes the PROXY
// header when the mapping asks for one.
func (e *Engine) dialTarget(rs *RuleSet, r *Rule, src, dst netip.AddrPort, target string, attempt context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(e.ctx, rs.dialTimeout())
	defer cancel()
	defer context.AfterFunc(attempt, cancel)()
	start := time.Now()
	conn, err := e.dialTCP(ctx, r, src, dst, target)
	if err != nil {
		return nil, fmt.Errorf("dial target %s: %w", target, err)
	}
	r.state.observeDial(time.Since(start))
	var hdr []byte
	switch r.proxy {
	case proxyV1:
		hdr = appendProxyV1(nil, src, dst)
	case proxyV2:
		hdr = appendProxyV2(nil, false, src, dst)
	}
	if hdr != nil {
		// The header must precede any client byte; the write is bounded like
		// the dial so a target that never reads cannot hold the flow.
		if d, ok := ctx.Deadline(); ok {
			conn.SetWriteDeadline(d)
		}
		_, err := conn.Write(hdr)
		conn.SetWriteDeadline(time.Time{})
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("write proxy header to %s: %w", target, err)
		}
	}
	return conn, nil
}

// targetKeepAlive is the keepalive on target sockets of the default dialer:
// a target that vanishes without a FIN or RST is found after at most
// Idle + Count x Interval of silence (plus keepAliveDelay).
var targetKeepAlive = net.KeepAliveConfig{
	Enable: true, Idle: 60 * time.Second, Interval: 15 * time.Second, Count: 4,
}

// defaultKeepAliveDelay is how long a target socket lives before its
// keepalive is set: four setsockopt calls that a connection of a few
// requests never needs (the first probe waits for a minute of silence
// anyway), measurable in the cost of a short connection.
const defaultKeepAliveDelay = 5 * time.Second

// armKeepAlive sets the keepalive of upstream, a target socket from the
// default dialer, once it has lived keepAliveDelay; stop the returned timer
// when the session ends. It returns nil when there is nothing to arm.
func (e *Engine) armKeepAlive(upstream net.Conn) *time.Timer {
	tc, ok := upstream.(*net.TCPConn)
	if !e.lazyKeepAlive || !ok {
		return nil
	}
	return time.AfterFunc(e.opts.keepAliveDelay, func() {
		err := tc.SetKeepAliveConfig(targetKeepAlive)
		if e.opts.onKeepAlive != nil {
			e.opts.onKeepAlive(tc, err)
		}
	})
}
