package tunnel

import (
	"encoding/json"
	"maps"
	"testing"
	"time"
)

// TestUDPIdleOfRegister: a register's idle timeouts apply only to specs it
// lists, only when positive, and at most maxUDPIdle; a register without
// them (an older appliance) gives none, so the relay's default applies.
func TestUDPIdleOfRegister(t *testing.T) {
	var old message
	if err := json.Unmarshal([]byte(`{"v":1,"type":"register","ports":["udp/5000"]}`), &old); err != nil {
		t.Fatal(err)
	}
	if got := udpIdleOf(old); got != nil {
		t.Fatalf("register without udp_idle_ms: %v, want none", got)
	}
	var m message
	if err := json.Unmarshal([]byte(`{"v":1,"type":"register","ports":["udp/5000","udp/6000-6010","udp/7000","udp/8000"],
		"udp_idle_ms":{"udp/5000":300000,"udp/6000-6010":1500,"udp/7000":0,"udp/8000":9223372036854775807,"udp/9000":1000}}`), &m); err != nil {
		t.Fatal(err)
	}
	want := map[string]time.Duration{"udp/5000": 5 * time.Minute, "udp/6000-6010": 1500 * time.Millisecond, "udp/8000": maxUDPIdle}
	if got := udpIdleOf(m); !maps.Equal(got, want) {
		t.Fatalf("udpIdleOf = %v, want %v", got, want)
	}
}
