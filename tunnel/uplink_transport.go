package tunnel

import (
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"net"
	"time"

	"go.uber.org/zap"
	"golang.zx2c4.com/wireguard/device"

	"github.com/natbox/natbox/conf"
)

// The transport ladder of an uplink with transport "auto": WireGuard over
// UDP first; when nothing comes back from the relay for fallbackAfter (the
// control connection's pongs arrive every 10 s on a working tunnel, and a
// silent relay triggers WireGuard handshakes that would count), sends move to
// a TLS stream to relay_tcp. While on TCP, every probeEvery the uplink
// starts a handshake whose first initiation also goes out over UDP, ahead of
// the TCP copy: a relay that gets it answers over UDP (the TCP copy is then
// a replay it ignores), and a handshake completed on an answer that came
// over UDP moves the uplink back. Only that first initiation is duplicated,
// so a network that passes UDP one way only cannot trap the handshake on
// UDP. While no stream is up (the relay offers no TCP, or it restarts),
// sends keep going over UDP, and each failed connect starts a handshake
// there, whose answer moves the uplink back.
// WireGuard's sessions do not depend on the transport, so flows inside
// the tunnel see a pause of about one handshake, not a reset.
//
// UDP that answers but loses is the ladder's other rung
// (uplink.loss_fallback): on a path that loses one message in 10 000 the
// TCP flows inside the tunnel crawl (every loss halves a flow's window, and
// gVisor's TCP regains it by one segment per round trip), while inside TLS
// the host's TCP repairs the losses beneath them (tunnel/BENCH.md, "A lossy
// line"). So two windows in a row of the relay's messages (lossWatch) that
// lost at least that share move the uplink to TCP for a hold, without UDP
// probes; then it probes UDP again as above, and each lossy return doubles
// the hold. A return to UDP before the hold ends (no stream carried the
// uplink: the relay offers no TCP) keeps loss from moving it again for as
// long.
const (
	defaultFallbackAfter   = 15 * time.Second
	defaultProbeEvery      = 30 * time.Second
	defaultTransportTick   = time.Second
	streamDialTimeout      = 10 * time.Second
	defaultLossWindow      = time.Minute
	defaultLossMinMessages = 20_000
	defaultLossHold        = 10 * time.Minute
	maxLossHold            = time.Hour
	lossSettleTime         = 2 * time.Second // see lossSettle
	// lossMinLost: a window with fewer losses than this moves nothing,
	// whatever its share (a few losses among little traffic).
	lossMinLost = 5
	// A window that lost lossEarlyLost of at least lossEarlyMessages ends
	// early: on a path that loses that much, the flows over UDP have
	// slowed so far that the full window would take long to fill (at one
	// in 10 000, a collapsed flow loses about one message a second).
	lossEarlyLost     = lossMinLost
	lossEarlyMessages = 1000
	// lossWindowsToMove lossy windows in a row move the uplink: one loss
	// burst (a flow's slow start overshooting a bottleneck, a radio
	// hiccup) fills one window, a lossy path every one.
	lossWindowsToMove = 2
)

// lossWatch compares losses with messages (the relay's messages lost on the
// way in with those received, lossmeter.go; or the tunnel's TCP resends with
// the messages sent) over windows that end once they saw min messages, or
// restart after window without that many.
type lossWatch struct {
	rate     float64 // uplink.loss_fallback as a fraction; 0: off
	window   time.Duration
	min      uint64
	from     time.Time // the current window's start
	in, lost uint64    // the meter's counts then
	run      int       // lossy windows in a row
}

// step feeds one tick's counts (while settling it only restarts the
// window): the share of a window that ended, whether lossWindowsToMove
// lossy ones in a row have, and whether it ended below the rate.
func (w *lossWatch) step(now time.Time, in, lost uint64, settling bool) (share float64, move, clean bool) {
	if settling {
		w.start(now, in, lost)
		return 0, false, false
	}
	share, ended, lossy := w.check(now, in, lost)
	switch {
	case !ended:
	case lossy:
		w.run++
	default:
		w.run, clean = 0, true
	}
	return share, w.run >= lossWindowsToMove, clean
}

// newLossWatch watches for rate lost over windows of at most window that
// saw at least min messages, and enough for rate to be lossMinLost of them
// (250 000 at the default 0.002 %: fewer would need more than rate to move).
func newLossWatch(rate float64, window time.Duration, min uint64) lossWatch {
	if rate > 0 {
		min = max(min, uint64(math.Ceil(lossMinLost/rate)))
	}
	return lossWatch{rate: rate, window: window, min: min}
}

func (w *lossWatch) start(now time.Time, in, lost uint64) { w.from, w.in, w.lost = now, in, lost }

// check reports whether the window ended with enough messages (min, or
// lossEarlyLost lost among lossEarlyMessages), and whether it lost at least
// rate of them (and lossMinLost); it starts the next window when this one
// ended, by messages or by time.
func (w *lossWatch) check(now time.Time, in, lost uint64) (share float64, ended, lossy bool) {
	din, dlost := in-w.in, max(int64(lost)-int64(w.lost), 0) // lost may fall: late messages
	switch {
	case din >= w.min, dlost >= lossEarlyLost && din >= lossEarlyMessages:
		share, ended = float64(dlost)/float64(din+uint64(dlost)), true
		lossy = w.rate > 0 && dlost >= lossMinLost && share >= w.rate
	case now.Sub(w.from) < w.window:
		return 0, false, false
	}
	w.start(now, in, lost)
	return share, ended, lossy
}

// transportState is the ladder's part of UplinkStatus; guarded by Uplink.mu.
type transportState struct {
	switches  uint64
	reason    string // of the last switch
	lastError string // of the last failed TCP connect; cleared by a success
	connects  uint64
	failures  uint64
	// congestion is what the last stream's connection runs; refusalLogged
	// notes that the kernel's refusal of uplink.tcp_congestion was logged.
	congestion    string
	refusalLogged bool
	forLoss       bool // the last switch to TCP was for loss (loss_fallback)
}

// transportLoop runs the ladder until ctx is done.
func (u *Uplink) transportLoop(ctx context.Context) {
	mode := u.cfg.Transport
	if mode == "" {
		mode = conf.TransportAuto
	}
	if mode == conf.TransportUDP {
		return
	}
	defer func() {
		if s := u.client.cur.Swap(nil); s != nil {
			s.closeWith(net.ErrClosed)
		}
	}()
	if mode == conf.TransportTCP {
		u.switchTransport(true, false, `uplink.transport is "tcp"`)
	} else {
		u.client.udpWhenDown.Store(true)
	}
	tick := time.NewTicker(u.opts.transportTick)
	defer tick.Stop()
	var (
		lastRx    uint64
		lastHS    time.Time
		progress  = time.Now()
		nextDial  time.Time
		backoff   = minBackoff
		nextProbe time.Time
		tcpSince  int64 // unix nanoseconds of the switch to TCP

		// The relay's messages lost on the way in, and the tunnel's TCP
		// resending what the appliance sent (the way out, which the
		// appliance cannot see lost: a download's data goes that way).
		recvLoss  = newLossWatch(u.cfg.LossFallbackRate, u.opts.lossWindow, u.opts.lossMinMessages)
		sendLoss  = newLossWatch(u.cfg.LossFallbackRate, u.opts.lossWindow, u.opts.lossMinMessages)
		hold      = u.opts.lossHold // the next loss switch's hold
		lossUntil time.Time         // on TCP for loss: no UDP probe before then
		lossQuiet time.Time         // loss moves nothing before then
		// lossSettle: no loss window starts before then. What the relay
		// sent into the stream closed by a return to UDP, until it heard
		// from the appliance over UDP, never arrives: a gap that is the
		// switch's, not the path's.
		lossSettle time.Time
	)
	in, lost := u.gates.loss.counts()
	recvLoss.start(progress, in, lost)
	sendLoss.start(progress, u.gates.loss.sentCount(), u.retransmits())
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
		now := time.Now()
		stats, _ := readPeerStats(u.dev)
		st := stats[u.cfg.RelayPublicKey]
		if st.RxBytes != lastRx || st.LastHandshake.After(lastHS) {
			progress, lastRx, lastHS = now, st.RxBytes, st.LastHandshake
		}
		if !u.client.tcp.Load() {
			if mode != conf.TransportAuto {
				continue
			}
			in, lost := u.gates.loss.counts()
			settling := now.Before(lossSettle)
			rShare, rMove, rClean := recvLoss.step(now, in, lost, settling)
			sShare, sMove, sClean := sendLoss.step(now, u.gates.loss.sentCount(), u.retransmits(), settling)
			if (rClean || sClean) && recvLoss.run == 0 && sendLoss.run == 0 {
				hold = u.opts.lossHold // a clean window: the next lossy run starts over
			}
			var reason string
			forLoss := false
			switch {
			case now.Sub(progress) >= u.opts.fallbackAfter:
				reason = fmt.Sprintf("no reply over udp for %s", u.opts.fallbackAfter)
			case (rMove || sMove) && !now.Before(lossQuiet):
				reason, forLoss = fmt.Sprintf("%.3f %% of the messages to the relay resent by TCP over udp", sShare*100), true
				if rMove {
					reason = fmt.Sprintf("%.3f %% of the relay's messages lost over udp", rShare*100)
				}
			default:
				continue
			}
			recvLoss.run, sendLoss.run = 0, 0
			u.switchTransport(true, forLoss, reason)
			nextDial, nextProbe, tcpSince, backoff = now, now.Add(u.opts.probeEvery), now.UnixNano(), minBackoff
			lossUntil = time.Time{}
			if forLoss {
				lossUntil, nextProbe = now.Add(hold), now.Add(hold)
				hold = min(2*hold, maxLossHold)
			}
		}
		if !u.client.streamUp() && !now.Before(nextDial) {
			if err := u.connectStream(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				nextDial = now.Add(backoff)
				backoff = min(backoff*2, maxBackoff)
				if mode == conf.TransportAuto {
					// Sends go over UDP meanwhile: a handshake there shows
					// whether UDP works again (answered below).
					u.rehandshake()
				}
			} else {
				backoff = minBackoff
				u.rehandshake()
			}
		}
		if mode != conf.TransportAuto {
			continue
		}
		// The relay answered over UDP (a probe, or a handshake sent there
		// while no stream was up) and the handshake completed.
		// On TCP for loss with a stream up, an answer over UDP (the relay
		// answers where the appliance's last packet came from, and UDP
		// sent just before the switch may arrive after the stream's
		// handshake) waits for the hold's end.
		if r := u.client.udpResponse.Load(); r > tcpSince && !lastHS.Before(time.Unix(0, r)) &&
			(!now.Before(lossUntil) || !u.client.streamUp()) {
			if now.Before(lossUntil) {
				// Moved for loss, but back before the hold ended: no
				// stream carried the uplink, so UDP it is for a while.
				lossQuiet = now.Add(lossUntil.Sub(time.Unix(0, tcpSince)))
			}
			lossUntil = time.Time{}
			u.switchTransport(false, false, "the relay answered over udp")
			if s := u.client.cur.Swap(nil); s != nil {
				s.closeWith(net.ErrClosed)
			}
			progress, lossSettle = now, now.Add(lossSettleTime)
			continue
		}
		if !now.Before(nextProbe) {
			nextProbe = now.Add(u.opts.probeEvery)
			u.client.probe.Store(true)
			u.rehandshake()
		}
	}
}

// retransmitCounter is what an uplink's stack offers to count its TCP
// resends (netstack.Stack does).
type retransmitCounter interface{ TCPRetransmits() uint64 }

// retransmits returns the uplink stack's TCP resends, or 0 without one.
func (u *Uplink) retransmits() uint64 {
	if r, ok := u.dialer.(retransmitCounter); ok {
		return r.TCPRetransmits()
	}
	return 0
}

// rehandshake starts a handshake now, on the transport in use.
func (u *Uplink) rehandshake() {
	if p := u.dev.LookupPeer(device.NoisePublicKey(u.cfg.RelayPublicKey)); p != nil {
		p.ExpireCurrentKeypairs()
		p.SendKeepalive()
	}
}

func (u *Uplink) switchTransport(tcp, forLoss bool, reason string) {
	u.client.tcp.Store(tcp)
	to := TransportUDP
	if tcp {
		to = TransportTCP
	}
	u.mu.Lock()
	u.tr.switches++
	u.tr.reason = reason
	u.tr.forLoss = forLoss
	n := u.tr.switches
	u.mu.Unlock()
	u.log.Info("uplink transport switched", zap.String("transport", to), zap.String("reason", reason),
		zap.String("relay_tcp", u.cfg.RelayTCP), zap.Uint64("count", n))
	u.reprobePath()
}

// connectStream dials relay_tcp, runs TLS and the key proof, and makes the
// result the stream in use.
func (u *Uplink) connectStream(ctx context.Context) error {
	cc, err := u.dialStream(ctx)
	u.mu.Lock()
	if err != nil {
		first := u.tr.lastError == ""
		u.tr.failures++
		u.tr.lastError = err.Error()
		u.mu.Unlock()
		if first {
			u.log.Warn("cannot reach the relay over tcp; retrying", zap.String("relay_tcp", u.cfg.RelayTCP), zap.Error(err))
		}
		return err
	}
	u.tr.connects++
	u.tr.lastError = ""
	u.tr.congestion = cc
	logRefusal := !u.tr.refusalLogged && congestionRefused(u.cfg.TCPCongestion, cc)
	u.tr.refusalLogged = u.tr.refusalLogged || logRefusal
	u.mu.Unlock()
	u.log.Info("relay tcp transport connected", zap.String("relay_tcp", u.cfg.RelayTCP), zap.String("congestion", cc))
	if logRefusal {
		u.log.Info("relay tcp transport: the kernel runs another congestion control than uplink.tcp_congestion",
			zap.String("wanted", u.cfg.TCPCongestion), zap.String("running", cc), zap.String("hint", congestionHint(u.cfg.TCPCongestion)))
	}
	return nil
}

// dialStream returns the congestion control the stream's connection runs.
func (u *Uplink) dialStream(ctx context.Context) (string, error) {
	addr := u.cfg.RelayTCP
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("uplink.relay_tcp %q: %w", addr, err)
	}
	ctx, cancel := context.WithTimeout(ctx, streamDialTimeout)
	defer cancel()
	d := net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 4}}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	cc := askCongestion(raw, u.cfg.TCPCongestion)          // before TLS: the whole connection runs it
	stop := context.AfterFunc(ctx, func() { raw.Close() }) // Close must not wait out the proof
	defer stop()
	tc := tls.Client(raw, streamClientTLS(serverName(host)))
	deadline, _ := ctx.Deadline()
	tc.SetDeadline(deadline)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return "", fmt.Errorf("tls: %w", err)
	}
	if err := streamAuthClient(tc, u.cfg.PrivateKey, u.cfg.RelayPublicKey); err != nil {
		raw.Close()
		return "", err
	}
	if !stop() {
		return "", ctx.Err() // raw is closed
	}
	tc.SetDeadline(time.Time{})
	s := newStream(tc, maxStreamFrame, &u.client.bind.cnt)
	if old := u.client.cur.Swap(s); old != nil {
		old.closeWith(net.ErrClosed)
	}
	u.runWG.Add(2)
	go func() {
		defer u.runWG.Done()
		s.writeLoop()
	}()
	go func() {
		defer u.runWG.Done()
		s.readLoop(u.client.receive(s))
		if err := s.Err(); err != nil && u.client.cur.Load() == s {
			u.log.Info("relay tcp transport lost", zap.Error(err))
		}
	}()
	return cc, nil
}
