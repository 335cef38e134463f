package forwarder

import (
	"net"
	"net/netip"

	"golang.org/x/net/ipv4"

	"github.com/natbox/natbox/internal/rawsock"
)

// batchConn sends a batch of messages: rawsock.NewBatchConn's, one raw
// sendmmsg on Linux (a test wraps it).
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
	sizes    [maxUDPBatch]int       // bytes of each message (header and payload)
	bufs     [maxUDPBatch][2][]byte // per message: optional PROXY v2 header, payload
	headers  [maxUDPBatch][]byte    // PROXY v2 header storage, reused
	// gso: runs of same-size datagrams to one port go out as one UDP GSO
	// send (UDP_SEGMENT): the kernel builds the datagrams from one large
	// buffer and walks its stack once per run, not once per datagram.
	// Off where the OS has no UDP GSO, and after the kernel refused it
	// once (no checksum offload on the route, a segment over the path MTU).
	gso    bool
	gsoMsg [1]ipv4.Message
	gsoIov [][]byte
	gsoOOB []byte
	gsoOff func(error) // test seam: GSO was refused and is off from now on
}

func newBatchWriter(conn *net.UDPConn, targetIP netip.Addr) *batchWriter {
	return &batchWriter{conn: rawsock.NewBatchConn(conn), targetIP: targetIP, addrs: make(map[uint16]*net.UDPAddr, 1), msgs: make([]ipv4.Message, 0, maxUDPBatch), gso: udpGSO}
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
	w.sizes[i] = len(payload)
	if proxyV2 {
		w.sizes[i] += len(w.headers[i])
	}
	w.msgs = append(w.msgs, ipv4.Message{Buffers: bufs, Addr: addr})
}

// flush sends what add collected. A datagram the kernel refuses is skipped
// and the rest are still sent; failed has bit i set for each message i that
// did not go out, and err is the last such error.
func (w *batchWriter) flush() (failed uint64, err error) {
	for i := 0; i < len(w.msgs); {
		end := len(w.msgs)
		if w.gso {
			start, stop := w.nextRun(i)
			if start == i && w.sendGSO(i, stop) {
				i = stop
				continue
			}
			if start > i {
				end = start // sendmmsg up to the run
			}
		}
		n, werr := w.conn.WriteBatch(w.msgs[i:end], 0)
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

// maxGSOBytes bounds one GSO send: the datagrams of a run travel as one
// UDP datagram's payload up to segmentation, so they share its 64 KiB limit.
const maxGSOBytes = 65507

// nextRun finds the first run at or after i of at least two messages that
// one GSO send can carry: one destination, every datagram the first one's
// size except the last, which may be shorter but not empty. It returns
// len(msgs), len(msgs) when there is none.
func (w *batchWriter) nextRun(i int) (start, stop int) {
	for start = i; start < len(w.msgs)-1; start++ {
		size := w.sizes[start]
		if size == 0 {
			continue
		}
		total, j := size, start+1
		for ; j < len(w.msgs) && w.msgs[j].Addr == w.msgs[start].Addr && w.sizes[j] > 0 && w.sizes[j] <= size && total+w.sizes[j] <= maxGSOBytes; j++ {
			total += w.sizes[j]
			if w.sizes[j] < size {
				j++ // a shorter datagram ends the run
				break
			}
		}
		if j-start >= 2 {
			return start, j
		}
	}
	return len(w.msgs), len(w.msgs)
}

// sendGSO sends msgs[i:j] as one UDP GSO send. On a refusal it turns GSO
// off for good and reports false: the caller sends them one by one, which
// also tells which of them the kernel refuses.
func (w *batchWriter) sendGSO(i, j int) bool {
	iov := w.gsoIov[:0]
	for _, m := range w.msgs[i:j] {
		iov = append(iov, m.Buffers...)
	}
	w.gsoIov = iov
	w.gsoOOB = appendUDPSegment(w.gsoOOB[:0], uint16(w.sizes[i]))
	w.gsoMsg[0] = ipv4.Message{Buffers: iov, OOB: w.gsoOOB, Addr: w.msgs[i].Addr}
	_, err := w.conn.WriteBatch(w.gsoMsg[:], 0)
	w.gsoMsg[0] = ipv4.Message{}
	clear(iov)
	if err != nil {
		w.gso = false
		if w.gsoOff != nil {
			w.gsoOff(err)
		}
		return false
	}
	return true
}
