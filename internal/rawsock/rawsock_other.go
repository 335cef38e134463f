//go:build !linux

package rawsock

import "net"

// Reader is Linux's only; elsewhere a conn reads through its own Read.
type Reader struct{}

// NewReader is nil off Linux: use the conn's own Read.
func NewReader(net.Conn) *Reader { return nil }

// Read is never called on a nil Reader.
func (*Reader) Read([]byte) (int, error) { panic("rawsock: Reader off Linux") }
