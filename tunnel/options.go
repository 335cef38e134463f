package tunnel

import (
	"net/netip"
	"time"
)

// Defaults for the knobs an Option can change.
const (
	defaultPingInterval   = 10 * time.Second
	defaultPingTimeout    = 30 * time.Second
	defaultReleaseGrace   = 15 * time.Second
	defaultUDPIdleTimeout = 2 * time.Minute
	defaultDialTimeout    = 5 * time.Second
	controlWriteTimeout   = 10 * time.Second
	defaultMTU            = 1420 // WireGuard's usual tunnel MTU, when neither config nor device says
)

// Option changes a default of a Relay or an Uplink.
type Option func(*options)

type options struct {
	pingInterval   time.Duration
	pingTimeout    time.Duration
	helloTimeout   time.Duration
	releaseGrace   time.Duration
	udpIdleTimeout time.Duration
	tcpIdleTimeout time.Duration
	version        string

	streamPending   int           // relay: TCP transport connections authenticating at once
	streamHandshake time.Duration // relay: deadline of a TCP transport connection's TLS and proof
	fallbackAfter   time.Duration // uplink "auto": no reply over UDP this long moves to TCP
	probeEvery      time.Duration // uplink on TCP: how often to try UDP again
	transportTick   time.Duration // uplink: how often the transport ladder looks
	lossWindow      time.Duration // uplink "auto": see WithLossFallback
	lossMinMessages uint64        // uplink "auto": see WithLossFallback
	lossHold        time.Duration // uplink "auto": see WithLossFallback
	bufferMemory    int           // uplink: its side's buffer_memory (0: unbounded), sizes the gates
	// checksumsOptional: see WithChecksumsOptional; nil: the stack verifies.
	checksumsOptional func([]netip.Prefix)
	warmMax           int           // see WithWarmStreams
	warmIdle          time.Duration // see WithWarmStreams
}

func buildOptions(opts []Option) options {
	o := options{
		pingInterval:   defaultPingInterval,
		pingTimeout:    defaultPingTimeout,
		helloTimeout:   defaultHelloTimeout,
		releaseGrace:   defaultReleaseGrace,
		udpIdleTimeout: defaultUDPIdleTimeout,
		version:        "natbox",

		streamPending:   defaultStreamPending,
		streamHandshake: defaultStreamHandshake,
		fallbackAfter:   defaultFallbackAfter,
		probeEvery:      defaultProbeEvery,
		transportTick:   defaultTransportTick,
		lossWindow:      defaultLossWindow,
		lossMinMessages: defaultLossMinMessages,
		lossHold:        defaultLossHold,
		warmMax:         defaultWarmMax,
		warmIdle:        defaultWarmIdle,
	}
	for _, f := range opts {
		f(&o)
	}
	return o
}

// WithPing sets how often the uplink pings the relay over the control
// connection and how long either side waits for any message before it
// declares the connection dead (default 10 s and 30 s).
func WithPing(interval, timeout time.Duration) Option {
	return func(o *options) { o.pingInterval, o.pingTimeout = interval, timeout }
}

// WithHelloTimeout sets how long the relay waits for a new control
// connection's hello (default 5 s).
func WithHelloTimeout(d time.Duration) Option { return func(o *options) { o.helloTimeout = d } }

// WithReleaseGrace sets how long the relay keeps a peer's ports after its
// control connection ends (default 15 s), so an appliance that roams or
// reconnects does not lose its ports to a race.
func WithReleaseGrace(d time.Duration) Option { return func(o *options) { o.releaseGrace = d } }

// WithUDPIdleTimeout sets when the relay forgets an idle public UDP client
// session of a port whose appliance did not send the mapping's idle timeout
// with its register (an older appliance); default 2 min.
func WithUDPIdleTimeout(d time.Duration) Option { return func(o *options) { o.udpIdleTimeout = d } }

// WithTCPIdleTimeout sets when the relay closes a public TCP flow with no
// traffic either way (default 0: never; the appliance's mapping owns idleness).
func WithTCPIdleTimeout(d time.Duration) Option { return func(o *options) { o.tcpIdleTimeout = d } }

// WithVersion sets the software version sent in the control hello, for logs.
func WithVersion(v string) Option { return func(o *options) { o.version = v } }

// WithStreamLimits sets how many TCP transport connections the relay lets
// authenticate at once (default 64) and their TLS and proof deadline
// (default 10 s).
func WithStreamLimits(pending int, handshake time.Duration) Option {
	return func(o *options) { o.streamPending, o.streamHandshake = pending, handshake }
}

// WithTransportLadder sets when an uplink with transport "auto" moves to
// TCP (no reply over UDP for fallback; default 15 s), how often it tries UDP
// again while on TCP (probe; default 30 s), and how often it checks (tick;
// default 1 s).
func WithTransportLadder(fallback, probe, tick time.Duration) Option {
	return func(o *options) { o.fallbackAfter, o.probeEvery, o.transportTick = fallback, probe, tick }
}

// WithLossFallback sets how an uplink with transport "auto" judges UDP's
// loss (uplink.loss_fallback): over windows of at most window (default 1 min)
// that saw at least minMessages of the relay's messages (default 20 000),
// and for how long a lossy window first moves it to TCP (hold, default
// 10 min, doubled each time UDP is lossy again, at most maxLossHold).
func WithLossFallback(window time.Duration, minMessages int, hold time.Duration) Option {
	return func(o *options) { o.lossWindow, o.lossMinMessages, o.lossHold = window, uint64(minMessages), hold }
}

// WithBufferMemory gives an uplink its side's buffer budget
// (limits.buffer_memory, 0: unbounded): it sizes how many packets the
// uplink's WireGuard device may hold (the relay's comes from
// relay.buffer_memory).
func WithBufferMemory(total int) Option { return func(o *options) { o.bufferMemory = total } }

// WithChecksumsOptional says that the stack behind the device does not
// verify the TCP and UDP checksums of what the tunnel carries (a
// netstack.Direct pair: WireGuard authenticated every packet), which the
// control hello tells the other side. set is then called, whenever it
// changes, with the destinations whose stacks said the same: the uplink's
// relay (everything: the relay's packets go to public clients' addresses)
// or the relay's connected peers (their tunnel addresses); nil for none.
// A side's segments to those leave the TCP checksum 0
// (netstack.Stack.SetChecksumsOptional). An older peer's hello says
// nothing, and gets every checksum.
func WithChecksumsOptional(set func([]netip.Prefix)) Option {
	return func(o *options) { o.checksumsOptional = set }
}

// WithWarmStreams bounds the warm streams (warm.go): a relay keeps at most
// max open toward each peer (default 128; 0: none, every public connection
// opens its own) and closes one idle for idle (default 60 s); an appliance
// holds at most 2 x max waiting for their header, for at most 2 x idle.
func WithWarmStreams(max int, idle time.Duration) Option {
	return func(o *options) { o.warmMax, o.warmIdle = max, idle }
}
