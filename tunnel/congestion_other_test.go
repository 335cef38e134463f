//go:build !linux

package tunnel_test

import "testing"

// kernelCongestion skips: only Linux lets a socket choose its congestion
// control (congestion_other.go).
func kernelCongestion(t *testing.T) string {
	t.Skip("TCP_CONGESTION is Linux's")
	return ""
}
