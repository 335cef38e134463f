package main

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/ipv4"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// parsed is a packet taken apart by code that shares nothing with the
// builders but the RFCs.
type parsed struct {
	ip      *ipv4.Header
	l4      []byte
	srcPort uint16
	dstPort uint16
}

func parse(t *testing.T, b []byte) parsed {
	t.Helper()
	h, err := ipv4.ParseHeader(b)
	if err != nil {
		t.Fatalf("ipv4.ParseHeader: %v", err)
	}
	if h.Version != 4 || h.Len != 20 || h.TotalLen != len(b) || h.TTL == 0 {
		t.Fatalf("IPv4 header %+v for %d bytes", h, len(b))
	}
	if onesSum(b[:20]) != 0xffff {
		t.Fatalf("IPv4 header checksum %#04x does not verify", h.Checksum)
	}
	l4 := b[20:]
	return parsed{ip: h, l4: l4, srcPort: binary.BigEndian.Uint16(l4), dstPort: binary.BigEndian.Uint16(l4[2:])}
}

// onesSum is the folded one's-complement sum of b (0xffff when a checksum
// over b verifies).
func onesSum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

// l4Verifies checks a TCP or UDP checksum over the pseudo header.
func l4Verifies(p parsed) bool {
	ph := make([]byte, 0, 12+len(p.l4))
	ph = append(ph, p.ip.Src.To4()...)
	ph = append(ph, p.ip.Dst.To4()...)
	ph = append(ph, 0, byte(p.ip.Protocol))
	ph = binary.BigEndian.AppendUint16(ph, uint16(len(p.l4)))
	return onesSum(append(ph, p.l4...)) == 0xffff
}

func addrOf(t *testing.T, ip []byte) netip.Addr {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		t.Fatalf("bad address %v", ip)
	}
	return a.Unmap()
}

func TestBuildSYN(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	sp := &spoofer{prefix: netip.MustParsePrefix("198.18.128.0/17"), rng: rng}
	dst := netip.MustParseAddrPort("198.19.0.1:8083")
	buf := make([]byte, 0, 64)
	for range 1000 {
		src := netip.AddrPortFrom(sp.addr(), sp.port())
		seq := rng.Uint32()
		b := buildSYN(buf, src, dst, seq, uint16(rng.Uint32()))
		p := parse(t, b)
		if p.ip.Protocol != protoTCP || p.ip.Flags != ipv4.DontFragment {
			t.Fatalf("protocol %d flags %v", p.ip.Protocol, p.ip.Flags)
		}
		if got := addrOf(t, p.ip.Src); got != src.Addr() || !sp.prefix.Contains(got) {
			t.Fatalf("source %v, want %v inside %v", got, src.Addr(), sp.prefix)
		}
		if got := addrOf(t, p.ip.Dst); got != dst.Addr() {
			t.Fatalf("destination %v, want %v", got, dst.Addr())
		}
		if p.srcPort != src.Port() || p.dstPort != 8083 || p.srcPort < 1024 {
			t.Fatalf("ports %d -> %d, want %d -> 8083", p.srcPort, p.dstPort, src.Port())
		}
		if got := binary.BigEndian.Uint32(p.l4[4:]); got != seq {
			t.Fatalf("seq %d, want %d", got, seq)
		}
		if off := int(p.l4[12]>>4) * 4; off != len(p.l4) || p.l4[13] != 0x02 {
			t.Fatalf("data offset %d of %d bytes, flags %#02x: want a bare SYN", off, len(p.l4), p.l4[13])
		}
		if !l4Verifies(p) {
			t.Fatalf("TCP checksum does not verify: % x", b)
		}
		if mss := binary.BigEndian.Uint16(p.l4[22:]); p.l4[20] != 2 || mss != 1460 {
			t.Fatalf("first option kind %d MSS %d, want MSS 1460", p.l4[20], mss)
		}
	}
}

func TestBuildUDP(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(3, 4))
	sp := &spoofer{prefix: netip.MustParsePrefix("192.0.2.0/24"), rng: rng}
	dst := netip.MustParseAddrPort("198.18.0.1:8084")
	for _, size := range []int{0, 1, 63, 64, 1400} {
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = byte(rng.Uint32())
		}
		src := netip.AddrPortFrom(sp.addr(), sp.port())
		b := buildUDP(nil, src, dst, payload, 7)
		p := parse(t, b)
		if p.ip.Protocol != protoUDP || p.ip.ID != 7 {
			t.Fatalf("protocol %d id %d", p.ip.Protocol, p.ip.ID)
		}
		if got := int(binary.BigEndian.Uint16(p.l4[4:])); got != 8+size || len(p.l4) != 8+size {
			t.Fatalf("UDP length %d, %d bytes after the IP header; want %d", got, len(p.l4), 8+size)
		}
		if binary.BigEndian.Uint16(p.l4[6:]) == 0 || !l4Verifies(p) {
			t.Fatalf("size %d: UDP checksum does not verify: % x", size, b)
		}
		if string(p.l4[8:]) != string(payload) || p.srcPort != src.Port() || p.dstPort != 8084 {
			t.Fatalf("size %d: payload or ports changed", size)
		}
	}
}

func TestSpooferStaysInPrefix(t *testing.T) {
	t.Parallel()
	tests := []struct {
		prefix string
		want   int // distinct addresses possible
	}{
		{"198.51.100.0/30", 2}, // .1 and .2: not the network or broadcast address
		{"198.51.100.7/32", 1},
		{"198.51.100.4/31", 2},
	}
	for _, tt := range tests {
		t.Run(tt.prefix, func(t *testing.T) {
			t.Parallel()
			sp := &spoofer{prefix: netip.MustParsePrefix(tt.prefix), rng: rand.New(rand.NewPCG(5, 6))}
			seen := map[netip.Addr]bool{}
			for range 200 {
				a := sp.addr()
				if !sp.prefix.Contains(a) {
					t.Fatalf("%v outside %v", a, sp.prefix)
				}
				seen[a] = true
			}
			if len(seen) != tt.want {
				t.Fatalf("%d distinct addresses %v, want %d", len(seen), seen, tt.want)
			}
		})
	}
}

func TestCheckTargets(t *testing.T) {
	t.Parallel()
	tests := []struct {
		dst, src string
		ok       bool
	}{
		{"198.19.0.1", "198.18.128.0/17", true},
		{"198.18.0.1", "203.0.113.0/24", true},
		{"10.77.0.2", "198.18.0.0/15", true},
		{"8.8.8.8", "198.18.128.0/17", false},
		{"10.0.0.1", "198.18.128.0/17", false},
		{"127.0.0.1", "198.18.128.0/17", false},
		{"198.19.0.1", "198.18.0.0/14", false}, // wider than the benchmarking block
		{"198.19.0.1", "10.0.0.0/8", false},
		{"198.19.0.1", "1.2.3.0/24", false},
	}
	for _, tt := range tests {
		err := checkTargets(netip.MustParseAddr(tt.dst), netip.MustParsePrefix(tt.src))
		if (err == nil) != tt.ok {
			t.Errorf("checkTargets(%s, %s) = %v, want ok=%v", tt.dst, tt.src, err, tt.ok)
		}
	}
}

func TestCheckNetnsRefuses(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"", "../../proc/1/ns/net", "/run/netns/x", "flood-test-no-such-namespace"} {
		if err := checkNetns(name); err == nil {
			t.Errorf("checkNetns(%q) = nil, want a refusal", name)
		}
	}
}

// fakeClock advances only when the pacer sleeps, or by cost per send.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time        { return c.now }
func (c *fakeClock) Sleep(d time.Duration) { c.now = c.now.Add(d) }

func TestPacerStopsAtCount(t *testing.T) {
	t.Parallel()
	c := &fakeClock{now: time.Unix(1000, 0)}
	sent := 0
	st := run(pace{rate: 20000, count: 60000, maxTime: 10 * time.Second}, c,
		func() []byte { return nil }, func([]byte) error { sent++; return nil })
	if sent != 60000 || st.Sent != 60000 || st.StoppedBy != "count" {
		t.Fatalf("sent %d, stats %+v: want exactly 60000, stopped by count", sent, st)
	}
	// Evenly spread: 60000 at 20000/s take 3 s of (fake) time, give or take a tick.
	if st.ElapsedS < 2.99 || st.ElapsedS > 3.01 {
		t.Fatalf("took %.3f s, want 3 s at 20000/s", st.ElapsedS)
	}
}

func TestPacerStopsAtTime(t *testing.T) {
	t.Parallel()
	c := &fakeClock{now: time.Unix(1000, 0)}
	fail := errors.New("ENOBUFS")
	n := 0
	st := run(pace{rate: 1000, count: 100000, maxTime: 2 * time.Second}, c,
		func() []byte { return nil },
		func([]byte) error {
			n++
			if n%10 == 0 {
				return fail
			}
			return nil
		})
	if st.StoppedBy != "time" || n > 2001 || n < 1999 {
		t.Fatalf("%d sends, stats %+v: want about 2000 in 2 s at 1000/s, stopped by time", n, st)
	}
	if st.SendErrors != n/10 || st.Sent != n-n/10 || st.FirstError != "ENOBUFS" {
		t.Fatalf("stats %+v after %d sends with every tenth failing", st, n)
	}
}

func TestPacerCatchesUpInBoundedBursts(t *testing.T) {
	t.Parallel()
	// A sender that takes 5 ms per packet at 10000/s falls behind; the pacer
	// must keep checking the clock (bursts of at most rate/100) and stop at
	// its deadline instead of sending the whole backlog.
	c := &fakeClock{now: time.Unix(1000, 0)}
	st := run(pace{rate: 10000, count: 50000, maxTime: time.Second}, c,
		func() []byte { return nil },
		func([]byte) error { c.now = c.now.Add(5 * time.Millisecond); return nil })
	if st.StoppedBy != "time" || st.Sent > 216 || c.now.Sub(time.Unix(1000, 0)) > 1100*time.Millisecond {
		t.Fatalf("stats %+v: want a stop at 1 s (+ at most 16 sends) after about 200 slow sends", st)
	}
}

func TestPaceValidate(t *testing.T) {
	t.Parallel()
	for _, p := range []pace{
		{rate: 0, count: 1, maxTime: time.Second},
		{rate: maxRate + 1, count: 1, maxTime: time.Second},
		{rate: 1, count: maxCount + 1, maxTime: time.Second},
		{rate: 1, count: 1, maxTime: maxTime + 1},
		{rate: 1, count: 1},
	} {
		if err := p.validate(); err == nil {
			t.Errorf("%+v validated, want an error", p)
		}
	}
	if err := (pace{rate: 50000, count: 150000, maxTime: 5 * time.Second}).validate(); err != nil {
		t.Errorf("the bench's UDP flood refused: %v", err)
	}
}

func TestParsePorts(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want portRange
		ok   bool
	}{
		{"8083", portRange{8083, 8083}, true},
		{"20000-29999", portRange{20000, 29999}, true},
		{"0", portRange{}, false},
		{"5-4", portRange{}, false},
		{"70000", portRange{}, false},
		{"", portRange{}, false},
	}
	for _, tt := range tests {
		got, err := parsePorts(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parsePorts(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
	rng := rand.New(rand.NewPCG(7, 8))
	r := portRange{20000, 20002}
	seen := map[uint16]bool{}
	for range 100 {
		seen[r.pick(rng)] = true
	}
	if len(seen) != 3 || !seen[20000] || !seen[20002] {
		t.Errorf("picks %v from %v, want all three ports", seen, r)
	}
}

func TestPercentileAndGap(t *testing.T) {
	t.Parallel()
	xs := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	if p := percentile(xs, 50); p != 5 {
		t.Errorf("p50 %v, want 5", p)
	}
	if p := percentile(xs, 99); p != 10 {
		t.Errorf("p99 %v, want 10", p)
	}
	if p := percentile(nil, 99); p != 0 {
		t.Errorf("p99 of nothing %v, want 0", p)
	}
	if g := maxGap([]float64{900, 100, 300}, 1000); g != 600 {
		t.Errorf("max gap %v, want 600 (300 -> 900)", g)
	}
	if g := maxGap(nil, 3000); g != 3000 {
		t.Errorf("max gap with no success %v, want the whole window", g)
	}
	if g := maxGap([]float64{100}, 3000); g != 2900 {
		t.Errorf("max gap %v, want 2900 (100 -> the end)", g)
	}
}

func TestParseStatTicks(t *testing.T) {
	t.Parallel()
	line := "4242 (nat box) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 567 0 0 20 0 12 0 99 1000000 2000 18446744073709551615\n"
	got, err := parseStatTicks(line)
	if err != nil || got != 1234+567 {
		t.Fatalf("parseStatTicks = %d, %v; want 1801", got, err)
	}
	if _, err := parseStatTicks("4242 (x) S 1 2"); err == nil || !strings.Contains(err.Error(), "short") {
		t.Fatalf("short line: %v", err)
	}
}

// echoServers starts a TCP and a UDP echo server on loopback; the UDP one
// stays silent for datagrams that start with drop.
func echoServers(t *testing.T, drop string) (tcpAddr, udpAddr string) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); pc.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer c.Close(); io.Copy(c, c) })
		}
	})
	wg.Go(func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if drop == "" || !strings.HasPrefix(string(buf[:n]), drop) {
				pc.WriteTo(buf[:n], from)
			}
		}
	})
	return ln.Addr().String(), pc.LocalAddr().String()
}

func TestClientCountsWhatCameBack(t *testing.T) {
	tests := []struct {
		name                    string
		drop                    string
		wantExisting, wantFresh int
	}{
		{name: "all answered", wantExisting: 5, wantFresh: 5},
		{name: "new sessions unanswered", drop: "fresh", wantExisting: 5, wantFresh: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tcpAddr, udpAddr := echoServers(t, tt.drop)
			readyCalls := 0
			res := runClient(t.Context(), clientSpec{
				tcpAddr: tcpAddr, tcpN: 10, udpAddr: udpAddr, udpN: 5,
				window: 200 * time.Millisecond, tcpTimeout: 5 * time.Second, udpTimeout: time.Second,
				ready: func() { readyCalls++ },
			})
			if readyCalls != 1 {
				t.Fatalf("ready called %d times, want once", readyCalls)
			}
			if res.TCP == nil || res.TCP.Attempts != 10 || res.TCP.OK != 10 || len(res.TCP.Errors) != 0 {
				t.Fatalf("tcp %+v: want 10 of 10 echoed", res.TCP)
			}
			if res.TCP.ConnectP99 <= 0 || res.TCP.ConnectP50 > res.TCP.ConnectP99 || res.TCP.AnswerMax < res.TCP.ConnectMax {
				t.Fatalf("tcp timings %+v", res.TCP)
			}
			u := res.UDP
			if u == nil || !u.ExistingOpened || u.Existing != 5 || u.Fresh != 5 {
				t.Fatalf("udp %+v: want the session opened and 5 exchanges of each kind", u)
			}
			if u.ExistingReplies != tt.wantExisting || u.FreshReplies != tt.wantFresh {
				t.Fatalf("udp replies existing %d fresh %d, want %d and %d", u.ExistingReplies, u.FreshReplies, tt.wantExisting, tt.wantFresh)
			}
		})
	}
}

func TestClientCountsRefusals(t *testing.T) {
	// A port nobody listens on: the kernel answers every SYN with an RST.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	res := runClient(t.Context(), clientSpec{tcpAddr: addr, tcpN: 4, window: 40 * time.Millisecond, tcpTimeout: 2 * time.Second})
	if res.TCP.OK != 0 || res.TCP.Errors["refused"] != 4 || res.TCP.FirstError == "" {
		t.Fatalf("tcp %+v: want 4 refusals", res.TCP)
	}
	// Refused, not stalled: answered well inside the timeout, and no success
	// ever closes the gap.
	if res.TCP.AnswerMax >= 2000 || res.TCP.MaxGap != 40 {
		t.Fatalf("answer max %v ms, gap %v ms: want a fast answer and the whole 40 ms window", res.TCP.AnswerMax, res.TCP.MaxGap)
	}
}

func TestWatchSelf(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Millisecond)
	defer cancel()
	res, err := watch(ctx, os.Getpid(), 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if res.Samples < 2 || res.RSSStartK <= 0 || res.RSSPeakK < res.RSSStartK || res.VmHWMK <= 0 || res.CPUS < 0 || res.Exited {
		t.Fatalf("watch of this test process: %+v", res)
	}
	if _, err := watch(t.Context(), 1<<30, 20*time.Millisecond); err == nil {
		t.Fatal("watch of a PID that does not exist: want an error")
	}
}

// TestUDPExchangeRetransmits: a server that ignores the first datagram (a
// gateway's probation, a lost packet) answers the retransmission, and the
// exchange succeeds; one that never answers fails after the timeout.
func TestUDPExchangeRetransmits(t *testing.T) {
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan int)
	go func() {
		buf := make([]byte, 64)
		n := 0
		for {
			m, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				done <- n
				return
			}
			if n++; n >= 2 {
				srv.WriteToUDP(buf[:m], from)
			}
		}
	}()
	c, err := udpSocket(srv.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ok, err := udpExchange(c, []byte("hello"), 2*time.Second)
	if err != nil || !ok {
		t.Fatalf("exchange with a server that answers the retransmission: ok %v, err %v", ok, err)
	}
	srv.Close()
	if n := <-done; n < 2 {
		t.Fatalf("server saw %d datagrams, want the first and a retransmission", n)
	}

	silent, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c2, err := udpSocket(silent.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	start := time.Now()
	if ok, err := udpExchange(c2, []byte("hello"), 700*time.Millisecond); ok || err != nil {
		t.Fatalf("exchange with a silent server: ok %v, err %v; want false, nil", ok, err)
	}
	if el := time.Since(start); el < 700*time.Millisecond || el > 3*time.Second {
		t.Fatalf("silent exchange took %v, want its 700ms timeout", el)
	}
}
