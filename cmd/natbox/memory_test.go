package main

import "testing"

// TestGCPercent: tunnel processes collect at GOGC=30, gateways at 75,
// unless GOGC is set.
func TestGCPercent(t *testing.T) {
	for _, c := range []struct {
		env    string
		tunnel bool
		want   int
	}{
		{"", true, tunnelGCPercent},
		{"", false, gatewayGCPercent},
		{"200", true, 0},
		{"off", true, 0},
	} {
		if got := gcPercent(c.env, c.tunnel); got != c.want {
			t.Errorf("gcPercent(%q, %v) = %d, want %d", c.env, c.tunnel, got, c.want)
		}
	}
}
