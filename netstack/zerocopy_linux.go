package netstack

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/natbox/natbox/internal/rawsock"
)

// Moving bytes between a gVisor endpoint and a kernel socket without the
// user buffer gonet's Read and Write copy through (forwarder/splice.go
// uses these when one leg is a stack conn and the other a kernel socket):
// the endpoint reads a socket's backlog straight into its send buffer, and
// a received segment of zeroCopyMinView bytes or more goes to the socket
// straight from the endpoint's receive buffer. Small segments (a tunnel
// MTU's, a request's) are gathered into one write, as a copy did before.
const (
	zeroCopyMinView = 16 << 10
	// zeroCopyMaxStep bounds one WriteToSocket's hold on the endpoint.
	zeroCopyMaxStep = 256 << 10
	// zeroCopyMinBacklog is the socket backlog below which ReadFromSocket
	// leaves the read to the caller's buffered path: a short read into a
	// 64 KiB chunk would pin more memory than it carries.
	zeroCopyMinBacklog = 16 << 10
	zeroCopyMaxRead    = 64 << 10
)

var (
	errSocketFull = errors.New("socket send buffer full")
	errStepDone   = errors.New("step done")
	stagePool     = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
)

// WriteToSocket moves what the endpoint has received to the socket rc,
// waiting for data (until the read deadline) and for room in the socket.
// It returns after it moved something or failed: rerr is the endpoint's
// side (io.EOF after the peer's FIN, a timeout at the read deadline), werr
// the socket's.
//
// While the steps move zeroCopyMinView or more (bulk), a step peeks at the
// received bytes, writes what the socket takes, and only then consumes
// that much from the endpoint; otherwise it writes each view as it reads
// it. Either way bytes the socket did not take stay in the endpoint's
// receive buffer (the budget's), never in a buffer of ours, however long
// the socket stays full.
func (c *tcpConn) WriteToSocket(rc syscall.RawConn) (n int, rerr, werr error) {
	zc, st := &c.zc, &c.zc.step
	if st.fn == nil {
		st.fn = c.writeStep
	}
	w := &st.sw
	for {
		st.terr = nil
		err := rc.Write(st.fn)
		if w.written > 0 {
			c.movedIn.Add(uint64(w.written))
			zc.bulk = w.written >= zeroCopyMinView
		}
		switch {
		case err != nil:
			return w.written, nil, err
		case w.err != nil && !errors.Is(w.err, errSocketFull) && !errors.Is(w.err, errStepDone):
			return w.written, nil, w.err
		case w.written > 0:
			return w.written, nil, nil
		}
		switch st.terr.(type) {
		case *tcpip.ErrWouldBlock:
			if err := c.waitReadable(); err != nil {
				return 0, err, nil
			}
		case *tcpip.ErrClosedForReceive:
			return 0, c.eof("read"), nil
		case nil, *tcpip.ErrBadBuffer:
			// Nothing to write after all, or the socket was full: rc.Write waited.
		default:
			return 0, c.noteReset(connError(c.opError("read", st.terr))), nil
		}
	}
}

// writeStep is WriteToSocket's RawConn callback: one step into the socket
// fd; false (nothing written, the socket full) waits for room.
func (c *tcpConn) writeStep(fd uintptr) bool {
	st := &c.zc.step
	w := &st.sw
	w.start(int(fd), c.zc.bulk)
	if !w.gather {
		// A request's worth: each view written as it is, and consumed as
		// far as the socket took it, in one Read (no second lock after
		// the write, when the answer may already want the endpoint). A
		// bulk start's small views cost a write each for this one step.
		_, st.terr = c.ep.Read(w, tcpip.ReadOptions{})
	} else {
		_, st.terr = c.ep.Read(w, tcpip.ReadOptions{Peek: true})
		w.flush()
		w.release()
		if w.written > 0 {
			c.consume(w.written)
		}
	}
	return w.written > 0 || !errors.Is(w.err, errSocketFull)
}

// consume removes the first n received bytes, which WriteToSocket wrote,
// from the endpoint (a window update follows as after any read).
func (c *tcpConn) consume(n int) {
	d := discard{left: n}
	c.ep.Read(&d, tcpip.ReadOptions{})
}

// discard takes its first left bytes and stops there.
type discard struct{ left int }

func (d *discard) Write(p []byte) (int, error) {
	if len(p) <= d.left {
		d.left -= len(p)
		return len(p), nil
	}
	n := d.left
	d.left = 0
	return n, errStepDone
}

// writeStepState is WriteToSocket's step, kept in the conn so that a call
// allocates nothing (a closure and its captures per call were five
// allocations per round trip): the socket writer, the endpoint's error and
// the callback handed to the socket (writeStep, bound once).
type writeStepState struct {
	sw   socketWriter
	terr tcpip.Error
	fn   func(fd uintptr) bool
}

// socketWriter is the io.Writer WriteToSocket hands the endpoint: views
// are written to the socket as they are, but when gathering (a peek at a
// larger queue) those under zeroCopyMinView are gathered in a stage and
// written together. It never blocks: a full socket, or zeroCopyMaxStep
// bytes, end the endpoint's Read.
type socketWriter struct {
	fd      int
	gather  bool
	written int     // bytes the socket took this step, a prefix of the stream
	stage   []byte  // gathered bytes not yet written, in pooled
	pooled  *[]byte // from stagePool within a step (release)
	err     error
	budget  int
}

func (w *socketWriter) start(fd int, gather bool) {
	w.fd, w.gather, w.written, w.err, w.budget = fd, gather, 0, nil, zeroCopyMaxStep
}

func (w *socketWriter) Write(p []byte) (int, error) {
	if w.budget <= 0 {
		w.err = errStepDone
		return 0, w.err
	}
	if w.gather && len(p) < zeroCopyMinView {
		if w.pooled == nil {
			w.pooled = stagePool.Get().(*[]byte)
			w.stage = (*w.pooled)[:0]
		}
		if len(w.stage)+len(p) > cap(w.stage) && !w.flush() {
			return 0, w.err
		}
		w.stage = append(w.stage, p...)
		w.budget -= len(p)
		return len(p), nil
	}
	if !w.flush() {
		return 0, w.err
	}
	n, err := writeSocket(w.fd, p)
	w.written += n
	w.budget -= n
	if err != nil {
		w.err = err
	}
	return n, err
}

// flush writes the stage as far as the socket takes it; what it does not
// take is dropped (it is still in the endpoint, unconsumed).
func (w *socketWriter) flush() bool {
	if len(w.stage) == 0 {
		return true
	}
	n, err := writeSocket(w.fd, w.stage)
	w.written += n
	w.stage = w.stage[:0]
	if err != nil {
		w.err = err
		return false
	}
	return true
}

func (w *socketWriter) release() {
	if w.pooled != nil {
		stagePool.Put(w.pooled)
		w.pooled, w.stage = nil, nil
	}
}

// writeSocket is one non-blocking write; a full socket is errSocketFull
// (after a partial write too, so the caller stops there).
func writeSocket(fd int, p []byte) (int, error) {
	n, err := rawsock.Write(fd, p)
	switch {
	case err == unix.EAGAIN:
		return 0, errSocketFull
	case err != nil:
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", err)}
	case n < len(p):
		return n, errSocketFull
	}
	return n, nil
}

// ReadFromSocket queues the socket rc's backlog into the endpoint's send
// buffer, read straight into the endpoint's chunks, waiting for room in
// the endpoint. It reads nothing (n 0, no error) when the backlog is under
// zeroCopyMinBacklog: the caller's buffered read serves that, and waits.
// rerr is the socket's side (io.EOF after its FIN), werr the endpoint's.
func (c *tcpConn) ReadFromSocket(rc syscall.RawConn) (n int, rerr, werr error) {
	for {
		var p socketPayload
		var terr tcpip.Error
		var written int64
		err := rc.Read(func(fd uintptr) bool {
			backlog, err := rawsock.InQueue(int(fd))
			if err != nil || backlog < zeroCopyMinBacklog {
				return true
			}
			// One chunk per Write: the endpoint sends it before the next
			// read, as a 64 KiB copy did (a whole backlog read under its
			// lock would hold its ACKs and sends back).
			p = socketPayload{fd: int(fd), left: min(backlog, zeroCopyMaxRead)}
			written, terr = c.ep.Write(&p, tcpip.WriteOptions{Atomic: true})
			return true
		})
		if written > 0 {
			c.movedOut.Add(uint64(written))
		}
		switch {
		case err != nil:
			return int(written), err, nil
		case p.err != nil && written == 0:
			return 0, p.err, nil
		case written > 0:
			return int(written), p.err, nil
		}
		switch terr.(type) {
		case nil:
			return 0, nil, nil // small backlog: the caller's turn
		case *tcpip.ErrWouldBlock:
			c.waitWritable()
		default:
			return 0, nil, c.noteReset(connError(c.opError("write", terr)))
		}
	}
}

// socketPayload is the tcpip.Payloader ReadFromSocket hands the endpoint:
// its Read is a non-blocking read of the socket, and it ends (io.EOF) at
// the backlog it was made for, a drained socket, the socket's FIN or an
// error, which it keeps in err so the bytes before it are not lost.
type socketPayload struct {
	fd   int
	left int
	done bool
	err  error
}

func (p *socketPayload) Len() int { return p.left }

func (p *socketPayload) Read(b []byte) (int, error) {
	if p.done || p.left <= 0 {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	n, err := rawsock.Read(p.fd, b[:min(len(b), p.left)])
	switch {
	case err == unix.EAGAIN:
		p.done = true
		return 0, io.EOF
	case err != nil:
		p.done = true
		p.err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", err)}
		return 0, io.EOF
	case n == 0:
		p.done, p.err = true, io.EOF
		return 0, io.EOF
	}
	p.left -= n
	return n, nil
}
