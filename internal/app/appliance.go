// Package app wires natbox's pieces into the two programs it runs: the
// appliance (TUN gateway and/or relay uplink in front of the forwarder) and the
// relay. It owns start-up order, reload and shutdown order; the packages it
// wires own everything else.
//
// Lifecycle. Every piece (netstack.Stack, forwarder.Engine, tunnel.Uplink,
// tunnel.Relay, admin.Server) keeps one contract: New only builds (opens
// sockets and devices, starts none of natbox's goroutines), Run(ctx) starts
// and returns when everything it started has stopped, Close is idempotent
// and ends Run, and Run after Close fails at once. No packet reaches a
// handler before its stack's Run, so every piece is built and wired first
// and nothing waits for another to become ready. wireguard-go starts its
// own routines in device.NewDevice and gVisor its processors in stack.New;
// both wait for packets that only a running stack moves.
//
// Close order, newest first (the reverse of construction), each piece
// registered in a teardown as soon as it is built:
//
//	appliance: admin, each uplink then its stack (the last [[uplink]] first),
//	           TUN stack, TUN link and routes, forwarder
//	relay:     admin, relay (public sockets, its engine, WireGuard), relay stack
//
// On ctx's end the appliance first stops admitting and drains for
// limits.shutdown_grace (Engine.Shutdown) while the stacks and the uplink
// still carry the sessions, then closes in that order; Run returns once
// every piece's Run has.
package app

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/internal/doctor"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// Appliance is a running natbox appliance.
type Appliance struct {
	log    *zap.Logger
	engine *forwarder.Engine

	mu  sync.Mutex // guards cfg and serializes Reload
	cfg *conf.Config

	stackBufs int        // each ingress stack's TCP buffer budget (limits.buffer_memory)
	tunName   string     // the kernel TUN natbox created; "" without one
	ingresses []*ingress // one netstack each: the TUN's, each uplink's; status reads their counters
	// uplinks are the relay tunnels, one per cfg.Uplinks element and in its
	// order (a reload cannot change them).
	uplinks []*tunnel.Uplink
	admin   *admin.Server // nil without a control socket or HTTP listener
	live    *liveSettings // [log] and [admin] as running
	// addressWarning is natbox doctor's finding about this host's addresses
	// (carrier-grade or double NAT without an uplink), taken at start.
	addressWarning string

	teardown teardown
}

// Options are the seams tests and the demo use.
type Options struct {
	Dialer  forwarder.Dialer // egress to targets; nil: the host's network
	Clock   forwarder.Clock  // nil: the wall clock
	Version string           // shown by natbox status
	// TUNDevice, when set, replaces the kernel TUN of [tun]: no device is
	// created and no link or route is touched. In-process tests pass one
	// side of a netstack.Pipe here and drive a client stack on the other.
	TUNDevice tun.Device
	// Tunnel changes defaults of every uplink (tests shorten the control
	// ping so that a relay gone is noticed in seconds).
	Tunnel []tunnel.Option
}

// NewAppliance builds every piece the config names (see the lifecycle at
// the top of this file) and wires them; Run starts them. On error
// everything already built is closed again.
func NewAppliance(cfg *conf.Config, opts Options, log *zap.Logger) (_ *Appliance, err error) {
	// a is not the named result: "return nil, err" must not hide it from the
	// deferred clean-up.
	a := &Appliance{log: log, cfg: cfg, live: newLiveSettings("natbox", cfg.Log, cfg.Admin)}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	stacks := 0
	if cfg.TUN != nil {
		stacks++
	}
	stacks += len(cfg.Uplinks)
	var fwdBufs int
	fwdBufs, a.stackBufs = conf.BufferShares(cfg.Limits.BufferMemory, stacks)
	a.engine, err = forwarder.New(cfg, forwarder.Options{
		BufferBudget: fwdBufs,
		Dialer:       opts.Dialer,
		Clock:        opts.Clock,
		// Always handed over: the engine writes to it only while the current
		// config has [log] connections = true, so a reload can switch it on.
		ConnLog: log.Named("conn"),
	}, log.Named("forwarder"))
	if err != nil {
		return nil, err
	}
	a.teardown.add(a.engine.Close)
	if cfg.TUN != nil {
		if err := a.addTUN(cfg.TUN, opts.TUNDevice); err != nil {
			return nil, err
		}
	}
	for i := range cfg.Uplinks {
		if err := a.addUplink(cfg, &cfg.Uplinks[i], opts.Tunnel); err != nil {
			return nil, err
		}
	}
	a.addressWarning = doctor.AddressWarning(cfg)
	src := applianceSource{a: a, started: time.Now(), version: opts.Version}
	if a.admin, err = newAdmin(cfg.Admin, src, a.ready, log); err != nil {
		return nil, err
	}
	if a.admin != nil {
		a.teardown.add(a.admin.Close)
	}
	a.live.admin = a.admin
	return a, nil
}

// SetLogLevel hands over the process logger's level, so that a reload
// applies [log] level. Without it a changed level is reported as needing a
// restart (the level was fixed by --log-level).
func (a *Appliance) SetLogLevel(l *zap.AtomicLevel) { a.live.setLevel(l) }

// addTUN builds the TUN ingress: the kernel device with its link and routes
// (unless the caller passed dev), and its stack.
func (a *Appliance) addTUN(c *conf.TUN, dev tun.Device) error {
	name := c.Name
	if dev == nil {
		var err error
		if dev, err = netstack.CreateTUN(c.Name, c.MTU, c.Queues); err != nil {
			return fmt.Errorf("create TUN %q: %w (natbox needs CAP_NET_ADMIN and /dev/net/tun; in a container: --cap-add NET_ADMIN --device /dev/net/tun)", c.Name, err)
		}
		if name, err = dev.Name(); err != nil {
			dev.Close()
			return fmt.Errorf("TUN name: %w", err)
		}
		undo, err := tunLink(name, c.MTU, c.Routes)
		if err != nil {
			dev.Close()
			return err
		}
		a.teardown.add(undo)
		a.tunName = name
	}
	in, err := newIngress(conf.IngressTUN, dev, netstack.Config{MTU: c.MTU, Addresses: c.Addresses, TCP: stackTCP(a.stackBufs)}, a.engine, a.log.Named("tun"))
	if err != nil {
		return err
	}
	a.teardown.add(in.Close)
	a.ingresses = append(a.ingresses, in)
	a.log.Info("tun ready", zap.String("name", name), zap.Int("mtu", c.MTU),
		zap.Stringers("addresses", c.Addresses), zap.Stringers("routes", c.Routes))
	return nil
}

// addUplink builds one relay uplink: its stack, and the WireGuard device
// that feeds the stack through a netstack.Direct pair. Each [[uplink]] has
// its own; they share only the forwarder.
func (a *Appliance) addUplink(cfg *conf.Config, u *conf.Uplink, opts []tunnel.Option) error {
	log := a.log.Named("uplink")
	label := conf.IngressUplink
	if len(cfg.Uplinks) > 1 {
		log = log.With(zap.String("relay", u.Relay))
		label = uplinkLabel(u)
	}
	// The link takes max_mtu (a path probe's size); the path MTU starts at
	// mtu, and the uplink raises it where the probe passes.
	stackSide, outer := netstack.Direct(u.MaxMTU)
	tcp := stackTCP(a.stackBufs)
	// No SYN cookies: every SYN through the tunnel is the relay's, for a
	// public client whose handshake the relay's kernel completed (bounded
	// there per peer) or a warm stream (tunnel/warm.go); a cookie would
	// take its window scaling away (gVisor does not encode it).
	tcp.CookiePortThreshold = -1
	in, err := newIngress(conf.IngressUplink, stackSide, netstack.Config{
		MTU:       u.MaxMTU,
		PathMTU:   u.MTU,
		Addresses: tunnel.TunnelPrefixes(u.Address),
		TCP:       tcp,
	}, a.engine, log)
	if err != nil {
		outer.Close()
		return err
	}
	in.label = label
	a.teardown.add(in.Close)
	a.ingresses = append(a.ingresses, in)
	// The uplinks share limits.buffer_memory's quarter for their devices.
	// The Direct pair trusts WireGuard's authentication: checksums optional.
	opts = append(opts[:len(opts):len(opts)], tunnel.WithBufferMemory(int(cfg.Limits.BufferMemory)/len(cfg.Uplinks)),
		tunnel.WithChecksumsOptional(in.stack.SetChecksumsOptional))
	up, err := tunnel.NewUplink(u, outer, in.stack, log, opts...)
	if err != nil {
		return err
	}
	in.uplink = up
	a.uplinks = append(a.uplinks, up)
	a.teardown.add(up.Close)
	up.SetWanted(uplinkPorts(cfg, time.Now()))
	return nil
}

// uplinkLabel names an uplink's stack in status and metrics when there are
// several: "uplink@relay.example.net:51820".
func uplinkLabel(u *conf.Uplink) string { return conf.IngressUplink + "@" + u.Name() }

// stackTimeWait is how long a closed TCP connection stays in TIME_WAIT in
// natbox's stacks. gVisor keeps a whole endpoint there (a few KiB with its
// timers and tables, against a kernel's ~200-byte minisock): with its
// default 60 s, the benchmark's connection churn (3 500 a second) kept
// every connection of the run, and they, not buffers, made the gateway's
// peak memory (BENCHMARKS.md, "Memory"). A new SYN for a TIME_WAIT 4-tuple
// is accepted anyway (netstack's reopenTimeWait), so one second only
// bounds that memory; under churn netstack's MaxClosing (256 endpoints)
// cuts it shorter.
const stackTimeWait = time.Second

// stackTCP is the TCP config of natbox's stacks: bufs is the stack's share
// of buffer_memory.
func stackTCP(bufs int) netstack.TCPConfig {
	return netstack.TCPConfig{BufferBudget: bufs, TimeWait: stackTimeWait}
}

// uplinkPorts lists what the relay must hold for the mappings served
// through it, with their UDP idle timeouts for the relay's sessions.
func uplinkPorts(cfg *conf.Config, now time.Time) []tunnel.WantedPort {
	var ports []tunnel.WantedPort
	for _, m := range cfg.EnabledMappings(now) {
		if m.ServesIngress(conf.IngressUplink, cfg) {
			w := tunnel.WantedPort{Spec: conf.PortSpec{Proto: m.Protocol, Ports: m.Listen.Ports}}
			if m.Protocol.Has(conf.UDP) {
				w.UDPIdle = m.IdleTimeoutFor(conf.UDP)
			}
			ports = append(ports, w)
		}
	}
	return ports
}

// Run starts every piece (see the lifecycle at the top of this file) and
// blocks until ctx is done, Close is called or a piece fails; then it shuts
// down in order: stop admitting, drain with the configured grace, Close.
// It returns once every piece's Run has returned. After Close it fails at
// once.
func (a *Appliance) Run(ctx context.Context) error {
	if a.teardown.isDone() {
		return errors.New("appliance closed")
	}
	// The pieces run until Close stops them, not until ctx ends: the
	// stacks and the uplink must carry the sessions the drain waits for.
	pieces, stopPieces := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPieces()
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	run := func(name string, fn func(context.Context) error) {
		goRun(pieces, name, fn, &wg, errc)
	}
	run("forwarder", a.engine.Run)
	for _, in := range a.ingresses {
		run(in.name+" stack", in.stack.Run)
	}
	for i, up := range a.uplinks {
		run("uplink "+a.config().Uplinks[i].Relay, up.Run)
	}
	runAdmin(pieces, a.admin, &wg, a.log)
	watching, stopWatching := context.WithCancel(ctx)
	defer stopWatching()
	if cfg := a.config(); cfg.Admin.Watch {
		goWatchConfig(watching, cfg.Path, cfg.Digest, func() { _, _ = a.Reload() }, &wg, a.log)
	}
	a.log.Info("natbox running", zap.Int("mappings", len(a.config().Mappings)))
	var runErr error
	select {
	case <-ctx.Done():
	case <-a.teardown.closed():
	case runErr = <-errc:
	}
	stopWatching()
	a.log.Info("stopping: draining sessions", zap.Duration("grace", a.config().Limits.ShutdownGrace.D()))
	grace, cancel := context.WithTimeout(context.Background(), a.config().Limits.ShutdownGrace.D())
	if err := a.engine.Shutdown(grace); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		a.log.Warn("drain", zap.Error(err))
	}
	cancel()
	err := a.Close()
	stopPieces()
	wg.Wait()
	a.log.Info("stopped")
	return errors.Join(runErr, err)
}

// Close stops everything at once, newest first; it is idempotent.
func (a *Appliance) Close() error { return a.teardown.run() }

// ready reports whether every ingress is up, for /readyz. With several
// relays one registered uplink is enough: public clients reach the box
// through it, and restarting natbox would not bring the others back.
func (a *Appliance) ready() error {
	var down []string
	for _, up := range a.uplinks {
		st := up.Status()
		if st.State == tunnel.StateRegistered {
			return nil
		}
		down = append(down, fmt.Sprintf("uplink %s: %s", st.Relay, st.State))
	}
	if len(down) > 0 {
		return errors.New(strings.Join(down, "; "))
	}
	return nil
}

// Engine is the forwarder, for status and tests.
func (a *Appliance) Engine() *forwarder.Engine { return a.engine }

// Uplinks are the relay uplinks in config order, for status and tests.
func (a *Appliance) Uplinks() []*tunnel.Uplink { return a.uplinks }

func (a *Appliance) config() *conf.Config {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cfg
}

// Reload re-reads the config file and applies it atomically: an invalid file
// changes nothing and its errors come back. Settings that apply only at
// start come back in Restart (the rest is applied). Either way the outcome
// is logged, so callers (SIGHUP, the file watcher) need not.
func (a *Appliance) Reload() (Reloaded, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	next, warnings, err := conf.Load(a.cfg.Path)
	if err != nil {
		a.log.Warn("reload refused: config has errors; nothing changed", zap.Error(err))
		return Reloaded{}, err
	}
	if err := reloadable(a.cfg, next); err != nil {
		a.log.Warn("reload refused; nothing changed", zap.Error(err))
		return Reloaded{}, err
	}
	applyLive, restart, err := a.live.prepare(next.Log, next.Admin)
	if err != nil {
		a.log.Warn("reload refused; nothing changed", zap.Error(err))
		return Reloaded{}, err
	}
	for _, w := range warnings {
		a.log.Warn("config", zap.Stringer("warning", w))
	}
	diff, err := a.engine.Reload(next)
	if err != nil {
		a.log.Warn("reload refused; nothing changed", zap.Error(err))
		return Reloaded{}, err
	}
	restart = append(restart, runtimeRestart("limits", a.cfg.Limits.Runtime(), next.Limits.Runtime())...)
	applyLive()
	a.cfg = next
	for _, up := range a.uplinks {
		up.SetWanted(uplinkPorts(next, time.Now()))
	}
	a.log.Info("reloaded", zap.Strings("added", diff.Added), zap.Strings("changed", diff.Changed), zap.Strings("removed", diff.Removed))
	if len(restart) > 0 {
		a.log.Warn("reloaded, but some changes need a restart", zap.Strings("restart", restart))
	}
	return Reloaded{Diff: diff, Restart: restart}, nil
}

// runtimeRestart lists the section's process-wide settings that changed
// between old and next: they apply only at start.
func runtimeRestart(section string, old, next conf.Runtime) []string {
	var keys []string
	for _, s := range []struct {
		key     string
		changed bool
	}{
		{"buffer_memory", old.BufferMemory != next.BufferMemory},
		{"memory_limit", old.MemoryLimit != next.MemoryLimit},
		{"procs", old.Procs != next.Procs},
	} {
		if s.changed {
			keys = append(keys, "restart natbox to apply "+section+"."+s.key)
		}
	}
	return keys
}

// reloadable rejects changes a running process cannot apply in place.
func reloadable(old, next *conf.Config) error {
	var errs []error
	if !reflect.DeepEqual(old.TUN, next.TUN) {
		errs = append(errs, errors.New("[tun] changed: restart natbox to apply a new TUN device, MTU, queues, addresses or routes"))
	}
	if !slices.Equal(old.Uplinks, next.Uplinks) {
		errs = append(errs, errors.New("[uplink] changed: restart natbox to apply a new tunnel or another set of relays"))
	}
	return errors.Join(errs...)
}

// ingress joins one netstack.Stack to the forwarder: it is the stack's
// Handler and the forwarder's Ingress. stack is set before the stack runs,
// so before any flow can arrive.
type ingress struct {
	name   string // conf.IngressTUN or conf.IngressUplink, what mappings' ingress lists name
	label  string // the stack's name in status and metrics; "" means name
	engine *forwarder.Engine
	stack  *netstack.Stack
	// uplink is the uplink an uplink stack serves, whose warm streams its
	// handler passes on (tunnel/warm.go); set before the stack runs.
	uplink *tunnel.Uplink
}

// statusName is the stack's key in status: "tun", "uplink", or one uplink
// of several, "uplink@relay.example.net:51820".
func (in *ingress) statusName() string {
	if in.label != "" {
		return in.label
	}
	return in.name
}

func newIngress(name string, dev tun.Device, cfg netstack.Config, e *forwarder.Engine, log *zap.Logger) (*ingress, error) {
	in := &ingress{name: name, engine: e}
	s, err := netstack.New(dev, cfg, in, log)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("%s stack: %w", name, err)
	}
	in.stack = s
	return in, nil
}

func (in *ingress) Name() string { return in.name }

func (in *ingress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	return in.stack.WriteUDP(src, dst, payload)
}

func (in *ingress) HandleTCP(r *netstack.TCPRequest) {
	if in.uplink != nil && in.uplink.ServeWarm(r.Src, r.Dst, r, in.serveTCP) {
		return
	}
	in.engine.HandleTCP(in, r.Src, r.Dst, r)
}

// serveTCP is a relayed flow that came on a warm stream.
func (in *ingress) serveTCP(src, dst netip.AddrPort, a forwarder.TCPAttempt) {
	in.engine.HandleTCP(in, src, dst, a)
}

func (in *ingress) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	in.engine.HandleUDP(in, src, dst, payload)
}

func (in *ingress) Close() error { return in.stack.Close() }
