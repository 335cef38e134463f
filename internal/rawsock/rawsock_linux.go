package rawsock

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read is one read(2) of the non-blocking socket fd, retried on EINTR. It
// returns the errno as the error (unix.EAGAIN when nothing is queued).
func Read(fd int, p []byte) (int, error) { return readWrite(unix.SYS_READ, fd, p) }

// Write is one write(2) to the non-blocking socket fd, retried on EINTR;
// it may write less than p (a full socket), and returns the errno as the
// error (unix.EAGAIN when nothing fit).
func Write(fd int, p []byte) (int, error) { return readWrite(unix.SYS_WRITE, fd, p) }

// readWrite is one raw read(2) or write(2) (trap) of p on fd.
func readWrite(trap uintptr, fd int, p []byte) (int, error) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	n, e := call(trap, uintptr(fd), uintptr(ptr), uintptr(len(p)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// call is one raw system call, made again while a signal interrupts it
// (EINTR): every call of the package goes through it.
func call(trap, a1, a2, a3, a4, a5, a6 uintptr) (uintptr, unix.Errno) {
	for {
		n, _, e := unix.RawSyscall6(trap, a1, a2, a3, a4, a5, a6)
		if e != unix.EINTR {
			return n, e
		}
	}
}

// InQueue is the number of bytes the socket fd has received and not yet
// been read (ioctl SIOCINQ).
func InQueue(fd int) (int, error) {
	var v int32
	_, e := call(unix.SYS_IOCTL, uintptr(fd), unix.SIOCINQ, uintptr(unsafe.Pointer(&v)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(v), nil
}

// Reader reads a kernel socket with raw read(2)s, waiting in the
// netpoller and honouring the conn's read deadline, as its own Read does.
// One goroutine reads at a time.
type Reader struct {
	c    net.Conn
	rc   syscall.RawConn
	p    []byte
	n    int
	err  error
	read func(fd uintptr) bool // r.step, bound once: a call allocates nothing
}

// NewReader is a Reader of c, or nil when c is not a kernel socket.
func NewReader(c net.Conn) *Reader {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	r := &Reader{c: c, rc: rc}
	r.read = r.step
	return r
}

// Read reads what the socket holds, up to len(p), waiting until it holds
// something; io.EOF after the peer's FIN. Errors read as the conn's own
// Read would put them (a *net.OpError "read"; a deadline's is a timeout).
func (r *Reader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r.p, r.n, r.err = p, 0, nil
	err := asOp(r.rc.Read(r.read), "read")
	r.p = nil
	switch {
	case err != nil:
		return 0, err
	case r.err != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: r.c.LocalAddr(), Addr: r.c.RemoteAddr(), Err: os.NewSyscallError("read", r.err)}
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

// step is Read's RawConn callback: false asks the netpoller to wait for
// the socket to become readable.
func (r *Reader) step(fd uintptr) bool {
	r.n, r.err = Read(int(fd), r.p)
	return r.err != unix.EAGAIN
}

// asOp names a RawConn error (a deadline, a closed conn) after the call it
// stands for, as the conn's own Read or Write would: the net package says
// "raw-read" and "raw-write".
func asOp(err error, op string) error {
	if oe, ok := err.(*net.OpError); ok {
		oe.Op = op
	}
	return err
}
