package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
)

// Bounds of the relay's TCP transport (relay.tcp_listen). An
// unauthenticated connection costs a goroutine and a TLS handshake for at
// most the handshake timeout, and only maxPending of them exist at once; an
// authenticated one is a configured peer's, and a peer has one: its newest
// replaces the older.
const (
	defaultStreamPending   = 64
	defaultStreamHandshake = 10 * time.Second
)

// Reasons a relay refuses or ends a TCP transport connection, in
// RelayStatus.TCPRefusals.
const (
	streamRefusedBusy      = "busy"      // maxPending connections were authenticating
	streamRefusedHandshake = "handshake" // TLS or proof failed or timed out
	streamRefusedAuth      = "auth"      // not a peer, or a wrong proof
	streamRefusedFrame     = "frame"     // a frame of a bad size
	streamReplaced         = "replaced"  // the same peer connected again
)

// streamServer is the relay's TCP transport: a TLS listener whose
// authenticated connections feed the device's streamBind.
type streamServer struct {
	ln        net.Listener
	tlsCfg    *tls.Config
	bind      *streamBind
	priv      conf.Key
	lookup    func(conf.Key) (string, bool)
	limit     int
	pending   chan struct{} // a slot per connection authenticating
	handshake time.Duration
	// congestion is relay.tcp_congestion, asked of the kernel for each
	// authenticated connection (congestion.go).
	congestion string
	log        *zap.Logger
	wg         sync.WaitGroup

	refused  [5]atomic.Uint64 // by streamRefusalNames index
	accepted atomic.Uint64

	// mu guards the following fields.
	mu     sync.Mutex
	closed bool
	byPeer map[conf.Key]*stream   // by the peer's public key
	all    map[*tls.Conn]struct{} // every connection, to close on Close
	// running is the congestion control the last authenticated connection
	// runs; refusalLogged notes that the kernel's refusal of congestion
	// was logged (once: every connection would repeat it).
	running       string
	refusalLogged bool
}

var streamRefusalNames = [...]string{streamRefusedBusy, streamRefusedHandshake, streamRefusedAuth, streamRefusedFrame, streamReplaced}

func (s *streamServer) refuse(i int) { s.refused[i].Add(1) }

// listenStreams opens the relay's TCP transport on addr; congestion is
// relay.tcp_congestion.
func listenStreams(addr, congestion string, bind *streamBind, priv conf.Key, lookup func(conf.Key) (string, bool),
	o options, log *zap.Logger) (*streamServer, error) {
	tlsCfg, err := streamServerTLS("localhost")
	if err != nil {
		return nil, fmt.Errorf("relay.tcp_listen: certificate: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay.tcp_listen %q: %w; pick a free port or stop what holds it", addr, err)
	}
	s := &streamServer{
		ln: ln, tlsCfg: tlsCfg, bind: bind, priv: priv, lookup: lookup,
		limit:      maxStreamFrame,
		pending:    make(chan struct{}, o.streamPending),
		handshake:  o.streamHandshake,
		congestion: congestion,
		log:        log,
		byPeer:     make(map[conf.Key]*stream),
		all:        make(map[*tls.Conn]struct{}),
	}
	s.wg.Add(1)
	go s.acceptLoop()
	log.Info("relay tcp transport listening", zap.Stringer("listen", ln.Addr()))
	return s, nil
}

// Addr is the listener's address.
func (s *streamServer) Addr() net.Addr { return s.ln.Addr() }

func (s *streamServer) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off instead of spinning.
			s.log.Warn("relay tcp transport accept", zap.Error(err))
			time.Sleep(100 * time.Millisecond)
			continue
		}
		select {
		case s.pending <- struct{}{}:
		default:
			s.refuse(0)
			c.Close()
			continue
		}
		tc := tls.Server(c, s.tlsCfg)
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			<-s.pending
			return
		}
		s.all[tc] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go s.serve(tc)
	}
}

// serve authenticates one connection and then runs it as the peer's stream.
func (s *streamServer) serve(tc *tls.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.all, tc)
		s.mu.Unlock()
		tc.Close()
	}()
	peer, key, err := s.authenticate(tc)
	<-s.pending
	if err != nil {
		s.log.Debug("relay tcp transport refused", zap.Stringer("src", tc.RemoteAddr()), zap.Error(err))
		return
	}
	s.accepted.Add(1)
	cc := askCongestion(tc.NetConn(), s.congestion)
	st := newStream(tc, s.limit, &s.bind.cnt)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.running = cc
	if !s.refusalLogged && congestionRefused(s.congestion, cc) {
		s.refusalLogged = true
		s.log.Info("relay tcp transport: the kernel runs another congestion control than relay.tcp_congestion",
			zap.String("wanted", s.congestion), zap.String("running", cc), zap.String("hint", congestionHint(s.congestion)))
	}
	old := s.byPeer[key]
	s.byPeer[key] = st
	s.mu.Unlock()
	if old != nil {
		s.refuse(4)
		old.closeWith(errors.New("replaced by a newer connection of the peer"))
	}
	s.log.Debug("relay tcp transport connected", zap.String("peer", peer), zap.Stringer("src", tc.RemoteAddr()),
		zap.String("congestion", cc))
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		st.writeLoop()
	}()
	st.readLoop(func(b *[]byte, n int) bool {
		return s.bind.deliver(streamFrame{buf: b, n: n, ep: st.ep}, st.done)
	})
	if errors.Is(st.Err(), errFrameSize) {
		s.refuse(3)
	}
	s.mu.Lock()
	if s.byPeer[key] == st {
		delete(s.byPeer, key)
	}
	s.mu.Unlock()
	s.log.Debug("relay tcp transport closed", zap.String("peer", peer), zap.Error(st.Err()))
}

func (s *streamServer) authenticate(tc *tls.Conn) (name string, key conf.Key, err error) {
	tc.SetDeadline(time.Now().Add(s.handshake))
	ctx, cancel := context.WithTimeout(context.Background(), s.handshake)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		s.refuse(1)
		return "", key, fmt.Errorf("tls handshake: %w", err)
	}
	name, key, err = streamAuthServer(tc, s.priv, s.lookup)
	switch {
	case errors.Is(err, errPeerProof):
		s.refuse(2)
		return "", key, err
	case err != nil:
		s.refuse(1)
		return "", key, err
	}
	tc.SetDeadline(time.Time{})
	return name, key, nil
}

// retain ends the streams of peers keep does not want (removed on reload).
func (s *streamServer) retain(keep func(conf.Key) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, st := range s.byPeer {
		if !keep(k) {
			st.closeWith(errors.New("peer removed from the config"))
		}
	}
}

// close stops accepting, closes every connection and waits for them.
func (s *streamServer) close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.all {
		c.NetConn().Close() // not c.Close: it may block on a stuck write
	}
	for _, st := range s.byPeer {
		st.closeWith(net.ErrClosed) // a reader may be waiting on the device
	}
	s.mu.Unlock()
	s.ln.Close()
	s.wg.Wait()
}

// streamServerStatus are the relay's TCP transport counters.
type streamServerStatus struct {
	streams    int
	refused    map[string]uint64
	accepted   uint64
	dropped    uint64
	congestion string
}

func (s *streamServer) status() streamServerStatus {
	st := streamServerStatus{accepted: s.accepted.Load(), dropped: s.bind.cnt.dropped.Load()}
	for i := range s.refused {
		if n := s.refused[i].Load(); n > 0 {
			if st.refused == nil {
				st.refused = make(map[string]uint64)
			}
			st.refused[streamRefusalNames[i]] = n
		}
	}
	s.mu.Lock()
	st.streams, st.congestion = len(s.byPeer), s.running
	s.mu.Unlock()
	return st
}
