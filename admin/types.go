// Package admin is natbox's local control and observation surface: a JSON API
// on a unix socket (status, sessions, reload) used by `natbox status`,
// `natbox sessions` and `natbox reload`, an optional HTTP listener with
// Prometheus metrics, health and readiness, and the client and human renderers
// for the CLI.
//
// admin does not import the forwarder or the tunnel. It reads everything
// through Source, which returns the plain, JSON-ready structs in this file;
// the program's wiring adapts the engine and the WireGuard devices to it.
package admin

import (
	"context"
	"errors"
	"strings"
	"time"
)

// Source is what the admin server observes and controls. Implementations must
// be safe for concurrent use: scrapes, status requests and reloads may run at
// the same time.
type Source interface {
	// Status returns a consistent-enough snapshot of the mappings, the uplink
	// and the relay. It should be cheap (counters read atomically); a metrics
	// scrape calls it once.
	Status() Status
	// Sessions returns the live sessions, only those of mapping when it is not "".
	Sessions(mapping string) []Session
	// Reload re-reads the config and applies it. An invalid config must change
	// nothing and come back as an error made by InvalidConfig, so that the
	// caller sees each problem as its own line.
	Reload(ctx context.Context) (ReloadResult, error)
}

// Mapping states, as shown by natbox status.
const (
	StateActive         = "active"           // enabled and served
	StateDisabled       = "disabled"         // enabled = false
	StateExpired        = "expired"          // its expires date passed; natbox disabled it
	StateRefusedByRelay = "refused_by_relay" // served through the uplink only, and the relay refused its ports
)

// UplinkRegistered is Uplink.State once the relay answered every port.
const UplinkRegistered = "registered"

// Traffic directions used in JSON and metric labels. For a mapping, "in" is
// client to target and "out" is target to client. For the uplink and for a
// relay peer, "in" is received from the tunnel and "out" is sent into it.
const (
	DirectionIn  = "in"
	DirectionOut = "out"
)

// Status is a snapshot of a running natbox (an appliance, a relay, or both).
type Status struct {
	// Time is when the snapshot was taken; ages (handshake, last used) are
	// measured from it. The server fills it when the Source leaves it zero.
	Time       time.Time `json:"time"`
	Version    string    `json:"version,omitempty"`
	ConfigPath string    `json:"config_path,omitempty"`
	StartedAt  time.Time `json:"started_at,omitzero"`

	Mappings []Mapping `json:"mappings"`
	// Warnings are findings about the host natbox runs on, e.g. a
	// carrier-grade NAT address with no uplink (see internal/doctor).
	Warnings []string `json:"warnings,omitempty"`
	// Refusals counts refused flows that matched no mapping, by reason
	// (for example "no_match").
	Refusals map[string]uint64 `json:"refusals,omitempty"`
	// BudgetHits counts admissions refused by a shared in-flight or session
	// budget, by limit: "total", "per_source", "per_target", "sessions",
	// "tcp_sessions", "udp_sessions", "sessions_per_source", "rate_per_source".
	BudgetHits map[string]uint64 `json:"budget_hits,omitempty"`
	// InflightDials is how many connection attempts are being dialed now.
	InflightDials int `json:"inflight_dials"`
	// Forwarder holds the engine's other counters and gauges (sessions
	// active in total, shutting down), by reflection: see CountersOf.
	Forwarder Counters `json:"forwarder,omitzero"`
	// Netstack holds every counter of each userspace network stack, by
	// stack: "tun" (the gateway), "uplink" (the appliance's tunnel end),
	// "relay" (the relay's tunnel end).
	Netstack map[string]Counters `json:"netstack,omitempty"`

	TUN *TUN `json:"tun,omitempty"` // nil: no kernel TUN
	// Uplinks are the relay tunnels, one per [[uplink]] in config order;
	// each is independent (one down does not touch the others).
	Uplinks []Uplink `json:"uplinks,omitempty"`
	Relay   *Relay   `json:"relay,omitempty"` // nil: not a relay
}

// Mapping is one mapping's configuration summary and counters.
type Mapping struct {
	Name     string   `json:"name"`
	State    string   `json:"state"`    // one of the State constants
	Protocol string   `json:"protocol"` // "tcp", "udp" or "tcp+udp"
	Listen   string   `json:"listen"`   // as configured: "8443", "10000-10100", "198.51.100.1:8443"
	Target   string   `json:"target"`   // as configured: "10.77.0.2:443"
	Ingress  []string `json:"ingress,omitempty"`
	Allow    []string `json:"allow,omitempty"` // empty: anyone

	// Hits counts flows that matched this mapping, admitted or refused.
	Hits           uint64 `json:"hits"`
	SessionsOpened uint64 `json:"sessions_opened"`
	SessionsActive int64  `json:"sessions_active"`
	BytesIn        uint64 `json:"bytes_in"`  // client to target
	BytesOut       uint64 `json:"bytes_out"` // target to client
	// LastUsed is when the last session opened; zero: never.
	LastUsed time.Time `json:"last_used,omitzero"`
	// Refusals counts flows refused after matching, by reason ("denied",
	// "not_allowed", "over_limit", "dial_failed", ...).
	Refusals           map[string]uint64 `json:"refusals,omitempty"`
	UDPSessionsExpired uint64            `json:"udp_sessions_expired,omitempty"`
	// UDPDropped counts datagrams dropped: a full queue, a failed dial, stray replies.
	UDPDropped  uint64    `json:"udp_dropped,omitempty"`
	DialLatency Histogram `json:"dial_latency,omitzero"`
	// Stats holds the mapping's other counters, by reflection: see CountersOf.
	Stats Counters `json:"stats,omitzero"`

	// RelayRefusal is the relay's reason when it refused this mapping's ports.
	RelayRefusal string `json:"relay_refusal,omitempty"`
	// RiskyExposure names the risky services ("rdp (3389)") the mapping
	// opens to everyone without acknowledge_risk (conf.Mapping.RiskyExposure).
	RiskyExposure []string `json:"risky_exposure,omitempty"`

	Description   string    `json:"description,omitempty"`
	Owner         string    `json:"owner,omitempty"`
	ReviewBy      time.Time `json:"review_by,omitzero"`
	Expires       time.Time `json:"expires,omitzero"`
	ReviewOverdue bool      `json:"review_overdue,omitempty"`
}

// Histogram is a cumulative latency histogram in seconds, as Prometheus
// expects it: each bucket counts the observations at or below its bound.
type Histogram struct {
	Count      uint64   `json:"count"`
	SumSeconds float64  `json:"sum_seconds"`
	Buckets    []Bucket `json:"buckets,omitempty"` // ascending; +Inf is implied by Count
}

// Bucket is one histogram bucket.
type Bucket struct {
	UpperBoundSeconds float64 `json:"le"`
	Count             uint64  `json:"count"` // cumulative
}

// TUN is the gateway's kernel TUN link, from the kernel's counters. In is
// what the kernel handed natbox; out is what natbox sent back through it.
type TUN struct {
	Name       string `json:"name"`
	Up         bool   `json:"up"`
	MTU        int    `json:"mtu"`
	TxQueueLen int    `json:"txqueuelen"`
	PacketsIn  uint64 `json:"packets_in"`
	BytesIn    uint64 `json:"bytes_in"`
	PacketsOut uint64 `json:"packets_out"`
	BytesOut   uint64 `json:"bytes_out"`
	// DroppedIn counts packets the kernel dropped because natbox did not
	// read them in time (its queue of TxQueueLen packets was full): natbox
	// is short of CPU for the offered load.
	DroppedIn uint64 `json:"dropped_in"`
	// Error is why the counters could not be read (for example the link
	// was deleted under natbox).
	Error string `json:"error,omitempty"`
}

// Uplink is one of the appliance's WireGuard tunnels, to one relay.
type Uplink struct {
	// State is "connecting", or UplinkRegistered once the relay answered every port.
	State    string `json:"state,omitempty"`
	Peer     string `json:"peer,omitempty"`     // this appliance's name on the relay
	Relay    string `json:"relay"`              // as configured, host:port
	Endpoint string `json:"endpoint,omitempty"` // the address in use now
	Address  string `json:"address"`            // this appliance's tunnel address
	// LastHandshake is the last completed WireGuard handshake; zero: never.
	LastHandshake time.Time     `json:"last_handshake,omitzero"`
	BytesIn       uint64        `json:"bytes_in"`             // received from the relay
	BytesOut      uint64        `json:"bytes_out"`            // sent to the relay
	Registered    []string      `json:"registered,omitempty"` // ports the relay holds for us: "tcp/443"
	Refused       []PortRefusal `json:"refused,omitempty"`
	// Transport is "udp" or "tcp" (WireGuard inside TLS to relay_tcp);
	// SwitchReason says why it last changed, TransportError why the last TCP
	// connect failed.
	Transport      string `json:"transport,omitempty"`
	SwitchReason   string `json:"switch_reason,omitempty"`
	TransportError string `json:"transport_error,omitempty"`
	// TCPCongestion is the congestion control the last TCP connection to
	// relay_tcp ran (uplink.tcp_congestion, or the kernel's default).
	TCPCongestion string `json:"tcp_congestion,omitempty"`
	// Stats holds the uplink's other counters, by reflection: see CountersOf.
	Stats Counters `json:"stats,omitzero"`
}

// PortRefusal is a port the relay would not open, with its reason.
type PortRefusal struct {
	Port   string `json:"port"` // "tcp/22"
	Reason string `json:"reason"`
}

// Relay is the relay side: its WireGuard listener and its peers.
type Relay struct {
	Listen string      `json:"listen"`
	Peers  []RelayPeer `json:"peers"`
	// TCPCongestion is the congestion control the last connection to
	// relay.tcp_listen ran (relay.tcp_congestion, or the kernel's default).
	TCPCongestion string `json:"tcp_congestion,omitempty"`
	// Stats holds the relay's own counters (sessions, flows refused by peer
	// isolation or by relay.max_sessions), by reflection: see CountersOf.
	Stats Counters `json:"stats,omitzero"`
}

// RelayPeer is one appliance known to the relay.
type RelayPeer struct {
	Name           string        `json:"name"`
	PublicKey      string        `json:"public_key,omitempty"`
	Address        string        `json:"address"`            // tunnel address
	Endpoint       string        `json:"endpoint,omitempty"` // where its packets come from now
	LastHandshake  time.Time     `json:"last_handshake,omitzero"`
	BytesIn        uint64        `json:"bytes_in"`             // received from the peer
	BytesOut       uint64        `json:"bytes_out"`            // sent to the peer
	Allowed        []string      `json:"allowed,omitempty"`    // the peer's ports in the relay config
	Registered     []string      `json:"registered,omitempty"` // ports it holds now
	Refused        []PortRefusal `json:"refused,omitempty"`
	SessionsActive int64         `json:"sessions_active"`
	SessionsOpened uint64        `json:"sessions_opened"`
	// DialFailures counts public TCP connections reset because the peer
	// refused the flow inside the tunnel or did not answer it in time.
	DialFailures uint64 `json:"dial_failures"`
	// Stats holds the peer's other counters and gauges (connected: its
	// control session is up), by reflection: see CountersOf.
	Stats Counters `json:"stats,omitzero"`
	// ControlRefusals counts control connections the relay refused or
	// ended, by reason ("replaced", "hello_timeout", "bad_hello",
	// "too_long", "bad_message", "rate", "queue_full", "unsupported_version").
	ControlRefusals map[string]uint64 `json:"control_refusals,omitempty"`
}

// Session is one live flow.
type Session struct {
	ID       uint64 `json:"id"`
	Mapping  string `json:"mapping"`
	Protocol string `json:"protocol"` // "tcp" or "udp"
	// Client is the real client address, also when the flow came through the relay.
	Client  string `json:"client"`
	Public  string `json:"public,omitempty"` // the address and port the client reached
	Target  string `json:"target"`           // the target address dialed
	Ingress string `json:"ingress,omitempty"`
	Peer    string `json:"peer,omitempty"` // relay peer, on a relay

	Started    time.Time `json:"started"`
	LastActive time.Time `json:"last_active,omitzero"`
	BytesIn    uint64    `json:"bytes_in"`  // client to target
	BytesOut   uint64    `json:"bytes_out"` // target to client

	// AgeSeconds and IdleSeconds are filled by the server from Started and
	// LastActive when a Source leaves them zero.
	AgeSeconds  float64 `json:"age_seconds"`
	IdleSeconds float64 `json:"idle_seconds"`
}

// ReloadResult says what a reload changed, by mapping name (by peer name
// on a relay).
type ReloadResult struct {
	Added   []string `json:"added"`
	Changed []string `json:"changed"`
	Removed []string `json:"removed"`
	// SessionsClosed counts sessions closed because their mapping went away,
	// was disabled, or no longer admits them.
	SessionsClosed int `json:"sessions_closed"`
	// Restart lists the changed settings the running process cannot apply,
	// each as "restart natbox to apply KEY"; the rest of the reload applied.
	Restart []string `json:"restart,omitempty"`
}

// ConfigError is a config that failed to load on reload: nothing changed. Each
// line is one problem, FILE:LINE: key path: problem; fix.
type ConfigError struct {
	Lines []string
}

func (e *ConfigError) Error() string {
	return "invalid config, nothing changed:\n" + strings.Join(e.Lines, "\n")
}

// InvalidConfig wraps a config loading error (one problem per line, as
// conf.Errors prints them) so the server answers 422 with the lines.
func InvalidConfig(err error) error {
	if err == nil {
		return nil
	}
	var ce *ConfigError
	if errors.As(err, &ce) {
		return err
	}
	var lines []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return &ConfigError{Lines: lines}
}
