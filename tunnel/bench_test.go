package tunnel_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// sinkService accepts TCP on 127.0.0.1 and discards everything it reads;
// closing after EOF tells the sender every byte arrived.
func sinkService(b *testing.B) uint16 {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	b.Cleanup(func() { ln.Close(); wg.Wait() })
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// BenchmarkRelayTCPThroughput measures one TCP flow from a loopback client
// to the relay's public port, through wireguard-go over loopback UDP, into
// the appliance's netstack and forwarder, to a sink on 127.0.0.1. Each
// iteration moves 32 MiB on a new connection and waits until the sink has
// read all of it.
func BenchmarkRelayTCPThroughput(b *testing.B) {
	const perConn = 32 << 20
	port := freePort(b, false)
	key := mustKey(b)
	relay := startRelay(b, relayConfig(mustKey(b), "127.0.0.1:0", []netip.Addr{loopback4},
		conf.Peer{Name: "a", PublicKey: key.Public(), Address: applAddrA, Ports: mustSpecs(b, fmt.Sprintf("tcp/%d", port))},
	), zap.NewNop())
	sink := sinkService(b)
	a := startAppliance(b, relay, key, applAddrA, fmt.Sprintf(`
[[mapping]]
name = "sink"
protocol = "tcp"
listen = "%d"
target = "127.0.0.1:%d"
`, port, sink))
	waitRegistered(b, a, fmt.Sprintf("tcp/%d", port))
	public := netip.AddrPortFrom(loopback4, port).String()
	buf := make([]byte, 256<<10)

	b.SetBytes(perConn)
	b.ReportAllocs()
	start := time.Now()
	n := 0
	for b.Loop() {
		c, err := net.DialTimeout("tcp", public, 5*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(60 * time.Second))
		for sent := 0; sent < perConn; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				b.Fatalf("write after %d bytes: %v", sent, err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		if _, err := io.Copy(io.Discard, c); err != nil { // EOF once the sink has it all
			b.Fatal(err)
		}
		c.Close()
		n++
	}
	elapsed := time.Since(start)
	b.ReportMetric(float64(n)*perConn*8/elapsed.Seconds()/1e9, "Gbit/s")
}
