package tunnel

import (
	"context"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// The tunnel MTU the uplink uses: uplink.mtu (1420), until a path probe
// shows that the path to the relay carries more, up to uplink.max_mtu.
// Where it does (a LAN with jumbo frames, relay and appliance on one host),
// fewer, larger packets halve the tunnel's CPU per byte (tunnel/BENCH.md).
//
// Over UDP only a path of one link is raised: the relay on this host or on
// a directly attached network (a LAN, a cloud subnet), whose MTU the kernel
// knows; the candidate is that MTU less the outer headers. A routed path
// is left at uplink.mtu: what lies past the first hop is unknown, and a
// probe cannot prove it, since wireguard-go's socket sends batches as UDP
// GSO without DF, which a router fragments silently, so a too-large probe
// would come back anyway (and the internet carries 1500 bytes regardless).
// Over the TCP transport the outer size does not matter; the candidate is
// max_mtu.
//
// The probe is an ICMP echo of the candidate size from the appliance's
// stack to the relay's tunnel address, whole inside one WireGuard message.
// Its echo comes back only if the relay's stack takes packets that large
// (relay.max_mtu; an older relay or a smaller max_mtu drops it) and the
// link carried the message both ways (a peer whose interface has a smaller
// MTU drops it).
// Then the stack takes the MTU (netstack SetPathMTU): new TCP
// connections' MSS and the appliance's UDP replies follow it, both ways
// (the relay's segments follow the MSS this side announces). Connections
// open before keep theirs; the relay's idle warm streams are replaced
// (warm_reset, warm.go). When no size passes, the tunnel stays at mtu.
// The probe runs in its own goroutine (pathLoop: a lost probe waits a
// second, and the control session's pings must not), after each control
// session's start, after a transport switch (which drops back to mtu
// first) and every pathReprobe while the uplink is registered.

// PathProber is what the uplink needs of its stack for the path probe;
// *netstack.Stack implements it.
type PathProber interface {
	ProbePath(ctx context.Context, src, dst netip.Addr, size int) error
	SetPathMTU(mtu int) error
}

// UplinkStack is the appliance stack an Uplink works through.
type UplinkStack interface {
	ControlDialer
	PathProber
}

const (
	probeTries  = 3
	probeWait   = time.Second
	pathReprobe = 10 * time.Minute
	// jumboTunnelMTU is a second candidate when the path's first hop is
	// larger: 9000-byte jumbo frames less IPv6, UDP and WireGuard headers.
	jumboTunnelMTU = 9000 - outerOverhead6
	// Outer headers of a WireGuard data message: IP, UDP and WireGuard's 32.
	outerOverhead4 = 20 + 8 + 32
	outerOverhead6 = 40 + 8 + 32
)

// pathState is the uplink's tunnel MTU and its probe counters.
type pathState struct {
	mtu    atomic.Int64  // in use now
	probes atomic.Uint64 // echo requests sent
	lost   atomic.Uint64 // of which no echo came back
	kick   chan struct{} // asks pathLoop to probe
}

// outerLimit is the largest tunnel MTU the outer path allows, or 0 when
// unknown (a routed path: then nothing larger than uplink.mtu is tried).
func (u *Uplink) outerLimit() int {
	if u.client.tcp.Load() {
		return u.cfg.MaxMTU // inside a TCP stream, any message size crosses
	}
	u.mu.Lock()
	ep := u.endpoint
	u.mu.Unlock()
	if !ep.IsValid() {
		return 0
	}
	pmtu := onLinkMTU(ep)
	if pmtu == 0 {
		return 0
	}
	if ep.Addr().Is4() {
		return pmtu - outerOverhead4
	}
	return pmtu - outerOverhead6
}

// probePath finds the tunnel MTU for the path in use now and applies it.
func (u *Uplink) probePath(ctx context.Context) {
	base, ceiling := u.cfg.MTU, min(u.cfg.MaxMTU, u.outerLimit())
	found := base
	for _, size := range []int{ceiling, jumboTunnelMTU} {
		if size <= base || size > ceiling {
			continue
		}
		if u.probeSize(ctx, size) {
			found = size
			break
		}
	}
	if ctx.Err() != nil {
		return
	}
	u.setPathMTU(found)
}

// probeSize tries one size probeTries times, as long as the outer path
// still allows it (the link or the transport may change meanwhile).
func (u *Uplink) probeSize(ctx context.Context, size int) bool {
	for range probeTries {
		if u.outerLimit() < size || ctx.Err() != nil {
			return false
		}
		tctx, cancel := context.WithTimeout(ctx, probeWait)
		u.path.probes.Add(1)
		err := u.dialer.ProbePath(tctx, u.cfg.Address, u.cfg.RelayAddress, size)
		cancel()
		if err == nil {
			return u.outerLimit() >= size
		}
		u.path.lost.Add(1)
		u.log.Debug("path probe", zap.Int("size", size), zap.Error(err))
	}
	return false
}

// setPathMTU applies mtu to the stack and says so when it changed.
func (u *Uplink) setPathMTU(mtu int) {
	old := int(u.path.mtu.Swap(int64(mtu)))
	if old == mtu {
		return
	}
	if err := u.dialer.SetPathMTU(mtu); err != nil {
		u.log.Warn("set tunnel mtu", zap.Int("mtu", mtu), zap.Error(err))
		return
	}
	// The relay's warm streams keep the MSS of their handshake.
	select {
	case u.warmReset <- struct{}{}:
	default:
	}
	if mtu > u.cfg.MTU {
		u.log.Info("tunnel mtu raised: the path to the relay carries it", zap.Int("mtu", mtu), zap.Int("was", old))
	} else {
		u.log.Info("tunnel mtu back to uplink.mtu", zap.Int("mtu", mtu), zap.Int("was", old))
	}
}

// reprobePath drops back to uplink.mtu at once (the new path may carry
// less) and asks for a probe.
func (u *Uplink) reprobePath() {
	u.setPathMTU(u.cfg.MTU)
	u.kickProbe()
}

// kickProbe asks pathLoop for a probe.
func (u *Uplink) kickProbe() {
	select {
	case u.path.kick <- struct{}{}:
	default:
	}
}

// pathLoop probes when asked, and every pathReprobe while registered.
func (u *Uplink) pathLoop(ctx context.Context) {
	if u.cfg.MaxMTU <= u.cfg.MTU {
		return // max_mtu = mtu: no probe
	}
	reprobe := time.NewTicker(pathReprobe)
	defer reprobe.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-u.path.kick:
		case <-reprobe.C:
			if u.Status().State != StateRegistered {
				continue
			}
		}
		u.probePath(ctx)
	}
}
