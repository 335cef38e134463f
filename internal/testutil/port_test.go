package testutil

import "testing"

// TestFreePortNeverTwice: the ports FreePort hands out are distinct (with
// 300 picks from ~22 000 ports, a repeat would otherwise be likely).
func TestFreePortNeverTwice(t *testing.T) {
	seen := make(map[uint16]bool)
	for range 300 {
		p := FreePort(t, false)
		if seen[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		seen[p] = true
	}
}
