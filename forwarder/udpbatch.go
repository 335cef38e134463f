package forwarder

import (
	"net"
	"net/netip"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// batchConn is ipv4.PacketConn or ipv6.PacketConn: both send a batch of
// messages with one sendmmsg on Linux (one sendmsg each elsewhere).
type batchConn interface {
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// batchWriter collects datagrams toward one target host and sends them
// together. Buffers handed to add must stay untouched until flush returns.
type batchWriter struct {
	conn     batchConn
	targetIP netip.Addr
	addrs    map[uint16]*net.UDPAddr // one per target port, made once
	msgs     []ipv4.Message
	bufs     [maxUDPBatch][2][]byte // per message: optional PROXY v2 header, payload
	headers  [maxUDPBatch][]byte    // PROXY v2 header storage, reused
}

func newBatchWriter(conn *net.UDPConn, targetIP netip.Addr) *batchWriter {
	w := &batchWriter{targetIP: targetIP, addrs: make(map[uint16]*net.UDPAddr, 1), msgs: make([]ipv4.Message, 0, maxUDPBatch)}
	if targetIP.Is4() {
		w.conn = ipv4.NewPacketConn(conn)
	} else {
		w.conn = ipv6.NewPacketConn(conn)
	}
	return w
}

// add queues payload for the target's port; with proxyV2 each datagram
// carries its own PROXY v2 header naming client and the public address.
func (w *batchWriter) add(payload []byte, port uint16, proxyV2 bool, client, public netip.AddrPort) {
	i := len(w.msgs)
	addr := w.addrs[port]
	if addr == nil {
		addr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(w.targetIP, port))
		w.addrs[port] = addr
	}
	bufs := w.bufs[i][:0]
	if proxyV2 {
		w.headers[i] = appendProxyV2(w.headers[i][:0], true, client, public)
		bufs = append(bufs, w.headers[i])
	}
	bufs = append(bufs, payload)
	w.msgs = append(w.msgs, ipv4.Message{Buffers: bufs, Addr: addr})
}

// flush sends what add collected. A datagram the kernel refuses is skipped
// and the rest are still sent; failed has bit i set for each message i that
// did not go out, and err is the last such error.
func (w *batchWriter) flush() (failed uint64, err error) {
	for i := 0; i < len(w.msgs); {
		n, werr := w.conn.WriteBatch(w.msgs[i:], 0)
		if werr != nil {
			// The first message of what was left failed: drop it, go on.
			err = werr
			failed |= 1 << i
			n = 1
		}
		i += n
	}
	clear(w.msgs)
	w.msgs = w.msgs[:0]
	return failed, err
}
