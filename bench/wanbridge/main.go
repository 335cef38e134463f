//go:build linux

// wanbridge: a bounded userspace delay line between two network interfaces, for benchmarks that
// need a WAN-like round-trip time where the kernel has no netem qdisc.
//
//	wanbridge -a m0 -b m1 -delay 15ms [-loss 0.001] [-duration 10m]
//
// Every frame that arrives on -a leaves on -b after -delay, and the other way round, so two
// namespaces joined through it share one Ethernet segment with 2×delay added to every round trip.
// It reads and writes whole frames with AF_PACKET sockets: turn GRO/GSO/TSO off on the four veth
// ends (ethtool -K IF gro off gso off tso off), or frames larger than the MTU are dropped and
// counted. -loss drops that fraction of frames at random in each direction (counted as "lost"),
// as a real path does, so that congestion control can be compared. It stops by itself after
// -duration (capped at 1 h) or on SIGINT/SIGTERM and prints one JSON line of counters per
// direction (rx_dropped: frames the kernel dropped before wanbridge read them, a line that fell
// behind; it should stay 0). Run it only inside namespaces you created.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const ethPAll = 0x0003

func htons(v uint16) uint16 { return v<<8 | v>>8 }

type frame struct {
	due  time.Time
	data []byte
}

type counters struct {
	Frames, Bytes, Oversize, QueueFull, WriteErrors, Lost atomic.Uint64
}

type port struct {
	name  string
	fd    int
	index int
	mtu   int
}

func openPort(name string) (*port, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return nil, err
	}
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(ethPAll)))
	if err != nil {
		return nil, fmt.Errorf("AF_PACKET socket: %w", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(ethPAll), Ifindex: ifi.Index}); err != nil {
		return nil, fmt.Errorf("bind %s: %w", name, err)
	}
	// Promiscuous: frames addressed to the far side's MAC must reach this socket too.
	mreq := unix.PacketMreq{Ifindex: int32(ifi.Index), Type: unix.PACKET_MR_PROMISC}
	if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
		return nil, fmt.Errorf("promiscuous %s: %w", name, err)
	}
	// FORCE (root) past net.core.rmem_max: at the default 208 KiB a descheduled reader let the
	// kernel drop frames of a fast flow, and a "clean" line lost them unseen (rx_dropped now).
	for _, o := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
		if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, o[0], 8<<20) != nil {
			_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, o[1], 8<<20)
		}
	}
	return &port{name: name, fd: fd, index: ifi.Index, mtu: ifi.MTU}, nil
}

// pump moves frames from src to dst, each held until delay after it arrived.
// A fraction loss of them is dropped at random instead.
func pump(src, dst *port, delay time.Duration, queue int, loss float64, c *counters) {
	q := make(chan frame, queue)
	go func() {
		to := &syscall.SockaddrLinklayer{Protocol: htons(ethPAll), Ifindex: dst.index}
		for f := range q {
			if d := time.Until(f.due); d > 0 {
				time.Sleep(d)
			}
			if err := syscall.Sendto(dst.fd, f.data, 0, to); err != nil {
				c.WriteErrors.Add(1)
			}
		}
	}()
	buf := make([]byte, 65536)
	for {
		n, from, err := syscall.Recvfrom(src.fd, buf, 0)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			return
		}
		if ll, ok := from.(*syscall.SockaddrLinklayer); ok && ll.Pkttype == 4 /* PACKET_OUTGOING */ {
			continue // our own writes on this port
		}
		if n > dst.mtu+18 {
			c.Oversize.Add(1)
			continue
		}
		if loss > 0 && rand.Float64() < loss {
			c.Lost.Add(1)
			continue
		}
		f := frame{due: time.Now().Add(delay), data: append([]byte(nil), buf[:n]...)}
		select {
		case q <- f:
			c.Frames.Add(1)
			c.Bytes.Add(uint64(n))
		default:
			c.QueueFull.Add(1)
		}
	}
}

func main() {
	a := flag.String("a", "", "first interface")
	b := flag.String("b", "", "second interface")
	delay := flag.Duration("delay", 10*time.Millisecond, "one-way delay added in each direction")
	dur := flag.Duration("duration", 10*time.Minute, "stop after this long (at most 1h)")
	queue := flag.Int("queue", 65536, "frames held per direction before new ones are dropped")
	loss := flag.Float64("loss", 0, "fraction of frames dropped at random in each direction (0.001 = 0.1 %)")
	flag.Parse()
	if *a == "" || *b == "" {
		fmt.Fprintln(os.Stderr, "usage: wanbridge -a IF -b IF -delay 15ms [-loss 0.001] [-duration 10m]")
		os.Exit(2)
	}
	if *loss < 0 || *loss >= 1 {
		fmt.Fprintln(os.Stderr, "wanbridge: -loss is a fraction in [0, 1), e.g. 0.001 for 0.1 %")
		os.Exit(2)
	}
	if *dur <= 0 || *dur > time.Hour {
		*dur = time.Hour
	}
	pa, err := openPort(*a)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanbridge:", err)
		os.Exit(1)
	}
	pb, err := openPort(*b)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanbridge:", err)
		os.Exit(1)
	}
	var ab, ba counters
	go pump(pa, pb, *delay, *queue, *loss, &ab)
	go pump(pb, pa, *delay, *queue, *loss, &ba)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-sig:
	case <-time.After(*dur):
	}
	out := func(src *port, c *counters) map[string]uint64 {
		m := map[string]uint64{"frames": c.Frames.Load(), "bytes": c.Bytes.Load(), "oversize": c.Oversize.Load(),
			"queue_full": c.QueueFull.Load(), "write_errors": c.WriteErrors.Load(), "lost": c.Lost.Load()}
		// Frames the kernel dropped at src's socket before they were read: losses of the
		// line that neither -loss nor the queue chose.
		if st, err := unix.GetsockoptTpacketStats(src.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
			m["rx_dropped"] = uint64(st.Drops)
		}
		return m
	}
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"delay": delay.String(), "loss": *loss, *a + "->" + *b: out(pa, &ab), *b + "->" + *a: out(pb, &ba)})
}
