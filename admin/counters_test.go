package admin

import (
	"reflect"
	"testing"
	"time"
)

func TestSnakeCase(t *testing.T) {
	tests := []struct{ in, want string }{
		{"PacketsIn", "packets_in"}, {"TCPInFlightDrops", "tcp_in_flight_drops"}, {"IPHeader", "ip_header"},
		{"UDPFastPath", "udp_fast_path"}, {"GROCoalesced", "gro_coalesced"}, {"TCPRetransmits", "tcp_retransmits"},
		{"Oversize", "oversize"}, {"Rx2Bytes", "rx2_bytes"}, {"SYNCookiesSent", "syn_cookies_sent"}, {"X", "x"},
	}
	for _, tt := range tests {
		if got := SnakeCase(tt.in); got != tt.want {
			t.Errorf("SnakeCase(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestCountersOf(t *testing.T) {
	type reasons struct{ IPHeader, TCPChecksum uint64 }
	type stats struct {
		Drops       uint64
		Established uint64 `stats:"gauge"`
		Active      int64
		Opened      int64 `stats:"counter"`
		Up          bool
		Hidden      uint64 `stats:"-"`
		Shown       uint64 // skipped by the caller
		Name        string
		Since       time.Time
		Took        time.Duration
		Invalid     reasons
		ByReason    map[string]uint64
		unexported  uint64
	}
	s := stats{Drops: 1, Established: 2, Active: -3, Opened: 4, Up: true, Hidden: 5, Shown: 6, Name: "n",
		Since: time.Unix(7, 0), Took: 8, Invalid: reasons{9, 10}, ByReason: map[string]uint64{"full": 11}, unexported: 12}
	want := Counters{
		Counters: map[string]uint64{"drops": 1, "opened": 4},
		Gauges:   map[string]int64{"established": 2, "active": -3, "up": 1},
		Reasons:  map[string]map[string]uint64{"invalid": {"ip_header": 9, "tcp_checksum": 10}, "by_reason": {"full": 11}},
	}
	if got := CountersOf(&s, "Shown"); !reflect.DeepEqual(got, want) {
		t.Errorf("CountersOf = %+v\nwant %+v", got, want)
	}
	if !CountersOf(42).IsZero() || CountersOf(s).IsZero() {
		t.Error("IsZero wrong")
	}
}
