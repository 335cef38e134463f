package tunnel

import (
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// Transports of an uplink, as in uplink.transport and UplinkStatus.Transport.
const (
	TransportUDP = "udp"
	TransportTCP = "tcp"
)

// streamFrame is one message a stream received, waiting for the device.
type streamFrame struct {
	buf *[]byte
	n   int
	ep  conn.Endpoint
}

// streamBind is the conn.Bind of a device that carries WireGuard over UDP
// (the wrapped bind) and over streams. On the relay, a packet from a stream
// carries that stream's endpoint, so wireguard-go's roaming answers each
// peer on the transport it last used. On the appliance, the client decides
// the transport of every send (see streamClient).
type streamBind struct {
	conn.Bind
	in     chan streamFrame // frames from every stream, for the extra ReceiveFunc
	client *streamClient    // the appliance's; nil on the relay
	cnt    streamCounters

	// mu guards done: closed by Close, so the stream ReceiveFunc of that
	// Open returns net.ErrClosed as the conn.Bind contract requires.
	mu   sync.Mutex
	done chan struct{}
}

func newStreamBind(udp conn.Bind) *streamBind {
	return &streamBind{Bind: udp, in: make(chan streamFrame, streamQueue)}
}

func (b *streamBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	if err != nil {
		return nil, 0, err
	}
	done := make(chan struct{})
	b.mu.Lock()
	b.done = done
	b.mu.Unlock()
	if c := b.client; c != nil {
		for i, fn := range fns {
			fns[i] = func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
				n, err := fn(packets, sizes, eps)
				for j := range n {
					if sizes[j] == device.MessageResponseSize && packets[j][0] == device.MessageResponseType {
						c.udpResponse.Store(time.Now().UnixNano())
					}
				}
				return n, err
			}
		}
	}
	return append(fns, b.receiveStreams(done)), actual, nil
}

func (b *streamBind) Close() error {
	b.mu.Lock()
	if b.done != nil {
		close(b.done)
		b.done = nil
	}
	b.mu.Unlock()
	return b.Bind.Close()
}

// deliver queues one frame for the device; it waits (the stream's TCP
// flow control pushes back on the sender) until the device takes it or
// stop closes.
func (b *streamBind) deliver(f streamFrame, stop <-chan struct{}) bool {
	select {
	case b.in <- f:
		return true
	case <-stop:
		return false
	}
}

// receiveStreams is the ReceiveFunc of the stream path.
func (b *streamBind) receiveStreams(done chan struct{}) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		var f streamFrame
		select {
		case f = <-b.in:
		case <-done:
			return 0, net.ErrClosed
		}
		n := 0
		for {
			sizes[n] = copy(packets[n], (*f.buf)[:f.n])
			eps[n] = f.ep
			putFrameBuf(f.buf)
			if n++; n == len(packets) {
				return n, nil
			}
			select {
			case f = <-b.in:
			default:
				return n, nil
			}
		}
	}
}

func (b *streamBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if c := b.client; c != nil {
		return c.send(bufs, ep)
	}
	if se, ok := ep.(*streamEndpoint); ok {
		se.s.enqueue(bufs)
		return nil
	}
	return b.Bind.Send(bufs, ep)
}

func (b *streamBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ep, err := b.Bind.ParseEndpoint(s)
	if err == nil && b.client != nil {
		b.client.udpEP.Store(&ep)
	}
	return ep, err
}

// streamClient is the appliance's side of the bind: which transport sends
// go out on, the stream in use when it is TCP, and the UDP probe.
type streamClient struct {
	bind  *streamBind
	tcp   atomic.Bool                   // sends go to the stream
	cur   atomic.Pointer[stream]        // the stream in use; nil: none up
	udpEP atomic.Pointer[conn.Endpoint] // the relay's UDP endpoint, as configured
	// probe: the next handshake initiation also goes out over UDP, first,
	// so that a relay reachable over UDP answers there.
	probe atomic.Bool
	// udpResponse is when a handshake response last arrived over UDP (unix
	// nanoseconds): the relay answered a probe there.
	udpResponse atomic.Int64
	// udpWhenDown: while on TCP with no stream up, send over UDP instead of
	// dropping (transport "auto").
	udpWhenDown atomic.Bool
}

// streamUp reports whether a TLS stream to the relay is up now.
func (c *streamClient) streamUp() bool {
	s := c.cur.Load()
	return s != nil && !s.closed()
}

func newStreamClient(udp conn.Bind) *streamClient {
	b := newStreamBind(udp)
	c := &streamClient{bind: b}
	b.client = c
	return c
}

func (c *streamClient) send(bufs [][]byte, ep conn.Endpoint) error {
	if _, ok := ep.(*streamEndpoint); ok || ep == nil {
		p := c.udpEP.Load()
		if p == nil {
			c.bind.cnt.dropped.Add(uint64(len(bufs)))
			return nil
		}
		ep = *p
	}
	if !c.tcp.Load() {
		return c.bind.Bind.Send(bufs, ep)
	}
	s := c.cur.Load()
	if s == nil || s.closed() {
		if c.udpWhenDown.Load() {
			// "auto" with no stream up (the relay may not offer TCP at all):
			// UDP is no worse than nothing.
			return c.bind.Bind.Send(bufs, ep)
		}
		c.bind.cnt.dropped.Add(uint64(len(bufs)))
		return nil
	}
	for i, m := range bufs {
		if len(m) == device.MessageInitiationSize && m[0] == device.MessageInitiationType && c.probe.CompareAndSwap(true, false) {
			// The probe: the initiation over UDP now, over TCP a moment later,
			// so that a relay reachable both ways sees the UDP copy first
			// (it answers the first and ignores the other as a replay).
			c.bind.Bind.Send(bufs[i:i+1], ep) // a blocked network's error says nothing new
			late := slices.Clone(m)
			time.AfterFunc(probeHeadStart, func() { s.enqueue([][]byte{late}) })
			s.enqueue(bufs[:i])
			s.enqueue(bufs[i+1:])
			return nil
		}
	}
	s.enqueue(bufs)
	return nil
}

// probeHeadStart is how long a probe's UDP initiation leads its TCP copy:
// more than the two paths' difference in one-way delay, little enough that
// a network without UDP barely notices the later handshake.
const probeHeadStart = 100 * time.Millisecond

// receive is the reader's delivery for stream s: its packets present the
// relay's UDP endpoint, so wireguard-go's own idea of the relay's address
// stays the UDP one and a switch back needs no reconfiguration.
func (c *streamClient) receive(s *stream) func(b *[]byte, n int) bool {
	return func(b *[]byte, n int) bool {
		var ep conn.Endpoint = s.ep
		if p := c.udpEP.Load(); p != nil {
			ep = *p
		}
		return c.bind.deliver(streamFrame{buf: b, n: n, ep: ep}, s.done)
	}
}
