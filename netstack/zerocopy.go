package netstack

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The waits and state of the zero-copy paths between a stack conn and a
// kernel socket (zerocopy_linux.go).

// waitReadable waits until the endpoint may have data, or the read
// deadline passes (a timeout error). Only the conn's one reader calls it.
func (c *tcpConn) waitReadable() error {
	zc := &c.zc
	if zc.readCh == nil {
		zc.readEntry, zc.readCh = waiter.NewChannelEntry(waiter.ReadableEvents)
	}
	c.wq.EventRegister(&zc.readEntry)
	defer c.wq.EventUnregister(&zc.readEntry)
	// Data may have come between the caller's Read and the registration.
	if c.ep.Readiness(waiter.ReadableEvents) != 0 {
		return nil
	}
	for {
		var timeout <-chan time.Time
		if d := zc.deadline.Load(); d != 0 {
			left := time.Until(time.Unix(0, d))
			if left <= 0 {
				return c.timeoutError()
			}
			if zc.timer == nil {
				zc.timer = time.NewTimer(left)
			} else {
				zc.timer.Reset(left)
			}
			timeout = zc.timer.C
		}
		select {
		case <-zc.readCh:
			return nil
		case <-zc.deadlineSet:
			// Wait again with the new deadline.
		case <-timeout:
			return c.timeoutError()
		}
	}
}

// waitWritable waits until the endpoint may take more to send. Only the
// conn's one writer calls it; closing the endpoint wakes it.
func (c *tcpConn) waitWritable() {
	zc := &c.zc
	if zc.writeCh == nil {
		zc.writeEntry, zc.writeCh = waiter.NewChannelEntry(waiter.WritableEvents)
	}
	c.wq.EventRegister(&zc.writeEntry)
	defer c.wq.EventUnregister(&zc.writeEntry)
	if c.ep.Readiness(waiter.WritableEvents) == 0 {
		<-zc.writeCh
	}
}

// zeroCopyState is what WriteToSocket and ReadFromSocket keep per conn.
type zeroCopyState struct {
	// deadline is the read deadline (unix nanoseconds, 0: none), as
	// SetReadDeadline last set it; deadlineSet wakes a waiting reader.
	deadline    atomic.Int64
	deadlineSet chan struct{}
	timer       *time.Timer // the reader's
	bulk        bool        // the reader's last step moved zeroCopyMinView or more
	readEntry   waiter.Entry
	readCh      chan struct{}
	writeEntry  waiter.Entry
	writeCh     chan struct{}
	step        writeStepState // the reader's WriteToSocket step
}

func (c *tcpConn) setReadDeadline(t time.Time) {
	var d int64
	if !t.IsZero() {
		d = t.UnixNano()
	}
	c.zc.deadline.Store(d)
	select {
	case c.zc.deadlineSet <- struct{}{}:
	default:
	}
}

func (c *tcpConn) timeoutError() error {
	return &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.ErrDeadlineExceeded}
}

// opError is the error gonet would return for terr, which connError maps.
func (c *tcpConn) opError(op string, terr tcpip.Error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: errors.New(terr.String())}
}

// SetReadDeadline sets gonet's deadline (Read) and the zero-copy reader's.
func (c *tcpConn) SetReadDeadline(t time.Time) error {
	c.setReadDeadline(t)
	return c.TCPConn.SetReadDeadline(t)
}

// SetDeadline sets both deadlines, the zero-copy reader's too.
func (c *tcpConn) SetDeadline(t time.Time) error {
	c.setReadDeadline(t)
	return c.TCPConn.SetDeadline(t)
}
