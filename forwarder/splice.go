package forwarder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/natbox/natbox/internal/gostack"
	"github.com/natbox/natbox/internal/rawsock"
)

// Splice buffers. One leg is usually a gVisor conn, which has no
// ReadFrom/WriteTo, so splice(2) never applies and our buffers are used.
// A direction reads into a small buffer while traffic is light and holds a
// large pooled one only while a read fills the small one (bulk transfer), so
// an idle session, blocked in Read, pins 2 x 4 KiB rather than 2 x 64 KiB.
const (
	copyBufSize      = 64 << 10
	smallCopyBufSize = 4 << 10
)

var (
	copyBufPool      = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	smallCopyBufPool = sync.Pool{New: func() any { b := make([]byte, smallCopyBufSize); return &b }}
)

// ErrIdleTimeout ends a splice or UDP session that saw no traffic for its
// idle timeout.
var ErrIdleTimeout = errors.New("idle timeout")

// idleTimer decides idleness without a timer per packet: traffic stores a
// timestamp, and a read deadline, armed only when it fires, re-checks it.
type idleTimer struct {
	clock    Clock
	maxSleep time.Duration      // 0: sleep until the idle timeout could fire
	last     atomic.Int64       // unix nanos of the last traffic, by clock
	idle     atomic.Int64       // nanoseconds; 0: never idle
	checked  func(expired bool) // test seam (Options.onIdleCheck): after each check
}

func (t *idleTimer) touch()                  { t.last.Store(t.clock.Now().UnixNano()) }
func (t *idleTimer) setIdle(d time.Duration) { t.idle.Store(int64(d)) }

// deadline returns the read deadline to arm next (zero: none), or expired
// when the idle timeout has passed.
func (t *idleTimer) deadline() (d time.Time, expired bool) {
	d, expired = t.check()
	if t.checked != nil {
		t.checked(expired)
	}
	return d, expired
}

func (t *idleTimer) check() (d time.Time, expired bool) {
	idle := t.idle.Load()
	if idle <= 0 {
		return time.Time{}, false
	}
	left := time.Duration(t.last.Load() + idle - t.clock.Now().UnixNano())
	if left <= 0 {
		return time.Time{}, true
	}
	if t.maxSleep > 0 && left > t.maxSleep {
		left = t.maxSleep
	}
	return time.Now().Add(left), false
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

type closeWriter interface{ CloseWrite() error }

// isKernelTCP reports whether c is a kernel socket (a *net.TCPConn, or a
// conn that exposes its file descriptor).
func isKernelTCP(c net.Conn) bool {
	_, ok := c.(syscall.Conn)
	return ok
}

type closeReader interface{ CloseRead() error }

// aborter is a conn that can close with an RST instead of a FIN (netstack's
// TCP conns).
type aborter interface{ Abort() error }

// lingerer is a conn whose Close sends an RST after SetLinger(0)
// (*net.TCPConn).
type lingerer interface{ SetLinger(sec int) error }

// closeWithReset closes c with an RST where c can send one, so its peer
// reads "connection reset" rather than a clean end of stream.
func closeWithReset(c net.Conn) error {
	switch c := c.(type) {
	case aborter:
		return c.Abort()
	case lingerer:
		c.SetLinger(0)
	}
	return c.Close()
}

// Splice copies a to b and b to a until both directions end, propagating
// half-close: after a clean EOF from one side it shuts the other side's
// write half (closing it outright when it cannot half-close) and its own
// read half. Anything else cuts the stream, and a cut stream must not look
// complete to either side, so it closes both conns with an RST (where the
// conn type can send one): a read or write error on either side (a reset,
// a keepalive timeout, ...), also while the other side is half-closed; ctx
// being done; and no traffic either way for idle (0: never). By convention
// a is the client and b the target. It always closes a and b before
// returning. err is nil after two clean EOFs, ErrIdleTimeout, the context's
// cause, or the first copy error, wrapped with its direction.
func Splice(ctx context.Context, a, b net.Conn, idle time.Duration) (aToB, bToA int64, err error) {
	var t idleTimer
	t.clock = wallClock{}
	t.setIdle(idle)
	t.touch()
	sp := newSplicer(a, b, &t)
	stop := context.AfterFunc(ctx, sp.resetBoth)
	defer stop()
	aToB, bToA, err = sp.run(nil, nil)
	if ctx.Err() != nil && !errors.Is(err, ErrIdleTimeout) {
		err = context.Cause(ctx)
	}
	return aToB, bToA, err
}

// splicer is one splice's shared state; a is the client, b the target.
type splicer struct {
	a, b      net.Conn
	idle      *idleTimer
	resets    *resetCounter // optional
	bufs      *bufBudget    // large buffers count against it; nil: unlimited
	closeOnce sync.Once
	closed    atomic.Bool  // set before the conns close: later errors are ours
	ended     atomic.Int32 // directions that read a clean EOF
	idled     atomic.Bool
	errOnce   sync.Once
	err       error
}

func newSplicer(a, b net.Conn, idle *idleTimer) *splicer {
	return &splicer{a: a, b: b, idle: idle}
}

// end closes both conns, with RSTs if reset, and reports whether this call
// closed them (only the first call does); safe to call from any goroutine.
func (sp *splicer) end(reset bool) (first bool) {
	sp.closeOnce.Do(func() {
		first = true
		sp.closed.Store(true)
		if reset {
			closeWithReset(sp.a)
			closeWithReset(sp.b)
			return
		}
		sp.a.Close()
		sp.b.Close()
	})
	return first
}

// closeBoth closes both conns after the stream ended cleanly.
func (sp *splicer) closeBoth() { sp.end(false) }

// resetBoth cuts the stream: both peers get an RST.
func (sp *splicer) resetBoth() { sp.end(true) }

// fail records the first error that we did not cause ourselves by closing,
// and resets both conns. leg is the conn whose read or write failed; the
// reset passed to the other one is counted.
func (sp *splicer) fail(err error, leg net.Conn) {
	if sp.closed.Load() || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) {
		sp.resetBoth()
		return
	}
	sp.errOnce.Do(func() { sp.err = err })
	if sp.end(true) {
		sp.resets.count(leg == sp.b)
	}
}

// run splices until both directions end; live byte counts go to the
// optional counters as they happen (session and mapping totals).
func (sp *splicer) run(aToBCount, bToACount *byteCounter) (aToB, bToA int64, err error) {
	a, b := sp.a, sp.b
	if d, _ := sp.idle.deadline(); !d.IsZero() {
		a.SetReadDeadline(d)
		b.SetReadDeadline(d)
	}
	done := make(chan int64, 1)
	go sp.runCopy(b, a, "client to target", aToBCount, done)
	bToA = sp.copy(a, b, "target to client", bToACount)
	aToB = <-done
	sp.closeBoth()
	if sp.idled.Load() {
		return aToB, bToA, ErrIdleTimeout
	}
	return aToB, bToA, sp.err
}

// runCopy exists so the second copy direction has a readable name in stacks.
// Writing into a netstack conn (the relay's client to its peer) runs
// gVisor's sender deep below: grown up front, the new goroutine's stack is
// copied once instead of doubling from there.
func (sp *splicer) runCopy(dst, src net.Conn, dir string, n *byteCounter, done chan<- int64) {
	if _, ok := dst.(socketReaderFrom); ok {
		gostack.Grow()
	}
	done <- sp.copy(dst, src, dir, n)
}

// Zero-copy paths a netstack conn offers beside a kernel socket
// (netstack/zerocopy_linux.go); each call moves bytes from src to dst and
// returns the count with the error of either side.
type (
	socketWriterTo interface {
		WriteToSocket(syscall.RawConn) (int, error, error)
	}
	socketReaderFrom interface {
		ReadFromSocket(syscall.RawConn) (int, error, error)
	}
)

// rawSocket is c's raw socket when c is a kernel socket, else nil.
func rawSocket(c net.Conn) syscall.RawConn {
	if sc, ok := c.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			return rc
		}
	}
	return nil
}

// copy moves src to dst: from a netstack conn to a kernel socket without a
// buffer of ours, from a kernel socket to a netstack conn without one while
// the socket holds a backlog, and otherwise through pooled buffers. It calls
// Read and Write directly, so neither side's ReadFrom/WriteTo can swap in
// its own buffer.
func (sp *splicer) copy(dst, src net.Conn, dir string, n *byteCounter) int64 {
	var toSocket, fromSocket func() (int, error, error)
	if s, ok := src.(socketWriterTo); ok {
		if rc := rawSocket(dst); rc != nil {
			toSocket = func() (int, error, error) { return s.WriteToSocket(rc) }
		}
	}
	if d, ok := dst.(socketReaderFrom); ok {
		if rc := rawSocket(src); rc != nil {
			fromSocket = func() (int, error, error) { return d.ReadFromSocket(rc) }
		}
	}
	read := src.Read
	if r := rawsock.NewReader(src); r != nil {
		read = r.Read // a kernel socket: no sysmon wake-up per read (internal/rawsock)
	}
	var small, big *[]byte // small: taken at the first buffered read
	defer func() {
		if small != nil {
			smallCopyBufPool.Put(small)
		}
		if big != nil {
			copyBufPool.Put(big)
			sp.bufs.give(copyBufSize)
		}
	}()
	var buf []byte
	backlog := false // the last read filled its buffer: try fromSocket
	var written int64
	for {
		var nr int
		var rerr, werr error
		switch {
		case toSocket != nil:
			nr, rerr, werr = toSocket()
		case backlog:
			if nr, rerr, werr = fromSocket(); nr == 0 && rerr == nil && werr == nil {
				backlog = false
				continue // under the threshold: a buffered read
			}
		default:
			if buf == nil {
				small = smallCopyBufPool.Get().(*[]byte)
				buf = *small
			}
			nr, rerr = read(buf)
			if nr > 0 {
				var nw int
				nw, werr = dst.Write(buf[:nr])
				nr = nw
			}
		}
		if nr > 0 {
			sp.idle.touch()
			written += int64(nr)
			n.add(nr)
		}
		if werr != nil {
			sp.fail(fmt.Errorf("%s: write: %w", dir, werr), dst)
			return written
		}
		switch {
		case toSocket != nil || backlog:
		case fromSocket != nil && nr == len(buf):
			backlog = true
		case big == nil && nr == len(buf) && sp.bufs.take(copyBufSize):
			// The small buffer filled: more is queued, move to the large
			// one if the budget has room (if not, the flow goes on in
			// small reads).
			big = copyBufPool.Get().(*[]byte)
			buf = *big
		case big != nil && nr < smallCopyBufSize:
			// Drained: give the large buffer back before blocking again.
			copyBufPool.Put(big)
			sp.bufs.give(copyBufSize)
			big, buf = nil, *small
		}
		switch {
		case rerr == nil:
		case rerr == io.EOF:
			if sp.closed.Load() {
				// A netstack conn reads EOF once we closed it: that EOF is
				// ours, and passing it on as a FIN could beat the RST.
				return written
			}
			if sp.ended.Add(1) == 2 {
				// The other direction read its EOF already, so run closes
				// both conns as soon as this one returns; the close sends
				// the FIN a half-close would, without two shutdown calls.
				return written
			}
			if cw, ok := dst.(closeWriter); ok {
				cw.CloseWrite()
			} else {
				// No half-close: closing is the only way to pass the EOF on.
				sp.closeBoth()
			}
			// A kernel socket's read half after EOF changes nothing for the
			// peer: no shutdown call for it.
			if cr, ok := src.(closeReader); ok && !isKernelTCP(src) {
				cr.CloseRead()
			}
			return written
		case isTimeout(rerr):
			d, expired := sp.idle.deadline()
			if expired {
				sp.idled.Store(true)
				// The stream was cut, not finished: a FIN could pass a
				// truncated answer off as complete.
				sp.resetBoth()
				return written
			}
			src.SetReadDeadline(d)
		default:
			sp.fail(fmt.Errorf("%s: read: %w", dir, rerr), src)
			return written
		}
	}
}

// resetCounter counts the resets a splice passed on, by the leg that got
// them; a nil counter counts nothing.
type resetCounter struct{ toClient, toTarget *atomic.Uint64 }

// count counts one reset passed on after the target's leg failed
// (fromTarget) or the client's.
func (c *resetCounter) count(fromTarget bool) {
	switch {
	case c == nil:
	case fromTarget:
		c.toClient.Add(1)
	default:
		c.toTarget.Add(1)
	}
}

// byteCounter adds to a session's and its mapping's byte counters; a nil
// counter counts nothing.
type byteCounter struct{ session, mapping *atomic.Uint64 }

func (c *byteCounter) add(n int) {
	if c == nil || n <= 0 {
		return
	}
	c.session.Add(uint64(n))
	c.mapping.Add(uint64(n))
}
