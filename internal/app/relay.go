package app

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/admin"
	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/forwarder"
	"github.com/natbox/natbox/netstack"
	"github.com/natbox/natbox/tunnel"
)

// RelayNode is a running "natbox relay": a WireGuard listener whose tunnel
// ends in a netstack, and the relay that opens public listeners for the ports
// its peers register.
type RelayNode struct {
	log   *zap.Logger
	stack *netstack.Stack
	relay *tunnel.Relay
	h     *relayHandler // the stack's handler; its relay is set before the stack runs
	admin *admin.Server
	live  *liveSettings // [log] and [admin] as running

	mu  sync.Mutex // guards cfg and serializes Reload
	cfg *conf.RelayConfig

	teardown teardown
}

// NewRelayNode builds the relay's stack, relay (its WireGuard device bound
// to relay.listen) and admin server and wires them; Run starts them.
func NewRelayNode(cfg *conf.RelayConfig, version string, log *zap.Logger) (*RelayNode, error) {
	n := &RelayNode{log: log, cfg: cfg, h: &relayHandler{}, live: newLiveSettings("natbox relay", cfg.Log, cfg.Admin)}
	// max_mtu: a peer whose path probe passed sends packets that large, and
	// the relay's TCP follows each peer's MSS (tunnel/pathmtu.go).
	stackSide, outer := netstack.Direct(cfg.Relay.MaxMTU)
	_, stackBufs := conf.BufferShares(cfg.Relay.BufferMemory, 1)
	s, err := netstack.New(stackSide, netstack.Config{
		MTU:       cfg.Relay.MaxMTU,
		Addresses: tunnel.TunnelPrefixes(cfg.Relay.Address),
		// No SYN cookies: SYNs come only from authenticated peers and all
		// but control connections are rejected at once, while a cookie
		// listener's wildcard port would make the relay's DialTCP from a
		// client's source port of the same number fail to bind.
		TCP: netstack.TCPConfig{CookiePortThreshold: -1, BufferBudget: stackBufs, TimeWait: stackTimeWait},
	}, n.h, log.Named("netstack"))
	if err != nil {
		stackSide.Close()
		outer.Close()
		return nil, fmt.Errorf("relay stack: %w", err)
	}
	n.stack = s
	n.teardown.add(s.Close)
	// The Direct pair trusts WireGuard's authentication: checksums optional.
	r, err := tunnel.NewRelay(cfg, outer, s, log.Named("relay"), tunnel.WithChecksumsOptional(s.SetChecksumsOptional))
	if err != nil {
		n.Close()
		return nil, err
	}
	n.relay = r
	n.teardown.add(r.Close)
	n.h.relay = r
	if n.admin, err = newAdmin(cfg.Admin, relaySource{n: n, started: time.Now(), version: version}, nil, log); err != nil {
		n.Close()
		return nil, err
	}
	if n.admin != nil {
		n.teardown.add(n.admin.Close)
	}
	n.live.admin = n.admin
	return n, nil
}

// SetLogLevel is Appliance.SetLogLevel for the relay.
func (n *RelayNode) SetLogLevel(l *zap.AtomicLevel) { n.live.setLevel(l) }

// Run starts the stack, the relay and the admin server and blocks until ctx
// is done, Close is called or a piece fails; then it closes everything
// (admin, relay, stack) and returns once every piece's Run has returned.
// After Close it fails at once.
func (n *RelayNode) Run(ctx context.Context) error {
	if n.teardown.isDone() {
		return errors.New("relay closed")
	}
	pieces, stopPieces := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPieces()
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	n.mu.Lock() // a reload may come in as soon as the admin server runs
	cfg := n.cfg
	n.mu.Unlock()
	goRun(pieces, "relay stack", n.stack.Run, &wg, errc)
	goRun(pieces, "relay", n.relay.Run, &wg, errc)
	runAdmin(pieces, n.admin, &wg, n.log)
	watching, stopWatching := context.WithCancel(ctx)
	defer stopWatching()
	if cfg.Admin.Watch {
		goWatchConfig(watching, cfg.Path, cfg.Digest, func() { _, _ = n.Reload() }, &wg, n.log)
	}
	var runErr error
	select {
	case <-ctx.Done():
	case <-n.teardown.closed():
	case runErr = <-errc:
	}
	stopWatching()
	err := n.Close()
	stopPieces()
	wg.Wait()
	return errors.Join(runErr, err)
}

// Relay is the tunnel relay, for status and tests.
func (n *RelayNode) Relay() *tunnel.Relay { return n.relay }

// Reload re-reads the relay config and applies peers, port allowances and
// limits without dropping other peers' flows, and [log] and [admin] as
// Appliance.Reload does. The outcome is logged.
func (n *RelayNode) Reload() (Reloaded, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	next, warnings, err := conf.LoadRelay(n.cfg.Path)
	var applyLive func()
	var restart []string
	if err == nil {
		applyLive, restart, err = n.live.prepare(next.Log, next.Admin)
	}
	if err == nil {
		err = n.relay.Reload(next)
	}
	switch {
	case errors.Is(err, tunnel.ErrPeersHalfApplied):
		n.log.Error("reload failed part-way", zap.Error(err))
		return Reloaded{}, err
	case err != nil:
		n.log.Warn("reload refused; nothing changed", zap.Error(err))
		return Reloaded{}, err
	}
	for _, w := range warnings {
		n.log.Warn("config", zap.Stringer("warning", w))
	}
	applyLive()
	restart = append(restart, runtimeRestart("relay", n.cfg.Relay.Runtime(), next.Relay.Runtime())...)
	res := Reloaded{Diff: peerDiff(n.cfg.Peers, next.Peers), Restart: restart}
	n.cfg = next
	n.log.Info("reloaded", zap.Int("peers", len(next.Peers)))
	if len(restart) > 0 {
		n.log.Warn("reloaded, but some changes need a restart", zap.Strings("restart", restart))
	}
	return res, nil
}

// peerDiff names the peers a relay reload added, changed and removed.
func peerDiff(old, next []conf.Peer) forwarder.Diff {
	var d forwarder.Diff
	was := make(map[string]conf.Peer, len(old))
	for _, p := range old {
		p.Line = 0
		was[p.Name] = p
	}
	for _, p := range next {
		p.Line = 0
		o, ok := was[p.Name]
		switch {
		case !ok:
			d.Added = append(d.Added, p.Name)
		case !reflect.DeepEqual(o, p):
			d.Changed = append(d.Changed, p.Name)
		}
		delete(was, p.Name)
	}
	for _, p := range old {
		if _, ok := was[p.Name]; ok {
			d.Removed = append(d.Removed, p.Name)
		}
	}
	return d
}

// Close stops everything, newest first; it is idempotent.
func (n *RelayNode) Close() error { return n.teardown.run() }

// relayHandler hands the relay stack's flows to the relay. The stack and
// the relay need each other (the relay originates flows through the
// stack), so the stack is built first with this handler and relay is set
// before the stack runs: no flow arrives before then.
type relayHandler struct{ relay *tunnel.Relay }

func (h *relayHandler) HandleTCP(r *netstack.TCPRequest) {
	h.relay.HandleTCP(r.Src, r.Dst, r.Accept, r.Reject)
}

func (h *relayHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) {
	h.relay.HandleUDP(src, dst, payload)
}
