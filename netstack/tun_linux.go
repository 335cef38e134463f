//go:build linux

package netstack

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// CreateTUN creates (or attaches to) the kernel TUN device name with the
// given MTU and queues (0: DefaultTUNQueues). natbox reads and writes it
// itself (see vnetTUN), so a Stack on it takes the kernel's TSO frames as
// one packet each and hands its own large segments back as TSO frames.
// Needs CAP_NET_ADMIN.
func CreateTUN(name string, mtu, queues int) (tun.Device, error) {
	dev, err := createVnetTUN(name, mtu, queues)
	if err != nil {
		return nil, fmt.Errorf("netstack: create tun %q: %w; natbox needs CAP_NET_ADMIN and /dev/net/tun", name, err)
	}
	return dev, nil
}

// DefaultTUNQueues is the number of TUN queues (and input pumps) when the
// config leaves it at 0: one per thread running Go code (GOMAXPROCS, which
// cmd/natbox sets from limits.procs), at most 4 (beyond that the gVisor
// stack behind them, not the reads, is the limit).
func DefaultTUNQueues() int { return min(runtime.GOMAXPROCS(0), 4) }

// MaxTUNQueues bounds the queues a config may ask for (each holds a 64 KiB
// read buffer and a goroutine).
const MaxTUNQueues = 64

// TUN offload flags (linux/if_tun.h), for TUNSETOFFLOAD.
const (
	tunFCsum = 0x01
	tunFTSO4 = 0x02
	tunFTSO6 = 0x04
	tunFUSO4 = 0x20
	tunFUSO6 = 0x40
)

// vnetTUN is a kernel TUN that natbox drives itself: every queue is opened
// with IFF_VNET_HDR, so each read and write carries a virtio-net header
// (vnet.go), and with TSO (and USO where the kernel has it) offloads, so the
// kernel hands over and accepts frames of up to 64 KiB. With several queues
// (IFF_MULTI_QUEUE) the kernel spreads flows over them by hash and the Stack
// runs one input pump per queue.
//
// It implements tun.Device for creation and naming (the appliance sets
// routes by name); its Read and Write are not the data path and refuse: a
// Stack detects the type and uses the queues directly.
type vnetTUN struct {
	name   string
	mtu    int
	uso    bool
	queues []*tunQueue
	events chan tun.Event

	closeOnce sync.Once
	closeErr  error
}

var _ vnetDevice = (*vnetTUN)(nil)

// frameQueues implements vnetDevice.
func (t *vnetTUN) frameQueues() []frameQueue {
	qs := make([]frameQueue, len(t.queues))
	for i, q := range t.queues {
		qs[i] = q
	}
	return qs
}

// tunQueue is one queue's file. read is used by one goroutine at a time
// (its input pump), write by one at a time (the outward queue's busy flag).
type tunQueue struct {
	f  *os.File
	rc syscall.RawConn

	// read's state, shared with doRead (a method value made once: no
	// allocation per read).
	iov      [2]unix.Iovec
	block    bool
	n        uintptr
	errno    syscall.Errno
	readFunc func(fd uintptr) bool

	// write's state, likewise.
	wiov      [maxFrameParts]unix.Iovec
	wn        int
	werrno    syscall.Errno
	writeFunc func(fd uintptr) bool
}

func createVnetTUN(name string, mtu, queues int) (*vnetTUN, error) {
	if queues <= 0 {
		queues = DefaultTUNQueues()
	}
	if queues > MaxTUNQueues {
		return nil, fmt.Errorf("%d queues; use at most %d", queues, MaxTUNQueues)
	}
	t := &vnetTUN{name: name, mtu: mtu, events: make(chan tun.Event, 1)}
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	for i := 0; i < queues; i++ {
		q, uso, err := openTUNQueue(t.name, flags)
		if err != nil {
			t.Close()
			if i > 0 {
				err = fmt.Errorf("queue %d of %d: %w", i+1, queues, err)
			}
			if errors.Is(err, unix.EINVAL) {
				// The kernel refuses to attach with flags other than those
				// a persistent device was created with.
				err = fmt.Errorf("%w (a persistent %q created with other flags? natbox opens it multi_queue when tun.queues > 1, single-queue otherwise: delete it or match tun.queues)", err, name)
			}
			return nil, err
		}
		if i == 0 {
			t.uso = uso
			// The kernel resolves a name pattern ("natbox%d"); the other
			// queues attach to the device it chose.
			name, err := tunName(q.f)
			if err != nil {
				q.f.Close()
				t.Close()
				return nil, err
			}
			t.name = name
		}
		t.queues = append(t.queues, q)
	}
	if err := setMTU(t.name, mtu); err != nil {
		t.Close()
		return nil, err
	}
	t.events <- tun.EventUp
	return t, nil
}

func openTUNQueue(name string, flags uint16) (q *tunQueue, uso bool, err error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, false, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, false, err
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, false, fmt.Errorf("TUNSETIFF: %w", err)
	}
	// USO (kernel 6.2+) lets UDP GSO senders hand over one frame for many
	// datagrams; without it, TSO alone.
	tso := tunFCsum | tunFTSO4 | tunFTSO6
	uso = true
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tso|tunFUSO4|tunFUSO6); err != nil {
		uso = false
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tso); err != nil {
			unix.Close(fd)
			return nil, false, fmt.Errorf("TUNSETOFFLOAD: %w", err)
		}
	}
	// Non-blocking, so reads wait in Go's netpoller and Close ends them.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, false, err
	}
	q = &tunQueue{f: os.NewFile(uintptr(fd), "/dev/net/tun")}
	if q.rc, err = q.f.SyscallConn(); err != nil {
		q.f.Close()
		return nil, false, err
	}
	q.readFunc = q.doRead
	q.writeFunc = q.doWrite
	return q, uso, nil
}

func tunName(f *os.File) (string, error) {
	var ifr *unix.Ifreq
	var err error
	rc, err := f.SyscallConn()
	if err != nil {
		return "", err
	}
	if cerr := rc.Control(func(fd uintptr) {
		ifr, err = unix.NewIfreq("")
		if err == nil {
			err = unix.IoctlIfreq(int(fd), unix.TUNGETIFF, ifr)
		}
	}); cerr != nil {
		return "", cerr
	}
	if err != nil {
		return "", fmt.Errorf("TUNGETIFF: %w", err)
	}
	return ifr.Name(), nil
}

func setMTU(name string, mtu int) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint32(uint32(mtu))
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFMTU, ifr); err != nil {
		return fmt.Errorf("set mtu %d: %w", mtu, err)
	}
	return nil
}

// read reads one frame: its virtio-net header into hdr and its packet into
// buf, returning the packet's length. With block false it returns
// errWouldBlock instead of waiting (the pump flushes GRO first). Any error
// but errWouldBlock and a failed syscall means the queue is closed.
func (q *tunQueue) read(hdr, buf []byte, block bool) (int, error) {
	q.iov[0].Base, q.iov[1].Base = &hdr[0], &buf[0]
	q.iov[0].SetLen(len(hdr))
	q.iov[1].SetLen(len(buf))
	q.block = block
	err := q.rc.Read(q.readFunc)
	q.iov[0].Base, q.iov[1].Base = nil, nil
	if err != nil {
		return 0, os.ErrClosed
	}
	switch {
	case q.errno == unix.EAGAIN:
		return 0, errWouldBlock
	case q.errno != 0:
		return 0, q.errno
	case int(q.n) < len(hdr):
		return 0, fmt.Errorf("short tun read: %d bytes", q.n)
	}
	return int(q.n) - len(hdr), nil
}

// doRead is read's RawConn callback: one readv(2); false asks the netpoller
// to wait for the queue to become readable.
//
// doRead and doWrite use RawSyscall: the queue is non-blocking, so the call
// never waits, and need not give up its P. Through Syscall, Go's sysmon
// hands the P to another thread when a call runs past ~20 us (a TUN write
// carries its packet through the kernel's forwarding and the receiver's
// TCP on this thread), and the goroutine then waits for a P on a third
// thread: thread switches on a path that runs on one P
// (cmd/natbox/runtime.go). netstack/BENCH.md, "Raw system calls on the TUN".
func (q *tunQueue) doRead(fd uintptr) bool {
	n, _, e := unix.RawSyscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&q.iov[0])), uintptr(len(q.iov)))
	if e == unix.EAGAIN && q.block {
		return false
	}
	q.n, q.errno = n, e
	return true
}

// write writes one frame (virtio-net header and packet) gathered from parts
// with one writev(2).
func (q *tunQueue) write(parts [][]byte) error {
	if len(parts) > len(q.wiov) {
		return fmt.Errorf("frame in %d parts; at most %d", len(parts), len(q.wiov))
	}
	q.wn = 0
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		q.wiov[q.wn].Base = &p[0]
		q.wiov[q.wn].SetLen(len(p))
		q.wn++
	}
	err := q.rc.Write(q.writeFunc)
	clear(q.wiov[:q.wn])
	if err != nil {
		return os.ErrClosed
	}
	if q.werrno != 0 {
		return q.werrno
	}
	return nil
}

// doWrite is write's RawConn callback: one writev(2); false waits for the
// queue to become writable.
func (q *tunQueue) doWrite(fd uintptr) bool {
	_, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&q.wiov[0])), uintptr(q.wn))
	if e == unix.EAGAIN {
		return false
	}
	q.werrno = e
	return true
}

// File implements tun.Device: the first queue.
func (t *vnetTUN) File() *os.File { return t.queues[0].f }

// Read implements tun.Device. natbox's Stack reads the queues itself.
func (t *vnetTUN) Read([][]byte, []int, int) (int, error) {
	return 0, errors.New("netstack: a natbox kernel TUN is read by its Stack only")
}

// Write implements tun.Device. natbox's Stack writes the queues itself.
func (t *vnetTUN) Write([][]byte, int) (int, error) {
	return 0, errors.New("netstack: a natbox kernel TUN is written by its Stack only")
}

// MTU implements tun.Device.
func (t *vnetTUN) MTU() (int, error) { return t.mtu, nil }

// Name implements tun.Device.
func (t *vnetTUN) Name() (string, error) { return t.name, nil }

// Events implements tun.Device: EventUp once, closed by Close.
func (t *vnetTUN) Events() <-chan tun.Event { return t.events }

// BatchSize implements tun.Device.
func (t *vnetTUN) BatchSize() int { return 1 }

// Close implements tun.Device: closes every queue, which ends their reads.
// Idempotent.
func (t *vnetTUN) Close() error {
	t.closeOnce.Do(func() {
		var errs []error
		for _, q := range t.queues {
			errs = append(errs, q.f.Close())
		}
		t.closeErr = errors.Join(errs...)
		close(t.events)
	})
	return t.closeErr
}
