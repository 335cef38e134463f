package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"
)

// controlSession is the relay's side of one appliance's control connection.
type controlSession struct {
	peer *relayPeer
	cc   *controlConn
	out  chan []message // drained by writeLoop
	done chan struct{}
	once sync.Once
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
		s.close()
	}
}

func (s *controlSession) close() {
	s.once.Do(func() {
		close(s.done)
		s.cc.c.Close()
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

// serveControl runs one control session for p on c until either side ends
// it, the appliance stays silent past the ping timeout, or the relay closes.
func (r *Relay) serveControl(p *relayPeer, c net.Conn) {
	s := &controlSession{peer: p, cc: newControlConn(c), out: make(chan []message, outQueue), done: make(chan struct{})}
	defer s.close()
	name := p.name
	log := r.log.With(zap.String("peer", name))

	hello, err := s.cc.read(r.opts.pingTimeout)
	if err != nil || hello.Type != msgHello {
		log.Debug("control handshake failed", zap.String("type", hello.Type), zap.Error(err))
		_ = s.cc.write(message{Type: msgError, Reason: "expected hello"}, controlWriteTimeout)
		return
	}

	r.mu.Lock()
	if r.closed || r.peers[name] != p {
		r.mu.Unlock()
		return
	}
	old := p.session
	p.session = s
	if p.grace != nil {
		p.grace.Stop()
		p.grace = nil
	}
	r.wg.Add(1)
	r.mu.Unlock()
	if old != nil { // the same appliance from a new connection (it roamed or restarted)
		old.close()
	}
	go func() {
		defer r.wg.Done()
		s.writeLoop()
	}()
	stop := context.AfterFunc(r.ctx, s.close)
	defer stop()

	s.send(message{Type: msgHello, Peer: name, Version: r.opts.version})
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
		if len(p.holdings) > 0 && !r.closed {
			p.grace = time.AfterFunc(r.opts.releaseGrace, func() { r.graceExpired(p) })
		}
	}
	r.mu.Unlock()
}

// controlLoop reads the appliance's messages until the session ends.
func (r *Relay) controlLoop(p *relayPeer, s *controlSession) error {
	for {
		m, err := s.cc.read(r.opts.pingTimeout)
		if err != nil {
			select {
			case <-s.done:
				return nil // replaced, removed or relay closing
			default:
				return err
			}
		}
		switch m.Type {
		case msgPing:
			s.send(message{Type: msgPong})
		case msgRegister:
			r.mu.Lock()
			if p.session != s {
				r.mu.Unlock()
				return nil
			}
			p.wanted = m.Ports
			results := r.reconcileLocked(p)
			clear(p.results)
			for _, res := range results {
				p.results[res.Port] = res
			}
			s.send(results...)
			r.sendLocked(r.retryOthersLocked(p))
			r.mu.Unlock()
		case msgError:
			return errors.New("appliance: " + m.Reason)
		}
		// Unknown types are ignored: a newer appliance may send more.
	}
}

// graceExpired releases the ports of a peer that did not come back.
func (r *Relay) graceExpired(p *relayPeer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || p.session != nil || r.peers[p.name] != p {
		return
	}
	p.grace = nil
	for _, h := range p.holdings {
		r.releaseLocked(h)
	}
	p.wanted = nil
	clear(p.results)
	r.log.Info("peer ports released", zap.String("peer", p.name), zap.String("reason", "control connection gone"))
	r.sendLocked(r.retryOthersLocked(p))
}
