package forwarder

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/rawsock"
)

// smallDatagram covers datagrams that fit a typical MTU; larger ones borrow
// a full-size copy buffer.
const smallDatagram = 2048

var datagramPool = sync.Pool{New: func() any { b := make([]byte, smallDatagram); return &b }}

func getDatagramBuf(n int) *[]byte {
	if n <= smallDatagram {
		return datagramPool.Get().(*[]byte)
	}
	return copyBufPool.Get().(*[]byte)
}

func putDatagramBuf(bp *[]byte) {
	if cap(*bp) == smallDatagram {
		datagramPool.Put(bp)
		return
	}
	copyBufPool.Put(bp)
}

// udpKey identifies a UDP session: one per client address and mapping,
// whatever public address or port of the mapping the client sends to
// (endpoint-independent mapping).
type udpKey struct {
	mapping string
	client  netip.AddrPort
}

// udpTable is the UDP session table.
type udpTable struct {
	mu sync.RWMutex // mu guards m, unassured and every mappingState.unassured
	m  map[udpKey]*udpSession
	// replies finds egress sessions (Options.Egress) from their replies.
	replies map[replyKey]*udpSession
	// unassured lists the sessions not assured yet (their client has not
	// sent again after a reply from the target), oldest first: what a full
	// pool evicts, the way conntrack drops unassured entries, so a flood
	// from spoofed sources (which never see a reply) cannot lock out a
	// client who converses with its target.
	unassured udpList
}

// The two lists an unassured session is on: its table's and its mapping's.
const (
	listTable = iota
	listMapping
	listGroup // only for sessions of a mapping in a quota group
)

// udpList is an intrusive list of UDP sessions, oldest first: push,
// remove and pop are O(1) and allocate nothing.
type udpList struct {
	head, tail *udpSession
}

type udpLinks struct {
	prev, next *udpSession
	on         bool
}

func (l *udpList) push(us *udpSession, i int) {
	us.links[i] = udpLinks{prev: l.tail, on: true}
	if l.tail != nil {
		l.tail.links[i].next = us
	} else {
		l.head = us
	}
	l.tail = us
}

func (l *udpList) remove(us *udpSession, i int) {
	k := &us.links[i]
	if !k.on {
		return
	}
	if k.prev != nil {
		k.prev.links[i].next = k.next
	} else {
		l.head = k.next
	}
	if k.next != nil {
		k.next.links[i].prev = k.prev
	} else {
		l.tail = k.prev
	}
	*k = udpLinks{}
}

func (t *udpTable) listLocked(us *udpSession) {
	t.unassured.push(us, listTable)
	us.state.unassured.push(us, listMapping)
	if us.group != nil {
		us.group.unassured.push(us, listGroup)
	}
}

func (t *udpTable) unlistLocked(us *udpSession) {
	t.unassured.remove(us, listTable)
	us.state.unassured.remove(us, listMapping)
	if us.group != nil {
		us.group.unassured.remove(us, listGroup)
	}
}

// victimLocked returns the session to evict for a new one refused for why,
// or nil: the oldest unassured session of the mapping when the mapping's
// max_sessions is full, of the group when its quota is (so a spoofed flood
// at one relay peer's port cannot lock out that peer's answered clients),
// of any mapping when the UDP pool or max_sessions is.
func (t *udpTable) victimLocked(why refusal, st *mappingState, g *groupState) *udpSession {
	switch why {
	case refusedMappingSessions:
		return st.unassured.head
	case refusedGroupSessions, refusedGroupUDPSessions:
		if g != nil {
			return g.unassured.head
		}
	case refusedUDPSessions, refusedSessions:
		return t.unassured.head
	}
	return nil
}

// maxEvictions bounds the evictions one admission may make: a slot freed by
// an eviction can be taken by a concurrent admission before the retry.
const maxEvictions = 4

// reserveEvictingLocked is reserveSlot that, while the refusal is a full
// pool, evicts unassured UDP sessions (see victimLocked) and tries again.
// It returns the evicted sessions, whose slots it freed and which it took
// out of the table; the caller closes them after unlocking e.udp.mu.
// probe, when not nil, is asked once before the first eviction; false
// refuses with refusedProbation and evicts nothing.
func (e *Engine) reserveEvictingLocked(rs *RuleSet, r *Rule, proto conf.Proto, src netip.Addr, probe func() bool, evicted *[maxEvictions]*udpSession) (slot, refusal, int) {
	sl, why := e.reserveSlot(rs, r, proto, src)
	n := 0
	for ; why != refusalNone && n < maxEvictions; n++ {
		v := e.udp.victimLocked(why, r.state, r.group)
		if v == nil {
			break
		}
		if n == 0 && probe != nil && !probe() {
			return sl, refusedProbation, 0
		}
		e.udp.forgetLocked(v)
		v.state.udpEvicted.Add(1)
		e.freeSlot(v.session)
		evicted[n] = v
		sl, why = e.reserveSlot(rs, r, proto, src)
	}
	return sl, why, n
}

// reserveEvicting is reserveEvictingLocked for a caller that does not hold
// e.udp.mu.
func (e *Engine) reserveEvicting(rs *RuleSet, r *Rule, proto conf.Proto, src netip.Addr) (slot, refusal) {
	var evicted [maxEvictions]*udpSession
	e.udp.mu.Lock()
	sl, why, n := e.reserveEvictingLocked(rs, r, proto, src, nil, &evicted)
	e.udp.mu.Unlock()
	closeEvicted(evicted[:n])
	return sl, why
}

// assure marks us as a conversation: its client sent again after the
// target's reply, which a spoofed source (it never sees the reply) cannot
// know to do. It is no longer evicted for new sessions.
func (e *Engine) assure(us *udpSession) {
	e.udp.mu.Lock()
	us.assured.Store(true)
	e.udp.unlistLocked(us)
	e.udp.mu.Unlock()
}

func (t *udpTable) get(k udpKey) *udpSession {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.m[k]
}

func (t *udpTable) remove(us *udpSession) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.forgetLocked(us)
}

// forgetLocked takes us out of the table, its reply index and the
// unassured lists.
func (t *udpTable) forgetLocked(us *udpSession) {
	t.unlistLocked(us)
	if t.m[us.key] == us {
		delete(t.m, us.key)
	}
	if us.replyQ != nil && t.replies[us.rkey] == us {
		delete(t.replies, us.rkey)
	}
}

func (t *udpTable) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.m)
}

type datagram struct {
	buf *[]byte
	n   int
	dst netip.AddrPort // the public address and port the client sent to
}

// udpSession is a UDP session: a host socket toward the target, a bounded
// queue of client datagrams, a sender and a reply reader goroutine.
type udpSession struct {
	*session
	key   udpKey
	queue *datagramQueue
	done  chan struct{} // closed when the session stops
	// path is where replies go: the ingress and public address of the
	// client's latest datagram. A client that moves to another path (a
	// second relay, after the first went away) takes its replies along.
	path atomic.Pointer[replyPath]
	// replied is set by the target's first reply; assured once the client
	// sends again after it (see assure), as conntrack's UDP "stream".
	replied, assured atomic.Bool
	links            [3]udpLinks // on the unassured lists (listTable, listMapping, listGroup); guarded by udpTable.mu
	group            *groupState // its mapping's quota group at open, or nil
	// Egress sessions only: replies waiting for the client, and the key
	// that finds the session from them.
	replyQ *datagramQueue
	rkey   replyKey

	mu      sync.Mutex // mu guards the following fields
	conn    *net.UDPConn
	stopped bool
}

func (us *udpSession) shutdown() {
	us.mu.Lock()
	if us.stopped {
		us.mu.Unlock()
		return
	}
	us.stopped = true
	c := us.conn
	us.mu.Unlock()
	close(us.done)
	if c != nil {
		c.Close()
	}
}

// setConn installs the dialed socket; false if the session already stopped.
func (us *udpSession) setConn(c *net.UDPConn) bool {
	us.mu.Lock()
	defer us.mu.Unlock()
	if us.stopped {
		return false
	}
	us.conn = c
	return true
}

// replyPath is the way back to a UDP session's client.
type replyPath struct {
	via    Ingress    // where replies go
	public netip.Addr // the address the client sent to, the replies' source
}

// deliver queues a copy of a client datagram that came in on in; it never
// blocks, dropping and counting when the queue is full.
func (us *udpSession) deliver(in Ingress, payload []byte, dst netip.AddrPort, now time.Time) {
	if p := us.path.Load(); p.public != dst.Addr() || p.via != in {
		us.path.Store(&replyPath{via: in, public: dst.Addr()})
	}
	us.idle.last.Store(now.UnixNano())
	bp := getDatagramBuf(len(payload))
	n := copy(*bp, payload)
	if !us.queue.push(datagram{buf: bp, n: n, dst: dst}) {
		putDatagramBuf(bp)
		us.state.udpDrops.Add(1)
	}
}

// drain empties the queues, counting what is dropped.
func (us *udpSession) drain() {
	for _, q := range []*datagramQueue{us.queue, us.replyQ} {
		if q == nil {
			continue
		}
		for _, d := range q.close() {
			putDatagramBuf(d.buf)
			us.state.udpDrops.Add(1)
		}
	}
}

// HandleUDP forwards one datagram from src to dst that came in on in. It
// never blocks and never dials: the first datagram of a client creates a
// session whose goroutine dials while a few early datagrams wait in its
// queue. Refused and overflowing datagrams are dropped and counted. payload
// is copied; the caller may reuse it after the call.
func (e *Engine) HandleUDP(in Ingress, src, dst netip.AddrPort, payload []byte) {
	if e.closing.Load() {
		e.unmatched.refuse(refusedShuttingDown)
		return
	}
	rs := e.rules.Load()
	now := e.clock.Now()
	r := rs.Lookup(in.Name(), conf.UDP, dst, now)
	if r == nil {
		e.unmatched.refuse(refusedNoMatch)
		return
	}
	us := e.udp.get(udpKey{mapping: r.Name, client: src})
	if us == nil {
		if us = e.openUDP(rs, r, in, src, dst, now); us == nil {
			return
		}
	}
	// Only a datagram the client sent after a reply assures its session,
	// so replied is read before this one is queued: its own reply (a local
	// echo or DNS server answers in microseconds) may set replied before a
	// check after deliver runs, and would assure a spoofed source on its
	// one datagram.
	replied := us.replied.Load()
	us.deliver(in, payload, dst, now)
	if h := udpDelivered.Load(); h != nil {
		(*h)(us)
	}
	if replied && !us.assured.Load() {
		e.assure(us)
	}
}

// udpDelivered, when set (tests only), runs in HandleUDP after a datagram is
// queued and before its session may be assured.
var udpDelivered atomic.Pointer[func(*udpSession)]

// openUDP admits a new client and starts its session, or returns the
// session another goroutine created first; nil when refused.
func (e *Engine) openUDP(rs *RuleSet, r *Rule, in Ingress, src, dst netip.AddrPort, now time.Time) *udpSession {
	if why := e.admit(r, src.Addr(), now); why != refusalNone {
		e.debugRefusal(r, conf.UDP, src, dst, why, nil)
		return nil
	}
	srcKey := sourceKey(src.Addr())
	if why := e.allowNew(rs, r, srcKey, now); why != refusalNone {
		r.state.refuse(why)
		e.debugRefusal(r, conf.UDP, src, dst, why, nil)
		return nil
	}
	key := udpKey{mapping: r.Name, client: src}
	var evicted [maxEvictions]*udpSession
	e.udp.mu.Lock()
	if us := e.udp.m[key]; us != nil {
		e.udp.mu.Unlock()
		return us
	}
	var probe func() bool
	if !e.opts.NoUDPProbation {
		probe = func() bool { return e.probation.pass(r.state, src, now) }
	}
	sl, why, n := e.reserveEvictingLocked(rs, r, conf.UDP, srcKey, probe, &evicted)
	if why != refusalNone {
		e.udp.mu.Unlock()
		closeEvicted(evicted[:n])
		r.state.refuse(why)
		e.debugRefusal(r, conf.UDP, src, dst, why, nil)
		return nil
	}
	if !e.track() {
		e.udp.mu.Unlock()
		closeEvicted(evicted[:n])
		e.releaseSlot(sl)
		r.state.refuse(refusedShuttingDown)
		return nil
	}
	us := &udpSession{
		session: e.newSession(conf.UDP, in, r, src, dst, r.targetHostPort(dst.Port()), sl),
		key:     key,
		group:   r.group,
		queue:   newDatagramQueue(e.opts.UDPQueueLen, e.bufs),
		done:    make(chan struct{}),
	}
	us.path.Store(&replyPath{via: in, public: dst.Addr()})
	us.stop = us.shutdown
	e.udp.m[key] = us
	if e.opts.Egress != nil && r.targetAddr.IsValid() {
		us.replyQ = newDatagramQueue(defaultReplyQueueLen, e.bufs)
		us.rkey = replyKey{client: src, target: netip.AddrPortFrom(r.targetAddr, r.targetPort(dst.Port()))}
		e.udp.replies[us.rkey] = us // two mappings toward one target: the newest session gets the replies
	}
	e.udp.listLocked(us)
	e.udp.mu.Unlock()
	closeEvicted(evicted[:n])
	e.register(us.session, rs)
	go e.runUDPSession(us, rs.dialTimeout())
	return us
}

func closeEvicted(vs []*udpSession) {
	for _, v := range vs {
		v.close("evicted")
	}
}

// runUDPSession opens the target socket, then sends queued datagrams until
// the session stops; it owns the session's teardown.
func (e *Engine) runUDPSession(us *udpSession, dialTimeout time.Duration) {
	defer e.flows.Done()
	reason := "closed"
	if e.opts.Egress != nil {
		reason, err := e.runEgressUDP(us)
		e.udp.remove(us)
		us.drain()
		e.finish(us.session, reason, err)
		return
	}
	conn, targetIP, err := e.openUDPConn(us, dialTimeout)
	switch {
	case err != nil:
		us.state.refuse(refusedDialFailed)
		reason = refusedDialFailed.String()
		us.shutdown()
	case !us.setConn(conn):
		conn.Close()
		err = nil
	default:
		replyDone := make(chan struct{})
		e.flows.Add(1) // a tracked goroutine holds the count above zero
		go e.runUDPReply(us, conn, targetIP, replyDone)
		e.sendLoop(us, conn, targetIP)
		<-replyDone
	}
	e.udp.remove(us)
	us.drain()
	e.finish(us.session, reason, err)
}

// openUDPConn resolves the target (DNS names at dial time) and opens an
// unconnected socket, so one session can reach every port of a range.
func (e *Engine) openUDPConn(us *udpSession, dialTimeout time.Duration) (*net.UDPConn, netip.Addr, error) {
	r := us.rule.Load()
	start := time.Now()
	ip := r.targetAddr
	if !ip.IsValid() {
		ctx, cancel := context.WithTimeout(e.ctx, dialTimeout)
		go func() { // a session stopped while resolving stops the lookup
			select {
			case <-us.done:
				cancel()
			case <-ctx.Done():
			}
		}()
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", r.Mapping.Target.Host)
		cancel()
		if err != nil {
			return nil, netip.Addr{}, fmt.Errorf("resolve target %s: %w", r.Mapping.Target.Host, err)
		}
		if len(ips) == 0 {
			return nil, netip.Addr{}, fmt.Errorf("resolve target %s: no addresses", r.Mapping.Target.Host)
		}
		ip = ips[0].Unmap()
	}
	network := "udp6"
	if ip.Is4() {
		network = "udp4"
	}
	conn, err := net.ListenUDP(network, nil)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("open udp socket toward %s: %w", us.target, err)
	}
	us.state.observeDial(time.Since(start))
	return conn, ip, nil
}

// maxUDPBatch is how many queued datagrams one sendmmsg carries (at most 64:
// batchWriter.flush reports failures as bits of a uint64).
const maxUDPBatch = 64

// sendLoop sends the session's queued datagrams to the target. It takes
// whatever is queued (up to maxUDPBatch) into one sendmmsg, so a fast
// client costs one system call and one wake-up per batch, not per datagram.
func (e *Engine) sendLoop(us *udpSession, conn *net.UDPConn, targetIP netip.Addr) {
	w := newBatchWriter(conn, targetIP)
	w.gsoOff = func(err error) {
		e.log.Debug("udp gso refused, sending datagram by datagram", zap.Uint64("session", us.id), zap.String("target", us.target), zap.Error(err))
	}
	batch := make([]datagram, 0, maxUDPBatch)
	for {
		select {
		case <-us.done:
			return
		default:
		}
		batch = us.queue.take(batch[:0], maxUDPBatch)
		if len(batch) == 0 {
			select {
			case <-us.done:
				return
			case <-us.queue.ready:
			}
			continue
		}
		r := us.rule.Load()
		for _, d := range batch {
			if e.beforeUDPSend != nil {
				e.beforeUDPSend(us.state.name)
			}
			w.add((*d.buf)[:d.n], r.targetPort(d.dst.Port()), r.proxy == proxyV2, us.client, d.dst)
		}
		failed, err := w.flush()
		for i, d := range batch {
			if failed&(1<<i) == 0 {
				us.in.Add(uint64(d.n))
				us.state.bytesIn.Add(uint64(d.n))
			} else {
				us.state.udpDrops.Add(1)
			}
			putDatagramBuf(d.buf)
		}
		if err != nil {
			if ce := e.log.Check(zap.DebugLevel, "udp send failed"); ce != nil {
				ce.Write(zap.Uint64("session", us.id), zap.String("target", us.target), zap.Int("dropped", bits.OnesCount64(failed)), zap.Error(err))
			}
		}
	}
}

// runUDPReply reads the target's replies and sends each to the client from
// the public address and port the client used. It also ends the session
// when it has been idle for the mapping's timeout.
func (e *Engine) runUDPReply(us *udpSession, conn *net.UDPConn, targetIP netip.Addr, done chan<- struct{}) {
	defer e.flows.Done()
	defer close(done)
	// Replies are read into an MTU-sized buffer: every session pins its
	// buffer while it waits, and a flood of sources may open max_sessions
	// of them. A longer reply (a large DNS answer) is read whole into a
	// pooled full-size buffer held only while it is read and relayed
	// (rawsock's spill).
	bp := getDatagramBuf(smallDatagram)
	defer putDatagramBuf(bp)
	buf := *bp
	// Raw reads: a reply that wakes an idle natbox wakes no sysmon thread
	// too (internal/rawsock says why).
	rd, err := rawsock.NewPacketReader(conn)
	if err != nil {
		e.log.Debug("udp session read failed", zap.Uint64("session", us.id), zap.Error(err))
		us.close("error")
		return
	}
	d, expired := us.idle.deadline()
	conn.SetReadDeadline(d)
	for !expired {
		dgram, big, truncated, from, err := rd.ReadFrom(buf, &copyBufPool)
		if err == nil {
			e.relayReply(us, targetIP, from, dgram, truncated)
			if big != nil {
				copyBufPool.Put(big)
			}
			continue
		}
		if isTimeout(err) {
			// Re-arm only when the deadline fires; traffic just moves last.
			if d, expired = us.idle.deadline(); !expired {
				conn.SetReadDeadline(d)
			}
			continue
		}
		if !errors.Is(err, net.ErrClosed) {
			e.log.Debug("udp session read failed", zap.Uint64("session", us.id), zap.Error(err))
			us.close("error")
		}
		return
	}
	us.state.udpExpired.Add(1)
	us.close("idle")
}

// relayReply sends one reply the session's target socket read from `from`
// to the client, or drops and counts it.
func (e *Engine) relayReply(us *udpSession, targetIP netip.Addr, from netip.AddrPort, dgram []byte, truncated bool) {
	r := us.rule.Load()
	if truncated || from.Addr() != targetIP || !r.targetPorts.Contains(from.Port()) {
		us.state.udpDrops.Add(1) // cut, or not from the target: never relayed
		return
	}
	us.idle.touch()
	if !us.replied.Load() {
		us.replied.Store(true)
	}
	path := us.path.Load()
	pub := netip.AddrPortFrom(path.public, r.listenPort(from.Port()))
	if err := path.via.WriteUDP(pub, us.client, dgram); err != nil {
		us.state.udpDrops.Add(1)
		return
	}
	us.out.Add(uint64(len(dgram)))
	us.state.bytesOut.Add(uint64(len(dgram)))
}
