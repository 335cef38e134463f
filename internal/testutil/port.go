package testutil

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// FreePort returns a port that is free for TCP and UDP on 127.0.0.1 (and on
// ::1 when v6 is true), for a test that must name a port before something
// binds it (a relay's public port, a config file).
//
// The port comes from below the kernel's ephemeral range: a port the kernel
// hands out (Listen on :0) can be taken as the local port of any outgoing
// connection in the meantime, and the churn tests that run in parallel make
// thousands of those, which once made a relay's bind fail with "address
// already in use".
//
// A port is handed out once per test binary: a test that names several
// ports before binding any (TestRelayUDPSocketCaps) once got the same one
// twice, and parallel tests could too.
func FreePort(t testing.TB, v6 bool) uint16 {
	t.Helper()
	lo, hi := 10000, ephemeralLow()-1
	for range 200 {
		port := uint16(lo + rand.IntN(hi-lo+1))
		if _, taken := handedOut.LoadOrStore(port, true); !taken && portFree(port, v6) {
			return port
		}
	}
	t.Fatalf("no free port in %d-%d after 200 tries", lo, hi)
	return 0
}

// handedOut holds every port FreePort considered (uint16 -> true); a port
// found busy is not tried again either.
var handedOut sync.Map

func portFree(port uint16, v6 bool) bool {
	addrs := []string{"tcp4/127.0.0.1", "udp4/127.0.0.1"}
	if v6 {
		addrs = append(addrs, "tcp6/[::1]", "udp6/[::1]")
	}
	for _, a := range addrs {
		network, host, _ := strings.Cut(a, "/")
		addr := fmt.Sprintf("%s:%d", host, port)
		var c interface{ Close() error }
		var err error
		if strings.HasPrefix(network, "tcp") {
			c, err = net.Listen(network, addr)
		} else {
			c, err = net.ListenPacket(network, addr)
		}
		if err != nil {
			return false
		}
		c.Close()
	}
	return true
}

// ephemeralLow is the first port of the kernel's ephemeral range (32768
// when it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= 10001 {
		return 32768
	}
	return n
}
