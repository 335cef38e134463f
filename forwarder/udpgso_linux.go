package forwarder

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/unix"
)

// udpGSO: Linux sends a run of datagrams as one buffer with UDP_SEGMENT
// (since 4.18; an older kernel refuses it and the writer falls back).
const udpGSO = true

// appendUDPSegment appends a UDP_SEGMENT control message carrying size, the
// size of each datagram the kernel cuts the buffer into.
func appendUDPSegment(b []byte, size uint16) []byte {
	n := len(b)
	b = append(b, make([]byte, unix.CmsgSpace(2))...)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[n]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[n+unix.CmsgLen(0):], size)
	return b
}
