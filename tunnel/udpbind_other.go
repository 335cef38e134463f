//go:build !linux

package tunnel

import "golang.zx2c4.com/wireguard/conn"

// newUDPBind returns the conn.Bind of the tunnel's UDP sockets: off Linux,
// wireguard-go's standard bind (its batch there is one datagram).
func newUDPBind() conn.Bind { return conn.NewStdNetBind() }
