// Package app wires natbox's pieces into the two programs it runs: the
// appliance (TUN gateway and/or relay uplink in front of the forwarder) and the
// relay. It owns start-up order, reload and shutdown order; the packages it
// wires own everything else.
package app

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
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

	tunName   string         // the kernel TUN natbox created; "" without one
	ingresses []*ingress     // one netstack each: the TUN's, the uplink's; status reads their counters
	uplink    *tunnel.Uplink // nil without [uplink]
	admin     *admin.Server  // nil without a control socket or HTTP listener
	live      *liveSettings  // [log] and [admin] as running
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
}

// NewAppliance builds every ingress the config names and starts them. On
// error everything already started is closed again.
func NewAppliance(cfg *conf.Config, opts Options, log *zap.Logger) (_ *Appliance, err error) {
	// a is not the named result: "return nil, err" must not hide it from the
	// deferred clean-up.
	a := &Appliance{log: log, cfg: cfg, live: newLiveSettings("natbox", cfg.Log, cfg.Admin)}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	a.engine, err = forwarder.New(cfg, forwarder.Options{
		Dialer: opts.Dialer,
		Clock:  opts.Clock,
		// Always handed over: the engine writes to it only while the current
		// config has [log] connections = true, so a reload can switch it on.
		ConnLog: log.Named("conn"),
	}, log.Named("forwarder"))
	if err != nil {
		return nil, err
	}
	a.teardown.add(a.engine.Close)
	if cfg.TUN != nil {
		if err := a.startTUN(cfg.TUN, opts.TUNDevice); err != nil {
			return nil, err
		}
	}
	if cfg.Uplink != nil {
		if err := a.startUplink(cfg); err != nil {
			return nil, err
		}
	}
	a.addressWarning = doctor.AddressWarning(cfg)
	src := applianceSource{a: a, started: time.Now(), version: opts.Version}
	if a.admin, err = startAdmin(cfg.Admin, src, a.ready, log); err != nil {
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

func (a *Appliance) startTUN(c *conf.TUN, dev tun.Device) error {
	name := c.Name
	if dev == nil {
		var err error
		if dev, err = netstack.CreateTUN(c.Name, c.MTU); err != nil {
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
	in, err := newIngress(conf.IngressTUN, dev, netstack.Config{MTU: c.MTU, Addresses: c.Addresses}, a.engine, a.log.Named("tun"))
	if err != nil {
		return err
	}
	a.teardown.add(in.Close)
	a.ingresses = append(a.ingresses, in)
	a.log.Info("tun up", zap.String("name", name), zap.Int("mtu", c.MTU),
		zap.Stringers("addresses", c.Addresses), zap.Stringers("routes", c.Routes))
	return nil
}

func (a *Appliance) startUplink(cfg *conf.Config) error {
	u := cfg.Uplink
	stackSide, outer := netstack.Direct(u.MTU)
	in, err := newIngress(conf.IngressUplink, stackSide, netstack.Config{
		MTU:       u.MTU,
		Addresses: tunnel.TunnelPrefixes(u.Address),
	}, a.engine, a.log.Named("uplink"))
	if err != nil {
		outer.Close()
		return err
	}
	a.teardown.add(in.Close)
	a.ingresses = append(a.ingresses, in)
	up, err := tunnel.NewUplink(u, outer, in.stack, a.log.Named("uplink"))
	if err != nil {
		return err
	}
	a.uplink = up
	a.teardown.add(up.Close)
	up.SetWanted(uplinkPorts(cfg, time.Now()))
	return nil
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

// Run blocks until ctx is done, then shuts down in order: stop admitting,
// drain with the configured grace, close inputs, remove routes.
func (a *Appliance) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	if a.uplink != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.uplink.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
				select {
				case errc <- fmt.Errorf("uplink: %w", err):
				default:
				}
			}
		}()
	}
	runAdmin(ctx, a.admin, &wg, a.log)
	if cfg := a.config(); cfg.Admin.Watch {
		goWatchConfig(ctx, cfg.Path, cfg.Digest, func() { _, _ = a.Reload() }, &wg, a.log)
	}
	a.log.Info("natbox running", zap.Int("mappings", len(a.config().Mappings)))
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	a.log.Info("stopping: draining sessions", zap.Duration("grace", a.config().Limits.ShutdownGrace.D()))
	grace, cancel := context.WithTimeout(context.Background(), a.config().Limits.ShutdownGrace.D())
	if err := a.engine.Shutdown(grace); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		a.log.Warn("drain", zap.Error(err))
	}
	cancel()
	err := a.Close()
	wg.Wait()
	a.log.Info("stopped")
	return errors.Join(runErr, err)
}

// Close stops everything at once, newest first; it is idempotent.
func (a *Appliance) Close() error { return a.teardown.run() }

// ready reports whether every ingress is up, for /readyz.
func (a *Appliance) ready() error {
	if a.uplink != nil {
		if st := a.uplink.Status(); st.State != tunnel.StateRegistered {
			return fmt.Errorf("uplink %s: %s", st.Relay, st.State)
		}
	}
	return nil
}

// Engine is the forwarder, for status and tests.
func (a *Appliance) Engine() *forwarder.Engine { return a.engine }

// Uplink is the relay uplink, or nil.
func (a *Appliance) Uplink() *tunnel.Uplink { return a.uplink }

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
	applyLive()
	a.cfg = next
	if a.uplink != nil {
		a.uplink.SetWanted(uplinkPorts(next, time.Now()))
	}
	a.log.Info("reloaded", zap.Strings("added", diff.Added), zap.Strings("changed", diff.Changed), zap.Strings("removed", diff.Removed))
	if len(restart) > 0 {
		a.log.Warn("reloaded, but some changes need a restart", zap.Strings("restart", restart))
	}
	return Reloaded{Diff: diff, Restart: restart}, nil
}

// reloadable rejects changes a running process cannot apply in place.
func reloadable(old, next *conf.Config) error {
	var errs []error
	if !reflect.DeepEqual(old.TUN, next.TUN) {
		errs = append(errs, errors.New("[tun] changed: restart natbox to apply a new TUN device, MTU, addresses or routes"))
	}
	if (old.Uplink == nil) != (next.Uplink == nil) || (old.Uplink != nil && *old.Uplink != *next.Uplink) {
		errs = append(errs, errors.New("[uplink] changed: restart natbox to apply a new tunnel"))
	}
	return errors.Join(errs...)
}

// ingress joins one netstack.Stack to the forwarder: it is the stack's
// Handler and the forwarder's Ingress.
type ingress struct {
	name   string
	engine *forwarder.Engine
	stack  *netstack.Stack
	ready  atomic.Bool // set once stack is assigned; the stack may deliver first
}

func newIngress(name string, dev tun.Device, cfg netstack.Config, e *forwarder.Engine, log *zap.Logger) (*ingress, error) {
	in := &ingress{name: name, engine: e}
	s, err := netstack.New(dev, cfg, in, log)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("%s stack: %w", name, err)
	}
	in.stack = s
	in.ready.Store(true)
	return in, nil
}

func (in *ingress) Name() string { return in.name }

func (in *ingress) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	if !in.ready.Load() {
		return errors.New("ingress starting")
	}
	return in.stack.WriteUDP(src, dst, payload)
}

func (in *ingress) HandleTCP(r *netstack.TCPRequest) {
	in.engine.HandleTCP(in, r.Src, r.Dst, r)
}

func (in *ingress) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	in.engine.HandleUDP(in, src, dst, payload)
}

func (in *ingress) Close() error { return in.stack.Close() }
