//go:build !linux

package tunnel

import (
	"net"

	"golang.zx2c4.com/wireguard/conn"
)

// newUDPBind returns the conn.Bind of the tunnel's UDP sockets: off Linux,
// wireguard-go's standard bind (its batch there is one datagram).
func newUDPBind() conn.Bind { return conn.NewStdNetBind() }

// newBatchReader is the batchReader of the relay's public UDP socket pc.
func newBatchReader(pc *net.UDPConn) batchReader { return xnetBatchReader(pc) }
