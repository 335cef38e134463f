package tunnel

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// socketCongestion sets TCP_CONGESTION to want on c unless want is "", and
// returns the algorithm c runs. The kernel refuses one it lacks, or one
// outside net.ipv4.tcp_allowed_congestion_control to a process without
// CAP_NET_ADMIN; c then keeps the default.
func socketCongestion(c net.Conn, want string) string {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return ""
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return ""
	}
	var got string
	raw.Control(func(fd uintptr) {
		if want != "" {
			_ = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, want)
		}
		got, _ = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	})
	return got
}
