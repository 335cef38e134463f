//go:build !linux

package tunnel_test

import "testing"

// socketRuns skips: only Linux lets a socket choose its congestion control
// (congestion_other.go).
func socketRuns(t *testing.T, want string) string {
	t.Skip("TCP_CONGESTION is Linux's")
	return ""
}
