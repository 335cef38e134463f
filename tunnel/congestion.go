package tunnel

import (
	"net"

	"github.com/natbox/natbox/conf"
)

// The TCP transport's congestion control (uplink.tcp_congestion and
// relay.tcp_congestion): a tunnel over TCP inherits every loss of its path
// as a stall of the kernel's TCP, and BBR, unlike cubic and reno, does not
// halve its pace on random loss (tunnel/BENCH.md, "The host's congestion
// control").

// askCongestion asks the kernel to run want on c, unless want is
// conf.TCPCongestionSystem (or "", a config built in code), and returns
// what c runs ("" where unknown: off Linux, or c is no TCP socket).
func askCongestion(c net.Conn, want string) string {
	if want == conf.TCPCongestionSystem {
		want = ""
	}
	return socketCongestion(c, want)
}

// congestionRefused reports that the kernel kept another congestion control
// than the one configured.
func congestionRefused(want, running string) bool {
	return want != conf.TCPCongestionSystem && want != "" && running != "" && running != want
}

// congestionHint is what to do when the kernel refuses tcp_congestion want.
func congestionHint(want string) string {
	return "the kernel lacks " + want + " or keeps it from this process: load it (modprobe tcp_" + want +
		") and add it to net.ipv4.tcp_allowed_congestion_control, or grant natbox CAP_NET_ADMIN; " +
		`tcp_congestion = "system" keeps the kernel's default without this note (README, "Slow through the relay")`
}
