package tunnel_test

import (
	"os"
	"strings"
	"testing"
)

// kernelCongestion is the kernel's default TCP congestion control.
func kernelCongestion(t *testing.T) string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Fatalf("the kernel's congestion control: %v", err)
	}
	return strings.TrimSpace(string(b))
}
