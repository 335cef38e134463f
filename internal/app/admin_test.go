package app_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/netstack"
)

// freeLoopbackAddr returns a 127.0.0.1 TCP address free a moment ago
// ([admin] listen takes no port 0).
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// scrape fetches /metrics and returns each sample line as
// `name{labels}` -> value.
func scrape(t *testing.T, addr string) map[string]string {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s", resp.Status)
	}
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		out[line[:i]] = line[i+1:]
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("scrape: %v", err)
	}
	return out
}

func TestStatusSessionsAndMetricsMatchTraffic(t *testing.T) {
	t.Parallel()
	// web answers 2500 bytes to exactly 1000, then closes.
	web := serveTCP(t, func(c *net.TCPConn) {
		if _, err := io.ReadFull(c, make([]byte, 1000)); err == nil {
			c.Write(make([]byte, 2500))
		}
	})
	held := serveTCP(t, echo)
	dns := serveUDP(t, udpEcho)
	metricsAddr := freeLoopbackAddr(t)
	h := newHarness(t, spec{
		Admin: fmt.Sprintf("listen = %q", metricsAddr),
		Mappings: mapping("web", "tcp", "8800", web.String(), `deny = ["203.0.113.66/32"]`) +
			mapping("held", "tcp", "8801", held.String()) +
			mapping("dns", "udp", "8853", dns.String()),
	}, app.Options{Version: "test-version"})
	h.run()

	// Three complete web sessions, one denied, one unmatched.
	for i := 0; i < 3; i++ {
		c := h.mustDial(ap(client4, 0), ap(public4, 8800))
		c.Write(make([]byte, 1000))
		if got := readAllString(t, c); len(got) != 2500 {
			t.Fatalf("web answered %d bytes, want 2500", len(got))
		}
		c.Close()
	}
	h.expectRefused(ap(netip.MustParseAddr("203.0.113.66"), 0), ap(public4, 8800))
	h.expectRefused(ap(client4, 0), ap(public4, 8899))
	// One TCP session left open with 123 bytes each way.
	heldClient := ap(client4, 46000)
	hc := h.mustDial(heldClient, ap(public4, 8801))
	expectEcho(t, hc, strings.Repeat("h", 123))
	// One UDP session: two datagrams of 100 bytes each way.
	dnsClient := ap(client4, 46001)
	for i := 0; i < 2; i++ {
		h.sendUDP(dnsClient, ap(public4, 8853), make([]byte, 100))
		h.mustRecvUDP(dnsClient)
	}
	// Counters land when each write completes: wait for the engine to see it all.
	waitFor(t, 5*time.Second, "counters to settle", func() bool {
		w, hl, d := h.mappingStatus("web"), h.mappingStatus("held"), h.mappingStatus("dns")
		return w.SessionsActive == 0 && w.BytesIn == 3000 && w.BytesOut == 7500 &&
			hl.BytesIn == 123 && hl.BytesOut == 123 && d.BytesIn == 200 && d.BytesOut == 200
	})

	cl, err := admin.Dial(h.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	st, err := cl.Status(ctx)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	type counts struct {
		hits, opened      uint64
		active            int64
		bytesIn, bytesOut uint64
		refusals          map[string]uint64
	}
	want := map[string]counts{
		"web":  {hits: 4, opened: 3, active: 0, bytesIn: 3000, bytesOut: 7500, refusals: map[string]uint64{"denied": 1}},
		"held": {hits: 1, opened: 1, active: 1, bytesIn: 123, bytesOut: 123},
		"dns":  {hits: 1, opened: 1, active: 1, bytesIn: 200, bytesOut: 200},
	}
	if st.Version != "test-version" || st.ConfigPath != h.path || len(st.Mappings) != len(want) {
		t.Fatalf("status version %q, config %q, %d mappings", st.Version, st.ConfigPath, len(st.Mappings))
	}
	for _, m := range st.Mappings {
		w := want[m.Name]
		got := counts{m.Hits, m.SessionsOpened, m.SessionsActive, m.BytesIn, m.BytesOut, m.Refusals}
		if got.hits != w.hits || got.opened != w.opened || got.active != w.active || got.bytesIn != w.bytesIn || got.bytesOut != w.bytesOut {
			t.Errorf("status %s: %+v, want %+v", m.Name, got, w)
		}
		wantRefusals(t, "status "+m.Name, m.Refusals, w.refusals)
		if m.State != admin.StateActive {
			t.Errorf("status %s: state %q", m.Name, m.State)
		}
	}
	wantRefusals(t, "status unmatched", st.Refusals, map[string]uint64{"no_match": 1})
	// The TUN's netstack handed over six connection attempts (three web, the
	// denied one, the unmatched one, held) and answered two with RST; the
	// two DNS datagrams took the UDP fast path.
	tun := st.Netstack["tun"]
	if c := tun.Counters; c["tcp_requests"] != 6 || c["tcp_rejected"] != 2 || c["udp_fast_path"] != 2 || c["packets_in"] == 0 {
		t.Errorf("status netstack tun = %+v, want 6 TCP requests, 2 rejected, 2 UDP fast path", tun)
	}
	if g := tun.Gauges["tcp_established"]; g != 1 {
		t.Errorf("status netstack tun: tcp_established = %d, want 1 (held)", g)
	}

	ss, err := cl.Sessions(ctx, "")
	if err != nil {
		t.Fatalf("sessions: %v", err)
	}
	slices.SortFunc(ss, func(a, b admin.Session) int { return strings.Compare(a.Mapping, b.Mapping) })
	wantSessions := []admin.Session{
		{Mapping: "dns", Protocol: "udp", Client: dnsClient.String(), Public: ap(public4, 8853).String(), Target: dns.String(), Ingress: "tun", BytesIn: 200, BytesOut: 200},
		{Mapping: "held", Protocol: "tcp", Client: heldClient.String(), Public: ap(public4, 8801).String(), Target: held.String(), Ingress: "tun", BytesIn: 123, BytesOut: 123},
	}
	if len(ss) != len(wantSessions) {
		t.Fatalf("sessions = %+v, want %d", ss, len(wantSessions))
	}
	for i, s := range ss {
		w := wantSessions[i]
		if s.Mapping != w.Mapping || s.Protocol != w.Protocol || s.Client != w.Client || s.Public != w.Public ||
			s.Target != w.Target || s.Ingress != w.Ingress || s.BytesIn != w.BytesIn || s.BytesOut != w.BytesOut {
			t.Errorf("session %d = %+v,\nwant %+v", i, s, w)
		}
		if s.Started.IsZero() || s.AgeSeconds <= 0 {
			t.Errorf("session %s: started %v, age %v", s.Mapping, s.Started, s.AgeSeconds)
		}
	}
	if only, err := cl.Sessions(ctx, "held"); err != nil || len(only) != 1 || only[0].Client != heldClient.String() {
		t.Fatalf("sessions of held = %+v, %v", only, err)
	}

	metrics := scrape(t, metricsAddr)
	for series, value := range map[string]string{
		`natbox_mapping_hits_total{mapping="web"}`:                         "4",
		`natbox_mapping_sessions_opened_total{mapping="web"}`:              "3",
		`natbox_mapping_sessions_active{mapping="web"}`:                    "0",
		`natbox_mapping_bytes_total{direction="in",mapping="web"}`:         "3000",
		`natbox_mapping_bytes_total{direction="out",mapping="web"}`:        "7500",
		`natbox_refusals_total{mapping="web",reason="denied"}`:             "1",
		`natbox_mapping_sessions_active{mapping="held"}`:                   "1",
		`natbox_mapping_bytes_total{direction="in",mapping="held"}`:        "123",
		`natbox_mapping_bytes_total{direction="out",mapping="held"}`:       "123",
		`natbox_mapping_sessions_opened_total{mapping="dns"}`:              "1",
		`natbox_mapping_bytes_total{direction="in",mapping="dns"}`:         "200",
		`natbox_mapping_bytes_total{direction="out",mapping="dns"}`:        "200",
		`natbox_refusals_total{mapping="",reason="no_match"}`:              "1",
		`natbox_dial_latency_seconds_count{mapping="web"}`:                 "3",
		`natbox_mapping_active{mapping="dns"}`:                             "1",
		`natbox_inflight_dials`:                                            "0",
		`natbox_netstack_tcp_requests_total{stack="tun"}`:                  "6",
		`natbox_netstack_tcp_rejected_total{stack="tun"}`:                  "2",
		`natbox_netstack_udp_fast_path_total{stack="tun"}`:                 "2",
		`natbox_netstack_tcp_established{stack="tun"}`:                     "1",
		`natbox_netstack_invalid_total{reason="tcp_checksum",stack="tun"}`: "0",
		`natbox_forwarder_active_sessions`:                                 "2",
	} {
		if got, ok := metrics[series]; !ok || got != value {
			t.Errorf("metric %s = %q (present %v), want %s", series, got, ok, value)
		}
	}

	// Reload over the socket: an invalid file comes back line by line and
	// changes nothing; a valid one reports what changed.
	h.writeFile(strings.Replace(h.currentConfig(t), `listen = "8801"`, `listen = "0"`, 1))
	_, err = cl.Reload(ctx)
	var ce *admin.ConfigError
	if !errors.As(err, &ce) || len(ce.Lines) != 1 || !strings.HasPrefix(ce.Lines[0], h.path+":") {
		t.Fatalf("reload of an invalid file: %v, want one FILE:LINE problem", err)
	}
	expectEcho(t, hc, "held survives a refused reload")
	h.writeConfig(spec{
		Admin:    fmt.Sprintf("listen = %q", metricsAddr),
		Mappings: mapping("held", "tcp", "8801", held.String()) + mapping("dns", "udp", "8853", dns.String()),
	})
	res, err := cl.Reload(ctx)
	if err != nil || !slices.Equal(res.Removed, []string{"web"}) || len(res.Added)+len(res.Changed) != 0 {
		t.Fatalf("reload = %+v, %v; want web removed", res, err)
	}
	expectEcho(t, hc, "held survives a reload that removed web")
}

func (h *harness) currentConfig(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(h.path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A start-up that fails late (here: another natbox already answers on the
// admin socket) returns the error, closes what it had started and does not
// panic; the first appliance keeps working.
func TestNewApplianceFailingLateClosesWhatItStarted(t *testing.T) {
	target := serveTCP(t, echo)
	h := newHarness(t, spec{Mappings: mapping("web", "tcp", "8900", target.String())}, app.Options{})
	cfg, _, err := conf.Load(h.path)
	if err != nil {
		t.Fatal(err)
	}
	appSide, clientSide := netstack.Pipe(linkMTU)
	defer clientSide.Close()
	second, err := app.NewAppliance(cfg, app.Options{TUNDevice: appSide}, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
	if err == nil || second != nil {
		t.Fatalf("second appliance on a live admin socket: %v, %v; want an error and no appliance", second, err)
	}
	if !strings.Contains(err.Error(), "already running") {
		t.Fatalf("error %q does not say another natbox is running", err)
	}
	expectEcho(t, h.mustDial(ap(client4, 0), ap(public4, 8900)), "first still serves")
}
