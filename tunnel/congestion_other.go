//go:build !linux

package tunnel

import "net"

// socketCongestion is Linux's TCP_CONGESTION: elsewhere c keeps the
// system's, and what it runs is unknown.
func socketCongestion(net.Conn, string) string { return "" }
