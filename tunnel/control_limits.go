package tunnel

import (
	"errors"
	"io"
	"net"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Bounds on what one peer can make the relay's control server hold. A peer
// has at most one control connection waiting for its hello (a newer one
// replaces it) and one session; it must say hello within helloTimeout; each
// message is at most maxControlLine bytes; it may send controlBurst
// messages at once, then controlRate a second (a ping every 10 s and a
// register per appliance reload need far less); and it must read the
// answers (outQueue).
const (
	defaultHelloTimeout = 5 * time.Second
	controlRate         = 10.0
	controlBurst        = 10 // below outQueue: a burst's answers fit the queue
	// refusalWriteTimeout bounds telling a refused connection why.
	refusalWriteTimeout = time.Second
	// refusalLinger and refusalDrain bound how long and how much a refused
	// connection is read after the refusal: closing with unread input
	// answers with a reset, which can destroy the refusal before the
	// appliance reads it (a flood refused for its rate has more in flight).
	refusalLinger = 250 * time.Millisecond
	refusalDrain  = 1 << 20
)

// ctlReason is why the relay refused or ended a peer's control connection.
type ctlReason int

const (
	ctlReplaced     ctlReason = iota // a newer connection came before this one said hello
	ctlHelloTimeout                  // no hello within the hello deadline
	ctlBadHello                      // the first message was not a hello
	ctlTooLong                       // a message longer than maxControlLine
	ctlBadMessage                    // a line that is not a control message
	ctlRate                          // more messages than controlRate allows
	ctlQueueFull                     // the appliance did not read the relay's answers
	ctlVersion                       // a hello with a protocol version the relay does not speak
	numCtlReasons
)

var ctlReasonNames = [numCtlReasons]string{"replaced", "hello_timeout", "bad_hello", "too_long", "bad_message", "rate", "queue_full", "unsupported_version"}

func (c ctlReason) String() string { return ctlReasonNames[c] }

// ctlCounters counts a peer's refused control connections by reason.
type ctlCounters [numCtlReasons]atomic.Uint64

// snapshot returns the non-zero counts by reason name, or nil.
func (c *ctlCounters) snapshot() map[string]uint64 {
	var out map[string]uint64
	for i := range c {
		if n := c[i].Load(); n > 0 {
			if out == nil {
				out = make(map[string]uint64)
			}
			out[ctlReason(i).String()] = n
		}
	}
	return out
}

// refuseControl counts and logs a refusal of p's control connection cc and,
// unless the connection was replaced (its peer has moved on), tells the
// appliance why before the caller closes it.
func (r *Relay) refuseControl(p *relayPeer, cc *controlConn, why ctlReason, err error) {
	p.ctlRefused[why].Add(1)
	r.log.Info("control connection refused", zap.String("peer", p.name), zap.String("reason", why.String()),
		zap.Stringer("src", cc.c.RemoteAddr()), zap.Error(err))
	if why != ctlReplaced {
		reason := "refused: " + why.String()
		if why == ctlVersion { // the appliance needs the numbers to act on it
			reason += ": " + err.Error()
		}
		if cc.write(message{Type: msgError, Reason: reason}, refusalWriteTimeout) == nil {
			lingerAfterRefusal(cc.c)
		}
	}
}

// lingerAfterRefusal half-closes c and reads what is still arriving, for
// at most refusalLinger and refusalDrain bytes, so that the close that
// follows finds no unread input and sends a FIN rather than a reset.
func lingerAfterRefusal(c net.Conn) {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	_ = c.SetReadDeadline(time.Now().Add(refusalLinger))
	_, _ = io.CopyN(io.Discard, c, refusalDrain)
}

// readReason classifies an error from controlConn.read, or reports false
// for the connection ending (closed, reset), which is no refusal.
func readReason(err error) (ctlReason, bool) {
	var ne net.Error
	switch {
	case errors.Is(err, ErrControlLineTooLong):
		return ctlTooLong, true
	case errors.Is(err, errBadMessage):
		return ctlBadMessage, true
	case errors.As(err, &ne) && ne.Timeout():
		return ctlHelloTimeout, true
	}
	return 0, false
}

// msgBucket is a token bucket of control messages; one goroutine uses it.
type msgBucket struct {
	tokens float64
	last   time.Time
}

func newMsgBucket(now time.Time) *msgBucket { return &msgBucket{tokens: controlBurst, last: now} }

// take spends one token, or reports false when none is left.
func (b *msgBucket) take(now time.Time) bool {
	b.tokens = min(controlBurst, b.tokens+now.Sub(b.last).Seconds()*controlRate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
