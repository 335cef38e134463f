package tunnel_test

import (
	"testing"

	"golang.org/x/sys/unix"
)

// socketRuns is the congestion control a new TCP socket reports running
// after asking for want ("": the kernel's default), as this platform reads
// it. Not /proc's name: under qemu-user (CI's armv7 and arm64 runs) the
// getsockopt comes back as the name's first four bytes ("cubi" for
// "cubic"), for natbox's sockets and this one alike.
func socketRuns(t *testing.T, want string) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socket: %v", err)
	}
	defer unix.Close(fd)
	if want != "" {
		if err := unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, want); err != nil {
			t.Fatalf("TCP_CONGESTION %q: %v", want, err)
		}
	}
	got, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		t.Fatalf("TCP_CONGESTION: %v", err)
	}
	return got
}
