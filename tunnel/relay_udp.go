package tunnel

import (
	"errors"
	"net"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/net/ipv4"

	"github.com/natbox/natbox/internal/rawsock"
)

// udpSocketBuffer is the receive and send buffer asked for each public UDP
// socket. The kernel default (212992 bytes, about 90 full datagrams) absorbs
// only ~4 ms of a 200 Mbit/s stream while the reading goroutine waits for a
// CPU. Linux caps it at net.core.rmem_max / wmem_max; the memory is used
// only while datagrams queue.
const udpSocketBuffer = 4 << 20

// setUDPBuffers asks for udpSocketBuffer; failing is not fatal (the kernel
// default stays), as a small buffer only costs loss under bursts.
func setUDPBuffers(pc *net.UDPConn) {
	pc.SetReadBuffer(udpSocketBuffer)
	pc.SetWriteBuffer(udpSocketBuffer)
}

// udpReadBatch is how many datagrams one read of a public UDP socket may
// return (recvmmsg on Linux): a backlog built while the goroutine waited
// for a CPU drains with one syscall per batch instead of one per datagram.
const udpReadBatch = 32

// UDPSocketMemory is about what one public UDP socket costs the relay in
// its own memory at tunnel MTU mtu: the batch of read buffers and the
// reading goroutine's stack. The kernel's socket buffers (up to
// udpSocketBuffer each way) come on top while datagrams queue.
func UDPSocketMemory(mtu int) int { return udpReadBatch*mtu + 8<<10 }

// udpLoop reads one public UDP socket in batches and hands each datagram to
// the engine, whose session forwards it into the tunnel from the client's
// own address. Buffers are MTU-sized: a
// larger datagram could not cross the tunnel anyway (natbox never
// fragments), so one the kernel truncated is dropped.
func (r *Relay) udpLoop(h *holding, pc *net.UDPConn) {
	defer r.wg.Done()
	br := rawsock.NewBatchConn(pc) // raw recvmmsg on Linux (internal/rawsock says why)
	local := unmapPort(pc.LocalAddr().(*net.UDPAddr).AddrPort())
	msgs := make([]ipv4.Message, udpReadBatch)
	backing := make([]byte, udpReadBatch*r.mtu)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{backing[i*r.mtu : (i+1)*r.mtu]}
	}
	for {
		n, err := br.ReadBatch(msgs, 0)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || h.ctx.Err() != nil {
				return
			}
			continue // a transient error on an unconnected socket
		}
		for i := range msgs[:n] {
			m := &msgs[i]
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			if m.Flags&syscall.MSG_TRUNC != 0 {
				if ce := r.log.Check(zap.DebugLevel, "udp datagram larger than the tunnel mtu"); ce != nil {
					ce.Write(zap.Stringer("src", ua), zap.Int("mtu", r.mtu))
				}
				continue
			}
			r.eng.HandleUDP(h, unmapPort(ua.AddrPort()), local, m.Buffers[0][:m.N])
		}
	}
}
