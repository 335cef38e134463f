// Command tool is the e2e tests' traffic helper: small TCP/UDP servers and
// clients that run inside the tests' network namespaces (ip netns exec), so the
// tests need no external tools. Every subcommand prints one result line on
// stdout and reports through its exit code:
//
//	0 ok, 1 failure, 2 usage, 3 connection refused, 4 timed out.
//
// Servers:
//
//	tool serve [-tcp-echo ADDR]... [-tcp-whoami ADDR]... [-udp-echo ADDR]... [-udp-whoami ADDR]...
//
// tcp-echo streams back what it reads and half-closes after the client's EOF;
// udp-echo returns each datagram. The whoami servers accept an optional PROXY
// protocol header (v1 or v2 for TCP, v2 per datagram for UDP) and answer one
// line: "src=ADDR dst=ADDR proxy=none|v1|v2 peer=ADDR local=ADDR msg=TEXT", where
// src/dst come from the header when there is one and peer/local are the socket's.
// "ready" is printed once every listener is bound; SIGTERM/SIGINT exit 0.
//
// Clients:
//
//	tool tcp-echo    -addr A [-size N] [-n C] [-timeout D]   full-duplex echo of N random bytes, half-close,
//	                                                  compare; C connections one after another
//	tool tcp-whoami  -addr A [-timeout D]             prints the whoami line
//	tool tcp-connect -addr A [-timeout D]             "connected", or exit 3 (refused) / 4 (timeout)
//	tool tcp-hold    -addr A [-ping D] [-timeout D]   connects, prints "connected local=ADDR", holds until EOF or
//	                                                  signal; with -ping, echoes one byte every D and fails on any error
//	tool udp         -addr A -msg M [-lport P] [-n R] [-timeout D] [-retry D]   sends M (resent every -retry),
//	                                                  prints the reply; R rounds from one socket
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	exitOK      = 0
	exitFail    = 1
	exitUsage   = 2
	exitRefused = 3
	exitTimeout = 4
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: tool serve|tcp-echo|tcp-whoami|tcp-connect|tcp-hold|udp [flags]")
		os.Exit(exitUsage)
	}
	cmds := map[string]func([]string) int{
		"serve":       serve,
		"tcp-echo":    tcpEcho,
		"tcp-whoami":  tcpWhoami,
		"tcp-connect": tcpConnect,
		"tcp-hold":    tcpHold,
		"udp":         udpClient,
	}
	run, ok := cmds[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown subcommand %q\n", os.Args[1])
		os.Exit(exitUsage)
	}
	os.Exit(run(os.Args[2:]))
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// ---- servers ----

func serve(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var tcpEchoAddrs, tcpWhoamiAddrs, udpEchoAddrs, udpWhoamiAddrs listFlag
	fs.Var(&tcpEchoAddrs, "tcp-echo", "TCP echo listen address (repeatable)")
	fs.Var(&tcpWhoamiAddrs, "tcp-whoami", "TCP whoami listen address (repeatable)")
	fs.Var(&udpEchoAddrs, "udp-echo", "UDP echo listen address (repeatable)")
	fs.Var(&udpWhoamiAddrs, "udp-whoami", "UDP whoami listen address (repeatable)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	// Each listener kind: its addresses, how to open one, how to serve it.
	kinds := []struct {
		addrs []string
		open  func(a string) (io.Closer, error)
		serve func(io.Closer)
	}{
		{tcpEchoAddrs, listenTCP, func(c io.Closer) { acceptLoop(c.(net.Listener), handleTCPEcho) }},
		{tcpWhoamiAddrs, listenTCP, func(c io.Closer) { acceptLoop(c.(net.Listener), handleTCPWhoami) }},
		{udpEchoAddrs, listenUDP, func(c io.Closer) { udpLoop(c.(*net.UDPConn), false) }},
		{udpWhoamiAddrs, listenUDP, func(c io.Closer) { udpLoop(c.(*net.UDPConn), true) }},
	}
	for _, k := range kinds {
		for _, a := range k.addrs {
			c, err := k.open(a)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return exitFail
			}
			closers = append(closers, c)
			go k.serve(c)
		}
	}
	fmt.Println("ready")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return exitOK
}

func acceptLoop(ln net.Listener, handle func(*net.TCPConn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go handle(c.(*net.TCPConn))
	}
}

func handleTCPEcho(c *net.TCPConn) {
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		fmt.Fprintf(os.Stderr, "tcp-echo %s: %v\n", c.RemoteAddr(), err)
		return
	}
	c.CloseWrite()
}

func handleTCPWhoami(c *net.TCPConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	hdr, err := readProxyHeader(br)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcp-whoami %s: %v\n", c.RemoteAddr(), err)
		return
	}
	line, err := br.ReadString('\n')
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcp-whoami %s: read request: %v\n", c.RemoteAddr(), err)
		return
	}
	fmt.Fprintln(c, whoamiLine(hdr, c.RemoteAddr(), c.LocalAddr(), strings.TrimSpace(line)))
	c.CloseWrite()
}

func udpLoop(pc *net.UDPConn, whoami bool) {
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		reply := buf[:n]
		if whoami {
			hdr, rest, err := parseProxyV2(buf[:n])
			if err != nil {
				fmt.Fprintf(os.Stderr, "udp-whoami %s: %v\n", from, err)
				continue
			}
			reply = []byte(whoamiLine(hdr, net.UDPAddrFromAddrPort(from), pc.LocalAddr(), string(rest)))
		}
		if _, err := pc.WriteToUDPAddrPort(reply, from); err != nil {
			fmt.Fprintf(os.Stderr, "udp reply to %s: %v\n", from, err)
		}
	}
}

// proxyHeader is what a PROXY protocol header said; zero Version means none.
type proxyHeader struct {
	Version  int
	Src, Dst netip.AddrPort
}

func whoamiLine(h proxyHeader, peer, local net.Addr, msg string) string {
	src, dst, proxy := peer.String(), local.String(), "none"
	if h.Version != 0 {
		src, dst, proxy = h.Src.String(), h.Dst.String(), "v"+strconv.Itoa(h.Version)
	}
	return fmt.Sprintf("src=%s dst=%s proxy=%s peer=%s local=%s msg=%s", src, dst, proxy, peer, local, msg)
}

var proxyV2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// readProxyHeader consumes a PROXY v1 or v2 header if the stream starts with one.
// The client always sends at least a short request line, so peeking 5 bytes
// cannot block on a silent client forever (and the conn has a deadline).
func readProxyHeader(br *bufio.Reader) (proxyHeader, error) {
	head, err := br.Peek(5)
	if err != nil {
		return proxyHeader{}, fmt.Errorf("peek: %w", err)
	}
	switch {
	case bytes.Equal(head, proxyV2Sig[:5]):
		fixed := make([]byte, 16)
		if _, err := io.ReadFull(br, fixed); err != nil {
			return proxyHeader{}, fmt.Errorf("read proxy v2 header: %w", err)
		}
		n := int(binary.BigEndian.Uint16(fixed[14:16]))
		full := make([]byte, 16+n)
		copy(full, fixed)
		if _, err := io.ReadFull(br, full[16:]); err != nil {
			return proxyHeader{}, fmt.Errorf("read proxy v2 addresses: %w", err)
		}
		h, _, err := parseProxyV2(full)
		return h, err
	case string(head) == "PROXY":
		line, err := br.ReadString('\n')
		if err != nil {
			return proxyHeader{}, fmt.Errorf("read proxy v1 line: %w", err)
		}
		return parseProxyV1(line)
	}
	return proxyHeader{}, nil
}

// parseProxyV1 parses "PROXY TCP4 SRC DST SPORT DPORT\r\n".
func parseProxyV1(line string) (proxyHeader, error) {
	f := strings.Fields(line)
	if len(f) != 6 || f[0] != "PROXY" || (f[1] != "TCP4" && f[1] != "TCP6") {
		return proxyHeader{}, fmt.Errorf("bad proxy v1 line %q", line)
	}
	src, err1 := netip.ParseAddr(f[2])
	dst, err2 := netip.ParseAddr(f[3])
	sp, err3 := strconv.ParseUint(f[4], 10, 16)
	dp, err4 := strconv.ParseUint(f[5], 10, 16)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return proxyHeader{}, fmt.Errorf("bad proxy v1 line %q: %w", line, err)
	}
	return proxyHeader{Version: 1, Src: netip.AddrPortFrom(src, uint16(sp)), Dst: netip.AddrPortFrom(dst, uint16(dp))}, nil
}

// parseProxyV2 parses a PROXY v2 header at the start of b if there is one and
// returns it with the bytes that follow it. b without the signature is returned
// whole with a zero header.
func parseProxyV2(b []byte) (proxyHeader, []byte, error) {
	if !bytes.HasPrefix(b, proxyV2Sig) {
		return proxyHeader{}, b, nil
	}
	if len(b) < 16 {
		return proxyHeader{}, nil, errors.New("short proxy v2 header")
	}
	verCmd, fam := b[12], b[13]
	n := int(binary.BigEndian.Uint16(b[14:16]))
	if len(b) < 16+n {
		return proxyHeader{}, nil, fmt.Errorf("proxy v2 header says %d address bytes, have %d", n, len(b)-16)
	}
	addrs, rest := b[16:16+n], b[16+n:]
	if verCmd>>4 != 2 {
		return proxyHeader{}, nil, fmt.Errorf("proxy v2 version byte %#x", verCmd)
	}
	if verCmd&0xf == 0 { // LOCAL: no addresses
		return proxyHeader{Version: 2}, rest, nil
	}
	var alen int
	switch fam >> 4 {
	case 1:
		alen = 4
	case 2:
		alen = 16
	default:
		return proxyHeader{}, nil, fmt.Errorf("proxy v2 family %#x not supported", fam)
	}
	if len(addrs) < 2*alen+4 {
		return proxyHeader{}, nil, fmt.Errorf("proxy v2 address block too short: %d bytes", len(addrs))
	}
	src, _ := netip.AddrFromSlice(addrs[:alen])
	dst, _ := netip.AddrFromSlice(addrs[alen : 2*alen])
	sp := binary.BigEndian.Uint16(addrs[2*alen:])
	dp := binary.BigEndian.Uint16(addrs[2*alen+2:])
	return proxyHeader{Version: 2, Src: netip.AddrPortFrom(src, sp), Dst: netip.AddrPortFrom(dst, dp)}, rest, nil
}

// ---- clients ----

type clientFlags struct {
	fs      *flag.FlagSet
	addr    *string
	timeout *time.Duration
}

func newClientFlags(name string) clientFlags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	return clientFlags{
		fs:      fs,
		addr:    fs.String("addr", "", "server address host:port"),
		timeout: fs.Duration("timeout", 10*time.Second, "overall deadline"),
	}
}

// dialExit classifies a dial error into an exit code and prints it.
func dialExit(err error, start time.Time) int {
	elapsed := time.Since(start).Round(time.Millisecond)
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		fmt.Printf("refused after %v\n", elapsed)
		return exitRefused
	case errors.As(err, &ne) && ne.Timeout():
		fmt.Printf("timeout after %v\n", elapsed)
		return exitTimeout
	}
	fmt.Printf("error after %v: %v\n", elapsed, err)
	return exitFail
}

func dialTCP(cf clientFlags) (*net.TCPConn, time.Time, int) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", *cf.addr, *cf.timeout)
	if err != nil {
		return nil, start, dialExit(err, start)
	}
	c.SetDeadline(start.Add(*cf.timeout))
	return c.(*net.TCPConn), start, exitOK
}

// ioExit classifies an error after the connection was established.
func ioExit(what string, err error) int {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		fmt.Printf("reset during %s: %v\n", what, err)
		return exitRefused
	case errors.As(err, &ne) && ne.Timeout():
		fmt.Printf("timeout during %s\n", what)
		return exitTimeout
	}
	fmt.Printf("error during %s: %v\n", what, err)
	return exitFail
}

func tcpEcho(args []string) int {
	cf := newClientFlags("tcp-echo")
	size := cf.fs.Int("size", 1<<20, "bytes to send")
	count := cf.fs.Int("n", 1, "connections, one after another, each with its own payload")
	if cf.fs.Parse(args) != nil {
		return exitUsage
	}
	for i := range *count {
		n, code := echoOnce(cf, *size)
		if code != exitOK {
			fmt.Printf("connection %d of %d failed\n", i+1, *count)
			return code
		}
		if i == *count-1 {
			fmt.Printf("ok bytes=%d connections=%d\n", n, *count)
		}
	}
	return exitOK
}

// echoOnce sends size random bytes over one connection, half-closes, and
// checks that exactly the same bytes come back before the server's FIN.
func echoOnce(cf clientFlags, size int) (int64, int) {
	c, _, code := dialTCP(cf)
	if code != exitOK {
		return 0, code
	}
	defer c.Close()
	payload := make([]byte, size)
	rand.Read(payload)
	want := sha256.Sum256(payload)

	// Write and read at once so a large payload cannot deadlock on full buffers;
	// only the server's half-close after our CloseWrite ends the read.
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, werr = c.Write(payload); werr == nil {
			werr = c.CloseWrite()
		}
	}()
	h := sha256.New()
	n, rerr := io.Copy(h, c)
	wg.Wait()
	if werr != nil {
		return n, ioExit("write", werr)
	}
	if rerr != nil {
		return n, ioExit("read", rerr)
	}
	if n != int64(size) || !bytes.Equal(h.Sum(nil), want[:]) {
		fmt.Printf("mismatch: sent %d bytes, got %d back (checksum equal: %v)\n", size, n, bytes.Equal(h.Sum(nil), want[:]))
		return n, exitFail
	}
	return n, exitOK
}

func tcpWhoami(args []string) int {
	cf := newClientFlags("tcp-whoami")
	if cf.fs.Parse(args) != nil {
		return exitUsage
	}
	c, _, code := dialTCP(cf)
	if code != exitOK {
		return code
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "whoami from %s\n", c.LocalAddr()); err != nil {
		return ioExit("write", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return ioExit("read", err)
	}
	fmt.Print(line)
	return exitOK
}

func tcpConnect(args []string) int {
	cf := newClientFlags("tcp-connect")
	if cf.fs.Parse(args) != nil {
		return exitUsage
	}
	c, start, code := dialTCP(cf)
	if code != exitOK {
		return code
	}
	c.Close()
	fmt.Printf("connected after %v\n", time.Since(start).Round(time.Millisecond))
	return exitOK
}

func tcpHold(args []string) int {
	cf := newClientFlags("tcp-hold")
	ping := cf.fs.Duration("ping", 0, "against an echo server: send a byte and await it back this often; any failure exits non-zero")
	if cf.fs.Parse(args) != nil {
		return exitUsage
	}
	c, _, code := dialTCP(cf)
	if code != exitOK {
		return code
	}
	defer c.Close()
	c.SetDeadline(time.Time{})
	fmt.Printf("connected local=%s\n", c.LocalAddr())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *ping <= 0 {
		go func() { <-ctx.Done(); c.Close() }()
		io.Copy(io.Discard, c)
		fmt.Println("closed")
		return exitOK
	}
	tick := time.NewTicker(*ping)
	defer tick.Stop()
	one := make([]byte, 1)
	for pings := 0; ; pings++ {
		select {
		case <-ctx.Done():
			fmt.Printf("ok pings=%d\n", pings)
			return exitOK
		case <-tick.C:
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte{'p'}); err != nil {
			return ioExit(fmt.Sprintf("write of ping %d", pings), err)
		}
		if _, err := io.ReadFull(c, one); err != nil {
			return ioExit(fmt.Sprintf("read of ping %d", pings), err)
		}
	}
}

func udpClient(args []string) int {
	cf := newClientFlags("udp")
	msg := cf.fs.String("msg", "ping", "datagram payload")
	lport := cf.fs.Int("lport", 0, "local port to send from (0: ephemeral)")
	retry := cf.fs.Duration("retry", 250*time.Millisecond, "resend interval until a reply arrives")
	rounds := cf.fs.Int("n", 1, "request/reply rounds from the same socket, one reply line each")
	if cf.fs.Parse(args) != nil {
		return exitUsage
	}
	raddr, err := net.ResolveUDPAddr("udp", *cf.addr)
	if err != nil {
		fmt.Println(err)
		return exitUsage
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{Port: *lport})
	if err != nil {
		fmt.Printf("listen: %v\n", err)
		return exitFail
	}
	defer pc.Close()
	deadline := time.Now().Add(*cf.timeout)
	for range *rounds {
		if code := udpExchange(pc, raddr, []byte(*msg), *retry, deadline); code != exitOK {
			return code
		}
	}
	return exitOK
}

// udpExchange sends msg, resending every retry, until a reply arrives from
// raddr or the deadline passes, and prints the reply.
func udpExchange(pc *net.UDPConn, raddr *net.UDPAddr, msg []byte, retry time.Duration, deadline time.Time) int {
	buf := make([]byte, 65536)
	for time.Now().Before(deadline) {
		if _, err := pc.WriteToUDP(msg, raddr); err != nil {
			// ICMP errors surface on the next call; keep trying until the deadline.
			fmt.Fprintf(os.Stderr, "send: %v\n", err)
		}
		pc.SetReadDeadline(minTime(deadline, time.Now().Add(retry)))
		n, from, err := pc.ReadFromUDP(buf)
		if err == nil {
			if from.Port != raddr.Port || !from.IP.Equal(raddr.IP) {
				fmt.Printf("reply from unexpected address %s: %q\n", from, buf[:n])
				return exitFail
			}
			fmt.Printf("%s\n", buf[:n])
			return exitOK
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			fmt.Fprintf(os.Stderr, "recv: %v\n", err)
			time.Sleep(minDur(retry, time.Until(deadline)))
		}
	}
	fmt.Println("timeout: no reply")
	return exitTimeout
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func minDur(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

func listenTCP(a string) (io.Closer, error) { return net.Listen("tcp", a) }

func listenUDP(a string) (io.Closer, error) {
	pc, err := net.ListenPacket("udp", a)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}
