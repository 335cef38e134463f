package admin

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestRenderStatus(t *testing.T) {
	st := sampleStatus()
	st.Time = testNow
	var buf bytes.Buffer
	if err := RenderStatus(&buf, st); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	lines := strings.Split(out, "\n")
	header, web := lines[0], lines[1]
	if !strings.HasPrefix(header, "MAPPING") || !strings.HasPrefix(web, "web ") {
		t.Fatalf("table starts with\n%s\n%s", header, web)
	}
	// Columns line up: each header starts where its value starts.
	for _, col := range []struct{ head, value string }{
		{"STATE", "active"}, {"TARGET", "127.0.0.1:443"}, {"SESSIONS", "3 "}, {"HITS", "45"},
		{"IN", "1000 B"}, {"OUT", "244.1 KiB"}, {"LAST USED", "1m ago"}, {"REFUSALS", "denied=2 dial_failed=1"},
	} {
		h := strings.Index(header, " "+col.head+" ")
		if col.head == "REFUSALS" {
			h = strings.Index(header, " "+col.head)
		}
		if v := strings.Index(web, " "+col.value); h < 0 || v != h {
			t.Errorf("column %s at %d, value %q at %d:\n%s\n%s", col.head, h, col.value, v, header, web)
		}
	}
	for _, want := range []string{
		"games    expired  udp",
		`review overdue: web (review by 2026-05-01, owner it@example.com, "NAS web UI")`,
		"expired: games on 2026-10-01, no owner; natbox no longer serves it",
		"refused without a mapping: no_match=9",
		"UDP dropped: web: 4 datagrams",
		"budget limits hit: per_source=5",
		"tun natbox0, up, mtu 1500",
		"  traffic     in 11.4 MiB (9900 packets), out 62.5 KiB (800 packets)",
		"  dropped     100 packets (1.00 %) the kernel could not queue for natbox (queue 2000)",
		"uplinks: 1 of 2 relays registered\n",
		"uplink to relay.example.net:51820, tunnel address 100.96.0.2\n  state       registered\n  handshake   30s ago",
		"uplink to relay2.example.net:51820, tunnel address 100.97.0.2\n  state       connecting\n  handshake   never",
		"  registered  tcp/8443",
		"  refused     udp/27015: not in this peer's ports",
		"relay listening on 0.0.0.0:51820, 1 peer",
		"home: 3 public connections reset: the appliance refused them or did not answer",
		"mapping web: budget_hits=5\n",
		"relay: over_limit=2\n",
		"netstack drops and errors (every counter: natbox status --json, /metrics)\n" +
			"  tun      tcp_in_flight_drops=3 invalid(ip_checksum=2) (of 10 TCP requests, 900 packets in)\n",
		"home: control connections refused: rate=1 replaced=4",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
	for _, quiet := range []string{"uplink  ", "shutting down", "evictions", "connected", "tcp_established"} {
		if strings.Contains(out, quiet) {
			t.Errorf("status output shows %q, which is routine or 0:\n%s", quiet, out)
		}
	}
	if !strings.Contains(out, "home  100.96.0.2  -         never") {
		t.Errorf("relay peer row wrong:\n%s", out)
	}
}

func TestRenderUplinkTransport(t *testing.T) {
	now := time.Now()
	var b strings.Builder
	renderUplink(&b, now, &Uplink{Relay: "relay.example.net:51820", Endpoint: "tcp/203.0.113.1:443",
		Transport: "tcp", SwitchReason: "no reply over udp for 15s"})
	if want := "  transport   tcp (no reply over udp for 15s)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	renderUplink(&b, now, &Uplink{Relay: "r:1", Transport: "tcp", SwitchReason: "0.05 % lost", TCPCongestion: "bbr"})
	if want := "  transport   tcp (0.05 % lost; congestion control bbr)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	renderRelay(&b, now, &Relay{Listen: "0.0.0.0:51820", TCPCongestion: "cubic"})
	if want := "relay listening on 0.0.0.0:51820, 0 peers\ntcp transport congestion control: cubic\n"; b.String() != want {
		t.Errorf("relay: %q, want %q", b.String(), want)
	}
	b.Reset()
	renderUplink(&b, now, &Uplink{Relay: "r:1", Transport: "tcp", SwitchReason: "x", TransportError: "connection refused"})
	if want := "  transport   tcp (failing: connection refused)\n"; !strings.Contains(b.String(), want) {
		t.Errorf("lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	renderUplink(&b, now, &Uplink{Relay: "r:1", Transport: "udp"})
	if strings.Contains(b.String(), "transport") {
		t.Errorf("udp shown:\n%s", b.String())
	}
	b.Reset()
	renderUplink(&b, now, &Uplink{Relay: "r:1", Stats: Counters{Gauges: map[string]int64{"mtu": 32000}}})
	if want := "  tunnel mtu  32000\n"; !strings.Contains(b.String(), want) {
		t.Errorf("lacks %q:\n%s", want, b.String())
	}
}

// TestRenderUplinkPathLoss: the estimated loss shows once there is some, and
// points at what to do from conf.DefaultLossFallbackRate lost, unless on TCP.
func TestRenderUplinkPathLoss(t *testing.T) {
	now := time.Now()
	for _, tt := range []struct {
		in, lost  uint64
		transport string
		want      string // "" : no line
		advice    bool
	}{
		{1_000_000, 0, "udp", "", false},
		{999_990, 10, "udp", "0.001 % of the messages from the relay (10 of 1000000)", false},
		{999_900, 100, "udp", "0.010 % of the messages from the relay (100 of 1000000)", true},
		{999_900, 100, "tcp", "0.010 %", false},
	} {
		var b strings.Builder
		renderUplink(&b, now, &Uplink{Relay: "r:1", Transport: tt.transport,
			Stats: Counters{Counters: map[string]uint64{"datagrams_in": tt.in, "datagrams_lost": tt.lost}}})
		out := b.String()
		if got := strings.Contains(out, "path loss"); got != (tt.want != "") || !strings.Contains(out, tt.want) {
			t.Errorf("%d of %d lost: want a line with %q:\n%s", tt.lost, tt.in+tt.lost, tt.want, out)
		}
		if got := strings.Contains(out, "Slow through the relay"); got != tt.advice {
			t.Errorf("%d of %d lost over %s: advice %v, want %v:\n%s", tt.lost, tt.in+tt.lost, tt.transport, got, tt.advice, out)
		}
	}
}

func TestRenderSessions(t *testing.T) {
	ss := sampleSessions()
	ss[0].AgeSeconds, ss[0].IdleSeconds = 7500, 5
	ss[1].Peer = "home"
	var buf bytes.Buffer
	if err := RenderSessions(&buf, ss); err != nil {
		t.Fatal(err)
	}
	want := "" +
		"MAPPING  PROTO  CLIENT              TARGET           AGE  IDLE  IN    OUT   VIA\n" +
		"web      tcp    203.0.113.7:51000   127.0.0.1:443    2h   5s    10 B  20 B  -\n" +
		"games    udp    198.51.100.9:40000  127.0.0.1:27015  0s   0s    0 B   0 B   peer home\n"
	if buf.String() != want {
		t.Errorf("got\n%s\nwant\n%s", buf.String(), want)
	}
	buf.Reset()
	RenderSessions(&buf, nil)
	if buf.String() != "no sessions\n" {
		t.Errorf("empty list rendered as %q", buf.String())
	}
}

func TestFormatBytes(t *testing.T) {
	tests := []struct {
		n    uint64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"},
		{5 << 20, "5.0 MiB"}, {3 << 30, "3.0 GiB"}, {1 << 62, "4.0 EiB"},
	}
	for _, tt := range tests {
		if got := formatBytes(tt.n); got != tt.want {
			t.Errorf("formatBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestFormatAgo(t *testing.T) {
	tests := []struct {
		ago  time.Duration
		want string
	}{
		{0, "0s ago"}, {59 * time.Second, "59s ago"}, {61 * time.Minute, "1h ago"},
		{47 * time.Hour, "47h ago"}, {72 * time.Hour, "3d ago"}, {-time.Minute, "0s ago"},
	}
	for _, tt := range tests {
		if got := formatAgo(testNow, testNow.Add(-tt.ago)); got != tt.want {
			t.Errorf("formatAgo(-%v) = %q, want %q", tt.ago, got, tt.want)
		}
	}
	if got := formatAgo(testNow, time.Time{}); got != "never" {
		t.Errorf("zero time = %q, want never", got)
	}
}

// A relay has peers and no mappings: its status shows no empty mapping table.
func TestRenderRelayOnlyStatus(t *testing.T) {
	st := sampleStatus()
	st.Time = testNow
	st.Mappings, st.TUN, st.Uplinks, st.Refusals, st.BudgetHits, st.Netstack = nil, nil, nil, nil, nil, nil
	var buf bytes.Buffer
	if err := RenderStatus(&buf, st); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	if strings.Contains(out, "no mappings") || !strings.HasPrefix(out, "relay listening on 0.0.0.0:51820") {
		t.Fatalf("relay status:\n%s", out)
	}
}

// With no drop or error counted, natbox status has no netstack block.
func TestRenderNetstackQuietWhenAllZero(t *testing.T) {
	st := sampleStatus()
	st.Time = testNow
	tun := st.Netstack["tun"]
	tun.Counters["tcp_in_flight_drops"] = 0
	tun.Reasons["invalid"]["ip_checksum"] = 0
	// Normal traffic is not a drop: a connection that became bulk.
	tun.Counters["tcp_bulk_promoted"] = 3
	var buf bytes.Buffer
	if err := RenderStatus(&buf, st); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "netstack") {
		t.Fatalf("quiet stacks rendered:\n%s", buf.String())
	}
	// A counter natbox does not know yet (say one added to netstack.Stats
	// later) shows when it is not 0.
	tun.Counters["syn_cookies_sent"] = 12
	buf.Reset()
	if err := RenderStatus(&buf, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "  tun      syn_cookies_sent=12 (of 10 TCP requests") {
		t.Fatalf("new counter not rendered:\n%s", buf.String())
	}
}
