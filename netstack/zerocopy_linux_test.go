package netstack

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
)

// zeroCopySplice moves c to k and k to c with WriteToSocket and
// ReadFromSocket (a buffered read where ReadFromSocket leaves one), passing
// EOFs on as half-closes, the way forwarder/splice.go does; it reports the
// bytes ReadFromSocket moved.
func zeroCopySplice(t *testing.T, c *tcpConn, k *net.TCPConn) (fromSocket int64) {
	rc, err := k.SyscallConn()
	if err != nil {
		t.Errorf("syscall conn: %v", err)
		return 0
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			_, rerr, werr := c.WriteToSocket(rc)
			if werr != nil {
				t.Errorf("to socket: write: %v", werr)
				return
			}
			if rerr == io.EOF {
				k.CloseWrite()
				return
			}
			if rerr != nil {
				t.Errorf("to socket: read: %v", rerr)
				return
			}
		}
	}()
	buf := make([]byte, 4<<10)
	backlog := false
	for {
		var n int
		var rerr, werr error
		if backlog {
			n, rerr, werr = c.ReadFromSocket(rc)
			fromSocket += int64(n)
			backlog = n > 0
		}
		if !backlog {
			n, rerr = k.Read(buf)
			if n > 0 {
				_, werr = c.Write(buf[:n])
			}
			backlog = n == len(buf)
		}
		if werr != nil {
			t.Errorf("from socket: write: %v", werr)
			break
		}
		if rerr == io.EOF {
			c.CloseWrite()
			break
		}
		if rerr != nil {
			t.Errorf("from socket: read: %v", rerr)
			break
		}
	}
	wg.Wait()
	return fromSocket
}

// TestZeroCopyEcho streams 16 MiB through a stack conn whose server side
// is spliced to a kernel echo socket with the zero-copy paths, over a
// 1500-byte link (segments gathered into one write) and a 32000-byte one
// (segments written as they are), and checks every byte came back.
func TestZeroCopyEcho(t *testing.T) {
	for _, mtu := range []int{1500, 32000} {
		t.Run("mtu="+strconv.Itoa(mtu), func(t *testing.T) {
			echoAddr := loopbackServer(t, echo)
			moved := make(chan int64, 1)
			client, _ := newPairMTU(t, mtu, Config{}, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
				k, err := net.Dial("tcp", echoAddr)
				if err != nil {
					r.Reject()
					return
				}
				defer k.Close()
				c, err := r.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				moved <- zeroCopySplice(t, c.(*tcpConn), k.(*net.TCPConn))
			}})
			c, err := client.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:7"))
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			const size = 16 << 20
			sent := make(chan []byte, 1)
			go func() { sent <- sendRandom(t, c, size, byte(mtu)) }()
			got := sha256.New()
			n, err := io.Copy(got, c)
			if err != nil || n != size {
				t.Fatalf("echoed %d of %d bytes: %v", n, size, err)
			}
			if !bytes.Equal(<-sent, got.Sum(nil)) {
				t.Fatal("sha-256 of the echoed stream differs from what was sent")
			}
			if m := <-moved; m == 0 {
				t.Error("ReadFromSocket moved nothing: the echo's backlog went through the buffered path only")
			}
		})
	}
}

// zeroCopyConn is a stack conn (server side) with its client, and a
// kernel socket pair (k, and its peer).
func zeroCopyConn(t *testing.T) (c *tcpConn, client net.Conn, k, peer *net.TCPConn) {
	t.Helper()
	conns := make(chan *tcpConn, 1)
	cl, _ := newPair(t, funcHandler{}, funcHandler{tcp: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		conns <- c.(*tcpConn)
	}})
	client, err := cl.DialTCP(testContext(t), netip.AddrPort{}, netip.MustParseAddrPort("10.0.0.2:7"))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c = <-conns
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	k, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	if peer, err = ln.AcceptTCP(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); c.Close(); k.Close(); peer.Close() })
	return c, client, k, peer
}

func rawConn(t *testing.T, k *net.TCPConn) syscall.RawConn {
	t.Helper()
	rc, err := k.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// TestZeroCopyReadDeadline: WriteToSocket waits for data until the read
// deadline, takes a deadline set while it waits, and then moves data and
// the EOF.
func TestZeroCopyReadDeadline(t *testing.T) {
	c, client, k, peer := zeroCopyConn(t)
	rc := rawConn(t, k)

	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, rerr, werr := c.WriteToSocket(rc)
	if !errors.Is(rerr, os.ErrDeadlineExceeded) || werr != nil || time.Since(start) < 40*time.Millisecond {
		t.Fatalf("WriteToSocket with no data = %v, %v after %v; want a deadline error after 50 ms", rerr, werr, time.Since(start))
	}

	// A deadline set while it waits takes effect at once.
	c.SetReadDeadline(time.Now().Add(time.Minute))
	go func() {
		time.Sleep(50 * time.Millisecond)
		c.SetReadDeadline(time.Now())
	}()
	start = time.Now()
	if _, rerr, _ = c.WriteToSocket(rc); !errors.Is(rerr, os.ErrDeadlineExceeded) || time.Since(start) > 10*time.Second {
		t.Fatalf("WriteToSocket after the deadline moved to now = %v after %v; want a deadline error", rerr, time.Since(start))
	}

	c.SetReadDeadline(time.Time{})
	msg := []byte("after the deadlines")
	client.Write(msg)
	client.(closeWriter).CloseWrite()
	var moved int
	for {
		n, rerr, werr := c.WriteToSocket(rc)
		moved += n
		if werr != nil {
			t.Fatalf("write: %v", werr)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			t.Fatalf("read: %v", rerr)
		}
	}
	k.CloseWrite()
	got, _ := io.ReadAll(peer)
	if moved != len(msg) || !bytes.Equal(got, msg) {
		t.Fatalf("moved %d bytes, the socket's peer read %q; want %q", moved, got, msg)
	}
}

// TestZeroCopyCloseUnblocks: closing the stack conn ends a WriteToSocket
// waiting for data and a ReadFromSocket waiting for room in the send
// buffer (its client reads nothing).
func TestZeroCopyCloseUnblocks(t *testing.T) {
	c, client, k, peer := zeroCopyConn(t)
	rc := rawConn(t, k)
	toSocket := make(chan error, 1)
	go func() {
		_, rerr, werr := c.WriteToSocket(rc)
		toSocket <- errors.Join(rerr, werr)
	}()
	// A 4 KiB send buffer and a client that reads nothing, and a socket
	// backlog of more: ReadFromSocket fills the buffer and waits for room.
	c.ep.SocketOptions().SetSendBufferSize(4<<10, true)
	client.(*tcpConn).ep.SocketOptions().SetReceiveBufferSize(4<<10, true)
	go peer.Write(make([]byte, 64<<10))
	fromSocket := make(chan error, 1)
	go func() {
		for {
			n, rerr, werr := c.ReadFromSocket(rc)
			if rerr != nil || werr != nil {
				fromSocket <- errors.Join(rerr, werr)
				return
			}
			if n == 0 {
				time.Sleep(time.Millisecond) // the peer's write is on its way
			}
		}
	}()
	// Both wait: no data from the client, no room towards it.
	waitBlocked(t, "waitReadable", "waitWritable")
	c.Close()
	for name, ch := range map[string]chan error{"WriteToSocket": toSocket, "ReadFromSocket": fromSocket} {
		select {
		case err := <-ch:
			if err == nil {
				t.Errorf("%s after Close: no error", name)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still waits 10 s after Close", name)
		}
	}
}

// TestZeroCopyFullSocketKeepsBytesInEndpoint: with the socket full, the
// bytes it did not take stay in the endpoint's receive buffer (the
// budget's), none in a buffer of WriteToSocket's: the endpoint's queue and
// the kernel's queues together hold every byte the client sent.
func TestZeroCopyFullSocketKeepsBytesInEndpoint(t *testing.T) {
	c, client, k, peer := zeroCopyConn(t)
	k.SetWriteBuffer(16 << 10)
	peer.SetReadBuffer(16 << 10)
	rc := rawConn(t, k)
	go func() {
		for {
			if _, rerr, werr := c.WriteToSocket(rc); rerr != nil || werr != nil {
				return
			}
		}
	}()
	// Small writes: segments under zeroCopyMinView, the gathered path.
	const total = 512 << 10
	msg := make([]byte, 1000)
	go func() {
		for sent := 0; sent < total; sent += len(msg) {
			if _, err := client.Write(msg[:min(len(msg), total-sent)]); err != nil {
				return
			}
		}
	}()
	queued := func(fd int, req uint) int {
		n, _ := unix.IoctlGetInt(fd, req)
		return n
	}
	var inEndpoint, inSocket, atPeer int
	for deadline := time.Now().Add(10 * time.Second); ; {
		q, _ := c.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
		inEndpoint = q
		rc.Control(func(fd uintptr) { inSocket = queued(int(fd), unix.SIOCOUTQ) })
		prc := rawConn(t, peer)
		prc.Control(func(fd uintptr) { atPeer = queued(int(fd), unix.SIOCINQ) })
		if inEndpoint+inSocket+atPeer == total && inEndpoint > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("endpoint %d + socket %d + its peer %d bytes = %d, want all %d sent (and some left in the endpoint)",
				inEndpoint, inSocket, atPeer, inEndpoint+inSocket+atPeer, total)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("endpoint %d, socket %d, its peer %d bytes", inEndpoint, inSocket, atPeer)
}
