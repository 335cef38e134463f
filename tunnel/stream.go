package tunnel

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/device"
)

// WireGuard over a byte stream (TLS on TCP, the fallback when UDP is
// blocked): each WireGuard message travels as one frame, a 2-byte
// big-endian length and the message. WireGuard authenticates and orders
// nothing by itself over UDP, so the framing adds no semantics: a frame is
// a datagram that cannot be lost.
const (
	frameHeader = 2
	// minFrame is the smallest WireGuard message (a keepalive).
	minFrame = device.MessageKeepaliveSize
	// streamQueue is how many messages one stream's write queue holds; past
	// it Send drops (WireGuard's send path must never wait on a TCP peer).
	// It matches gatePackets: the device holds no more data packets anyway.
	streamQueue = 256
	// streamIdle closes a stream that carried nothing this long: an
	// appliance sends a keepalive every uplink.keepalive (25 s) and pings
	// its control connection every 10 s.
	streamIdle = 3 * time.Minute
	// streamWriteTimeout closes a stream whose peer stopped reading.
	streamWriteTimeout = 30 * time.Second
	// streamBufSize sizes each stream's read and write buffers.
	streamBufSize = 64 << 10
	// poolFrame is the capacity of pooled frame buffers: a 1420-byte
	// tunnel packet plus WireGuard's overhead fits; larger ones are
	// allocated.
	poolFrame = 2048
)

var errFrameSize = errors.New("frame size out of range")

// maxStreamFrame is the largest frame either side accepts: what one UDP
// datagram can carry, so the transport lets a peer send nothing it could
// not send over UDP (tunnel MTUs up to conf.MaxTunnelMTU, and sides whose
// MTUs differ, work alike). Only an authenticated peer gets to send frames;
// the relay's frames in flight are bounded by the bind's queue.
const maxStreamFrame = 65507

var frameBufs = sync.Pool{New: func() any { b := make([]byte, poolFrame); return &b }}

func getFrameBuf(n int) *[]byte {
	if n > poolFrame {
		b := make([]byte, n)
		return &b
	}
	return frameBufs.Get().(*[]byte)
}

func putFrameBuf(b *[]byte) {
	if cap(*b) == poolFrame {
		*b = (*b)[:poolFrame]
		frameBufs.Put(b)
	}
}

// readFrame reads one frame's message into a buffer from the pool and
// returns it with its length. A length under minFrame or over limit is an
// error: the stream is out of sync or the peer is not speaking this
// protocol, and the caller closes it.
func readFrame(r io.Reader, limit int) (*[]byte, int, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, 0, err
	}
	n := int(binary.BigEndian.Uint16(h[:]))
	if n < minFrame || n > limit {
		return nil, 0, fmt.Errorf("%w: %d bytes, want %d-%d", errFrameSize, n, minFrame, limit)
	}
	b := getFrameBuf(n)
	if _, err := io.ReadFull(r, (*b)[:n]); err != nil {
		putFrameBuf(b)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, 0, err
	}
	return b, n, nil
}

// writeFrame writes msg as one frame.
func writeFrame(w *bufio.Writer, msg []byte) error {
	if len(msg) < minFrame || len(msg) > 0xffff {
		return fmt.Errorf("%w: %d bytes", errFrameSize, len(msg))
	}
	var h [frameHeader]byte
	binary.BigEndian.PutUint16(h[:], uint16(len(msg)))
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	_, err := w.Write(msg)
	return err
}

// streamCounters are shared by the streams of one side.
type streamCounters struct {
	dropped atomic.Uint64 // messages dropped: write queue full, or no stream
}

// queued is one message waiting in a stream's write queue.
type queued struct {
	buf *[]byte
	n   int
}

// stream is one established, authenticated TLS connection carrying frames.
// Its writer goroutine drains a bounded queue; its reader delivers each
// frame to the bind.
type stream struct {
	c     net.Conn
	raw   net.Conn // under TLS: closing it never waits, unlike sending close_notify
	ep    *streamEndpoint
	limit int // largest frame accepted
	cnt   *streamCounters
	queue chan queued
	done  chan struct{}
	once  sync.Once
	err   atomic.Pointer[error] // why it closed, first reason wins
}

func newStream(c net.Conn, limit int, cnt *streamCounters) *stream {
	s := &stream{c: c, raw: c, limit: limit, cnt: cnt, queue: make(chan queued, streamQueue), done: make(chan struct{})}
	if tc, ok := c.(*tls.Conn); ok {
		s.raw = tc.NetConn()
	}
	dst, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	s.ep = &streamEndpoint{s: s, dst: netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())}
	return s
}

// closeWith closes the stream once, remembering err as the reason.
func (s *stream) closeWith(err error) {
	s.once.Do(func() {
		if err == nil {
			err = net.ErrClosed
		}
		s.err.Store(&err)
		close(s.done)
		s.raw.Close()
	})
}

// Err is why the stream closed (nil while open).
func (s *stream) Err() error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	return nil
}

func (s *stream) closed() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// enqueue copies msgs into the write queue, dropping (and counting) those
// that do not fit; it never blocks.
func (s *stream) enqueue(msgs [][]byte) {
	for _, m := range msgs {
		if s.closed() {
			s.cnt.dropped.Add(1)
			continue
		}
		b := getFrameBuf(len(m))
		n := copy(*b, m)
		select {
		case s.queue <- queued{b, n}:
		default:
			putFrameBuf(b)
			s.cnt.dropped.Add(1)
		}
	}
}

// writeLoop writes queued messages, flushing when the queue runs dry, until
// the stream closes or a write fails.
func (s *stream) writeLoop() {
	w := bufio.NewWriterSize(s.c, streamBufSize)
	for {
		var q queued
		select {
		case q = <-s.queue:
		case <-s.done:
			s.drain()
			return
		}
		err := writeFrame(w, (*q.buf)[:q.n])
		putFrameBuf(q.buf)
		for more := true; more && err == nil; {
			select {
			case q = <-s.queue:
				err = writeFrame(w, (*q.buf)[:q.n])
				putFrameBuf(q.buf)
			default:
				more = false
			}
		}
		if err == nil {
			s.c.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
			err = w.Flush()
		}
		if err != nil {
			s.closeWith(fmt.Errorf("write: %w", err))
			s.drain()
			return
		}
	}
}

func (s *stream) drain() {
	for {
		select {
		case q := <-s.queue:
			putFrameBuf(q.buf)
		default:
			return
		}
	}
}

// readLoop reads frames and hands each to deliver (which owns the buffer
// from then on) until the stream fails, goes idle past streamIdle, or
// deliver returns false.
func (s *stream) readLoop(deliver func(b *[]byte, n int) bool) {
	r := bufio.NewReaderSize(s.c, streamBufSize)
	var armed time.Time
	for {
		// Re-arming the idle deadline once a second is enough.
		if now := time.Now(); now.Sub(armed) > time.Second {
			s.c.SetReadDeadline(now.Add(streamIdle))
			armed = now
		}
		b, n, err := readFrame(r, s.limit)
		if err != nil {
			s.closeWith(fmt.Errorf("read: %w", err))
			return
		}
		if !deliver(b, n) {
			putFrameBuf(b)
			s.closeWith(nil)
			return
		}
	}
}

// streamEndpoint is the conn.Endpoint of a stream: a WireGuard peer whose
// packets arrive on it, and which the relay answers on it.
type streamEndpoint struct {
	s   *stream
	dst netip.AddrPort
}

func (*streamEndpoint) ClearSrc()             {}
func (*streamEndpoint) SrcToString() string   { return "" }
func (e *streamEndpoint) DstToString() string { return "tcp/" + e.dst.String() }
func (e *streamEndpoint) DstIP() netip.Addr   { return e.dst.Addr() }
func (*streamEndpoint) SrcIP() netip.Addr     { return netip.Addr{} }

// DstToBytes feeds WireGuard's cookie MACs: the peer's address and port.
func (e *streamEndpoint) DstToBytes() []byte {
	b, _ := e.dst.MarshalBinary()
	return b
}
