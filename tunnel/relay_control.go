package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// controlSession is the relay's side of one appliance's control connection.
type controlSession struct {
	log  *zap.Logger
	peer *relayPeer
	cc   *controlConn
	out  chan []message // drained by writeLoop
	done chan struct{}
	once sync.Once
	// checksumsOptional: the peer's hello said its stack does not verify
	// tunnel checksums; set before the session is published.
	checksumsOptional bool
	// warm keeps warm streams toward the peer (warm.go); nil when its hello
	// did not offer them. Set before the session is published.
	warm *warmPool

	// A register waits here for applyLoop; a newer one replaces it, so a
	// burst of registrations costs one apply, of the last.
	regMu    sync.Mutex
	reg      *message
	regReady chan struct{} // capacity 1: a register is waiting
}

// queueRegister makes m the register applyLoop applies next.
func (s *controlSession) queueRegister(m message) {
	s.regMu.Lock()
	if s.reg != nil {
		s.peer.regCoalesced.Add(1)
	}
	s.reg = &m
	s.regMu.Unlock()
	select {
	case s.regReady <- struct{}{}:
	default: // already signalled; the applier takes the latest
	}
}

// takeRegister returns the waiting register, or nil.
func (s *controlSession) takeRegister() *message {
	s.regMu.Lock()
	defer s.regMu.Unlock()
	m := s.reg
	s.reg = nil
	return m
}

// outQueue bounds the batches queued for a slow appliance; past it the
// session is closed and the appliance reconnects and re-registers.
const outQueue = 16

// send queues msgs without blocking; a session that cannot keep up is closed.
func (s *controlSession) send(msgs ...message) {
	select {
	case s.out <- msgs:
	case <-s.done:
	default:
		s.peer.ctlRefused[ctlQueueFull].Add(1)
		s.log.Info("control connection refused", zap.String("reason", ctlQueueFull.String()))
		s.close()
	}
}

func (s *controlSession) close() {
	s.once.Do(func() {
		close(s.done)
		s.cc.c.Close()
		if s.warm != nil {
			s.warm.close()
		}
	})
}

func (s *controlSession) writeLoop() {
	for {
		select {
		case msgs := <-s.out:
			for _, m := range msgs {
				if err := s.cc.write(m, controlWriteTimeout); err != nil {
					s.close()
					return
				}
			}
		case <-s.done:
			return
		}
	}
}

// serveControl runs one control session for p on cc until either side ends
// it, the appliance stays silent past the ping timeout, or the relay closes.
// cc is p's pending connection until its hello is read.
func (r *Relay) serveControl(p *relayPeer, cc *controlConn) {
	name := p.name
	log := r.log.With(zap.String("peer", name))
	s := &controlSession{log: log, peer: p, cc: cc, out: make(chan []message, outQueue), done: make(chan struct{}),
		regReady: make(chan struct{}, 1)}
	defer s.close()
	c := cc.c

	hello, err := s.cc.read(r.opts.helloTimeout)
	r.mu.Lock()
	replaced := p.pending != cc // by a newer connection, counted there, or the relay is closing
	if !replaced {
		p.pending = nil
	}
	r.mu.Unlock()
	switch why, refused := readReason(err); {
	case replaced:
		return
	case err != nil && refused:
		r.refuseControl(p, cc, why, err)
		return
	case err != nil:
		log.Debug("control connection ended before hello", zap.Error(err))
		return
	case hello.Type != msgHello:
		r.refuseControl(p, cc, ctlBadHello, fmt.Errorf("first message %q", hello.Type))
		return
	case hello.V < MinProtocolVersion || hello.V > MaxProtocolVersion:
		r.refuseControl(p, cc, ctlVersion, fmt.Errorf("control protocol version %d, relay speaks %d to %d",
			hello.V, MinProtocolVersion, MaxProtocolVersion))
		return
	}
	_ = c.SetReadDeadline(time.Time{})

	r.mu.Lock()
	if r.closed || r.peers[name] != p {
		r.mu.Unlock()
		return
	}
	old := p.session
	s.checksumsOptional = hello.ChecksumsOptional
	if hello.WarmStreams && r.opts.warmMax > 0 {
		src, dst := netip.AddrPortFrom(r.addr4, 0), netip.AddrPortFrom(p.addr4, ControlPort)
		s.warm = newWarmPool(r.ctx, func(ctx context.Context) (net.Conn, error) { return r.org.DialTCP(ctx, src, dst) },
			&p.warm, r.opts.warmMax, r.opts.warmIdle, &r.wg, log)
	}
	p.session = s
	r.syncChecksumsLocked()
	if p.grace != nil {
		p.grace.Stop()
		p.grace = nil
	}
	r.wg.Add(2)
	r.mu.Unlock()
	if old != nil { // the same appliance from a new connection (it roamed or restarted)
		old.close()
	}
	go func() {
		defer r.wg.Done()
		s.writeLoop()
	}()
	go func() {
		defer r.wg.Done()
		r.applyLoop(p, s)
	}()
	stop := context.AfterFunc(r.ctx, s.close)
	defer stop()

	s.send(message{Type: msgHello, Peer: name, Version: r.opts.version, ChecksumsOptional: r.opts.checksumsOptional != nil})
	log.Info("peer connected", zap.Stringer("src", c.RemoteAddr()), zap.String("version", hello.Version))

	err = r.controlLoop(p, s)
	switch {
	case err == nil, errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		log.Info("peer disconnected")
	default:
		log.Info("peer disconnected", zap.Error(err))
	}

	r.mu.Lock()
	if p.session == s {
		p.session = nil
		r.syncChecksumsLocked()
		if len(p.holdings) > 0 && !r.closed {
			p.grace = time.AfterFunc(r.opts.releaseGrace, func() { r.graceExpired(p) })
		}
	}
	r.mu.Unlock()
}

// syncChecksumsLocked tells the relay's stack which peers' stacks do not
// verify tunnel checksums: those connected with a hello that said so
// (WithChecksumsOptional). r.mu is held.
func (r *Relay) syncChecksumsLocked() {
	set := r.opts.checksumsOptional
	if set == nil {
		return
	}
	var dsts []netip.Prefix
	for _, p := range r.peers {
		if p.session != nil && p.session.checksumsOptional {
			dsts = append(dsts, TunnelPrefixes(p.addr4)...)
		}
	}
	set(dsts)
}

// controlLoop reads the appliance's messages until the session ends.
func (r *Relay) controlLoop(p *relayPeer, s *controlSession) error {
	bucket := newMsgBucket(time.Now())
	for {
		m, err := s.cc.read(r.opts.pingTimeout)
		if err != nil {
			select {
			case <-s.done:
				return nil // replaced, removed or relay closing
			default:
			}
			if why, refused := readReason(err); refused && why != ctlHelloTimeout {
				r.refuseControl(p, s.cc, why, err)
			}
			return err
		}
		if !bucket.take(time.Now()) {
			err := fmt.Errorf("more than %d control messages at once or %g a second", controlBurst, controlRate)
			r.refuseControl(p, s.cc, ctlRate, err)
			return err
		}
		switch m.Type {
		case msgPing:
			s.send(message{Type: msgPong})
		case msgWarm:
			if s.warm != nil {
				s.warm.reset()
			}
		case msgRegister:
			s.queueRegister(m)
		case msgError:
			return errors.New("appliance: " + m.Reason)
		}
		// Unknown types are ignored: a newer appliance may send more.
	}
}

// applyLoop applies s's registers, the latest of each burst, until the
// session ends.
func (r *Relay) applyLoop(p *relayPeer, s *controlSession) {
	for {
		select {
		case <-s.regReady:
		case <-s.done:
			return
		}
		if m := s.takeRegister(); m != nil {
			r.applyRegister(p, s, *m)
		}
	}
}

// applyRegister makes p's holdings what register m asks and answers it.
// Only p's holdings change; other peers are retried only for ports p
// released. The new public sockets are opened without the relay's lock
// (a large UDP range is thousands of them): their ports are reserved in
// the registry and counted against the socket caps meanwhile.
func (r *Relay) applyRegister(p *relayPeer, s *controlSession, m message) {
	r.mu.Lock()
	if p.session != s || r.closed {
		r.mu.Unlock()
		return
	}
	p.wanted = m.Ports
	p.udpIdle = udpIdleOf(m)
	freed := r.releaseUnwantedLocked(p)
	r.syncRulesLocked()
	plan := r.reserveLocked(p)
	before := r.beforeOpen
	r.mu.Unlock()
	if before != nil {
		before(p.name)
	}

	pre := &prepared{opened: make(map[portKey]*holding), failed: make(map[string]string)}
	for _, ps := range plan {
		if r.ctx.Err() != nil { // closing: the holdings would be discarded
			break
		}
		var mine []*holding
		for _, k := range ps.keys {
			if pre.opened[k] != nil { // two wanted specs overlap
				continue
			}
			h, err := r.openSockets(p, k, 0) // reconcile sets the idle timeout
			if err != nil {
				pre.failed[ps.raw] = err.Error()
				for _, h := range mine {
					delete(pre.opened, h.key)
					h.discard()
				}
				break
			}
			mine = append(mine, h)
			pre.opened[k] = h
		}
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	r.unreserveLocked(p)
	if p.session != s || r.closed || r.peers[p.name] != p {
		for _, h := range pre.opened {
			h.discard()
		}
		return
	}
	results, more := r.reconcileLocked(p, pre)
	freed = append(freed, more...)
	clear(p.results)
	for _, res := range results {
		p.results[res.Port] = res
	}
	s.send(results...)
	r.sendLocked(r.retryOthersLocked(p, freed, false))
}

// plannedSpec is a wanted spec whose missing ports applyRegister opens.
type plannedSpec struct {
	raw  string
	keys []portKey
}

// reserveLocked reserves the ports of p's wanted specs that p may take and
// does not hold yet, and returns them by spec.
func (r *Relay) reserveLocked(p *relayPeer) []plannedSpec {
	var plan []plannedSpec
	p.reserved = make(map[portKey]bool)
	for _, raw := range p.wanted {
		spec, err := parseWireSpec(raw)
		if err != nil || r.reg.check(p.name, p.cfg.Ports, spec) != "" {
			continue // reconcile gives the reason
		}
		if why, _ := r.udpSocketsLocked(p, spec); why != "" {
			continue // ... and counts it
		}
		ps := plannedSpec{raw: raw}
		for _, k := range portKeys(spec) {
			if p.holdings[k] != nil || p.reserved[k] {
				continue
			}
			p.reserved[k] = true
			r.reg.take(p.name, k)
			if k.proto == conf.UDP {
				p.udpSockets += len(r.binds)
				r.udpSockets += len(r.binds)
			}
			ps.keys = append(ps.keys, k)
		}
		if len(ps.keys) > 0 {
			plan = append(plan, ps)
		}
	}
	return plan
}

// unreserveLocked undoes reserveLocked.
func (r *Relay) unreserveLocked(p *relayPeer) {
	for k := range p.reserved {
		if p.holdings[k] == nil {
			r.reg.release(p.name, k)
		}
		if k.proto == conf.UDP {
			p.udpSockets -= len(r.binds)
			r.udpSockets -= len(r.binds)
		}
	}
	p.reserved = nil
}

// graceExpired releases the ports of a peer that did not come back.
func (r *Relay) graceExpired(p *relayPeer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || p.session != nil || r.peers[p.name] != p {
		return
	}
	p.grace = nil
	freed := keysOf(p.holdings)
	for _, h := range p.holdings {
		r.releaseLocked(h)
	}
	p.wanted = nil
	clear(p.results)
	r.syncRulesLocked()
	r.log.Info("peer ports released", zap.String("peer", p.name), zap.String("reason", "control connection gone"))
	r.sendLocked(r.retryOthersLocked(p, freed, false))
}
