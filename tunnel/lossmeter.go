package tunnel

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/device"
)

// lossMeter estimates how many WireGuard transport messages the path lost on
// the way in, from the counters they carry in the clear. A sender numbers
// each keypair's messages 0, 1, 2, ... and sends them in that order
// (wireguard-go's sequential sender), so a counter past the next one expected
// is a gap, and one below the highest seen is a late message filling an
// earlier gap: missing counts gaps less late messages. On a lossy path this
// is what the tunnel's TCP flows suffer from (each loss halves a flow's
// congestion window; tunnel/BENCH.md, "A lossy line"), so status and /metrics
// show it.
//
// It reads messages before wireguard-go authenticates them: a forged message
// can move the estimate, not the traffic. A counter more than lossMaxGap
// ahead of or behind the highest (an outage, or a forgery) restarts that
// receiver index's count from it instead of counting, so a forgery far off
// counts nothing and the next genuine message restarts the count again, and
// one close ahead adds a gap that the genuine messages it skipped take off
// again as they arrive "late".
type lossMeter struct {
	mu      sync.Mutex
	highest map[uint32]uint64 // per receiver index (one per keypair): highest counter seen; guarded by mu

	received atomic.Uint64 // transport messages seen (keepalives included)
	missing  atomic.Int64  // counters skipped, less the late ones that filled a gap
	sent     atomic.Uint64 // data messages sent (the other way, whose loss only the sender's TCP resends show)
}

const (
	// lossMaxGap bounds a gap counted as loss, and how late a message may
	// be to fill one: wireguard-go's replay window is about 8k messages.
	lossMaxGap = 4096
	// lossMaxIndexes bounds the receiver indexes tracked (keypairs rotate
	// every two minutes per peer); past it the table starts over, which
	// only loses the next message's comparison per index.
	lossMaxIndexes = 4096
	// transportHeader is a transport message's type, receiver index and
	// counter (device.MessageTransportHeaderSize).
	transportHeader = device.MessageTransportHeaderSize
)

func newLossMeter() *lossMeter { return &lossMeter{highest: make(map[uint32]uint64)} }

// observe counts the transport messages among the first n of msgs, and
// returns how many of them carry a packet (isData; the gate counts those).
func (m *lossMeter) observe(msgs [][]byte, sizes []int, n int) (data int) {
	var received uint64
	var missing int64
	m.mu.Lock()
	for i := range n {
		msg := msgs[i][:sizes[i]]
		if len(msg) < transportHeader || binary.LittleEndian.Uint32(msg) != device.MessageTransportType {
			continue
		}
		received++
		if len(msg) > device.MessageKeepaliveSize {
			data++
		}
		idx := binary.LittleEndian.Uint32(msg[4:8])
		ctr := binary.LittleEndian.Uint64(msg[8:16])
		hi, ok := m.highest[idx]
		switch {
		case !ok:
			if len(m.highest) >= lossMaxIndexes {
				clear(m.highest)
			}
			m.highest[idx] = ctr
		case ctr > hi && ctr-hi-1 <= lossMaxGap:
			missing += int64(ctr - hi - 1)
			m.highest[idx] = ctr
		case ctr <= hi && hi-ctr <= lossMaxGap:
			missing-- // late, or a duplicate (which wireguard-go drops)
		default:
			m.highest[idx] = ctr // too far either way: start over from here
		}
	}
	m.mu.Unlock()
	m.received.Add(received)
	if missing != 0 {
		m.missing.Add(missing)
	}
	return data
}

// counts returns the transport messages seen and those estimated lost (never
// negative: duplicates can outnumber the gaps).
func (m *lossMeter) counts() (received, lost uint64) {
	return m.received.Load(), uint64(max(m.missing.Load(), 0))
}

// sentCount returns the data messages sent.
func (m *lossMeter) sentCount() uint64 { return m.sent.Load() }
