// Command flood is the bench's flood generator and measuring client. It sends
// spoofed-source TCP SYN and UDP floods from raw sockets, runs real TCP and
// UDP clients at a steady pace while a flood goes on, and watches a
// process's memory and CPU. Each run prints one JSON line on stdout.
//
// It only runs inside the network namespace it is told about (-netns, which
// must not be the initial one), only sends to and forges addresses in test
// ranges (the RFC 2544 benchmarking block, the RFC 5737 documentation blocks,
// the bench's 10.77.0.0/24), and every loop is bounded in count and time.
//
//	ip netns exec nbf-client flood syn -netns nbf-client -dst 198.19.0.1 -dport 8083 -src 198.18.128.0/17 -rate 20000 -count 60000
//	ip netns exec nbf-client flood udp -netns nbf-client -dst 198.19.0.1 -dport 8084 -src 198.18.128.0/17 -rate 50000 -count 150000
//	ip netns exec nbf-client flood client -netns nbf-client -tcp 198.19.0.1:8081 -n 40 -window 3s -udp 198.19.0.1:8084 -udp-n 5
//	flood watch -pid 1234 -max 30s     # until SIGTERM or -max
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const usage = `usage: flood syn|udp|client|watch [flags]   (flood CMD -h for the flags)
  syn     spoofed-source TCP SYN flood
  udp     spoofed-source UDP flood
  client  real TCP connections (connect + 1-byte echo) and UDP exchanges, paced over a window
  watch   RSS and CPU of a process until SIGTERM or -max
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var (
		out any
		err error
	)
	switch os.Args[1] {
	case "syn", "udp":
		out, err = floodCmd(os.Args[1], os.Args[2:])
	case "client":
		out, err = clientCmd(ctx, os.Args[2:])
	case "watch":
		out, err = watchCmd(ctx, os.Args[2:])
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "flood:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "flood:", err)
		os.Exit(1)
	}
}

type floodResult struct {
	Kind   string `json:"kind"`
	Dst    string `json:"dst"`
	DPorts string `json:"dports"`
	Src    string `json:"src"`
	Rate   int    `json:"rate"`
	Count  int    `json:"count"`
	floodStats
}

func floodCmd(kind string, args []string) (any, error) {
	fs := flag.NewFlagSet(kind, flag.ExitOnError)
	netns := fs.String("netns", "", "network namespace this must run in (required)")
	dst := fs.String("dst", "", "destination IPv4 address (required)")
	dports := fs.String("dport", "", "destination port or lo-hi range, a random one per packet (required)")
	src := fs.String("src", "198.18.128.0/17", "prefix the spoofed source addresses come from")
	rate := fs.Int("rate", 1000, "packets per second")
	count := fs.Int("count", 3000, fmt.Sprintf("packets in total (at most %d)", maxCount))
	maxT := fs.Duration("max-time", 0, "stop after this long even if -count is not reached (default count/rate x 1.5 + 1s)")
	size := fs.Int("size", 64, "UDP payload bytes")
	seed := fs.Uint64("seed", 0, "random seed (0: from the clock)")
	_ = fs.Parse(args)

	if err := checkNetns(*netns); err != nil {
		return nil, err
	}
	d, err := netip.ParseAddr(*dst)
	if err != nil {
		return nil, fmt.Errorf("-dst: %w", err)
	}
	pfx, err := netip.ParsePrefix(*src)
	if err != nil {
		return nil, fmt.Errorf("-src: %w", err)
	}
	if err := checkTargets(d, pfx); err != nil {
		return nil, err
	}
	pr, err := parsePorts(*dports)
	if err != nil {
		return nil, fmt.Errorf("-dport: %w", err)
	}
	p := pace{rate: *rate, count: *count, maxTime: *maxT}
	if p.maxTime == 0 && p.rate > 0 {
		p.maxTime = time.Duration(float64(p.count)/float64(p.rate)*1.5*float64(time.Second)) + time.Second
	}
	p.maxTime = min(p.maxTime, maxTime)
	if err := p.validate(); err != nil {
		return nil, err
	}
	if *size < 0 || *size > 1400 {
		return nil, fmt.Errorf("-size %d: want 0..1400", *size)
	}

	if *seed == 0 {
		*seed = uint64(time.Now().UnixNano())
	}
	rng := rand.New(rand.NewPCG(*seed, *seed>>1|1))
	sp := &spoofer{prefix: pfx, rng: rng}
	buf := make([]byte, 0, 1500)
	payload := make([]byte, *size)
	var next func() []byte
	if kind == "syn" {
		next = func() []byte {
			s := netip.AddrPortFrom(sp.addr(), sp.port())
			return buildSYN(buf, s, netip.AddrPortFrom(d, pr.pick(rng)), rng.Uint32(), uint16(rng.Uint32()))
		}
	} else {
		next = func() []byte {
			s := netip.AddrPortFrom(sp.addr(), sp.port())
			return buildUDP(buf, s, netip.AddrPortFrom(d, pr.pick(rng)), payload, uint16(rng.Uint32()))
		}
	}
	sock, err := openRaw()
	if err != nil {
		return nil, err
	}
	defer sock.Close()
	st := run(p, realClock{}, next, sock.sendTo(d))
	return floodResult{Kind: kind, Dst: d.String(), DPorts: *dports, Src: pfx.String(), Rate: p.rate, Count: p.count, floodStats: st}, nil
}

func parsePorts(s string) (portRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	a, err := strconv.ParseUint(lo, 10, 16)
	if err != nil || a == 0 {
		return portRange{}, fmt.Errorf("%q: want a port or lo-hi", s)
	}
	b := a
	if isRange {
		if b, err = strconv.ParseUint(hi, 10, 16); err != nil || b < a {
			return portRange{}, fmt.Errorf("%q: want a port or lo-hi with lo <= hi", s)
		}
	}
	return portRange{uint16(a), uint16(b)}, nil
}

func clientCmd(ctx context.Context, args []string) (any, error) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	netns := fs.String("netns", "", "network namespace this must run in (required)")
	tcp := fs.String("tcp", "", "TCP echo service host:port to connect to (empty: none)")
	n := fs.Int("n", 40, "TCP connections, spread evenly over -window")
	udp := fs.String("udp", "", "UDP echo service host:port (empty: none)")
	udpN := fs.Int("udp-n", 5, "UDP exchanges on fresh sockets (and as many on one socket opened first), spread over -window")
	window := fs.Duration("window", 3*time.Second, "the attempts are spread evenly over this")
	tcpTimeout := fs.Duration("timeout", 3*time.Second, "per TCP connection: connect plus the echo")
	udpTimeout := fs.Duration("udp-timeout", time.Second, "per UDP exchange")
	readyFile := fs.String("ready", "", "create this file when the window starts (the UDP session from before is open by then)")
	_ = fs.Parse(args)

	if err := checkNetns(*netns); err != nil {
		return nil, err
	}
	for _, a := range []string{*tcp, *udp} {
		if a == "" {
			continue
		}
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", a, err)
		}
		if err := checkTargets(ap.Addr(), netip.Prefix{}); err != nil {
			return nil, err
		}
	}
	switch {
	case *n < 0 || *n > 10000 || *udpN < 0 || *udpN > 1000:
		return nil, fmt.Errorf("-n up to 10000, -udp-n up to 1000")
	case *window <= 0 || *window > maxTime || *tcpTimeout <= 0 || *tcpTimeout > 30*time.Second ||
		*udpTimeout <= 0 || *udpTimeout > 10*time.Second:
		return nil, fmt.Errorf("-window up to %s, -timeout up to 30s, -udp-timeout up to 10s", maxTime)
	}
	// Bounded as a whole: the last attempt starts at the window's end.
	ctx, cancel := context.WithTimeout(ctx, *window+*tcpTimeout+*udpTimeout+5*time.Second)
	defer cancel()
	var ready func()
	if *readyFile != "" {
		ready = func() {
			if err := os.WriteFile(*readyFile, nil, 0o644); err != nil {
				fmt.Fprintln(os.Stderr, "flood: -ready:", err)
			}
		}
	}
	return runClient(ctx, clientSpec{
		tcpAddr: *tcp, tcpN: *n, udpAddr: *udp, udpN: *udpN,
		window: *window, tcpTimeout: *tcpTimeout, udpTimeout: *udpTimeout, ready: ready,
	}), nil
}

func watchCmd(ctx context.Context, args []string) (any, error) {
	fs := flag.NewFlagSet("watch", flag.ExitOnError)
	pid := fs.Int("pid", 0, "process to watch (required)")
	interval := fs.Duration("interval", 100*time.Millisecond, "sampling interval")
	maxT := fs.Duration("max", 2*time.Minute, "stop after this long if no SIGTERM came")
	_ = fs.Parse(args)
	if *pid <= 0 {
		return nil, fmt.Errorf("-pid is required")
	}
	if *interval < 10*time.Millisecond || *maxT <= 0 || *maxT > 10*time.Minute {
		return nil, fmt.Errorf("-interval at least 10ms, -max up to 10m")
	}
	ctx, cancel := context.WithTimeout(ctx, *maxT)
	defer cancel()
	return watch(ctx, *pid, *interval)
}
