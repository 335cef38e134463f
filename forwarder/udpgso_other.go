//go:build !linux

package forwarder

// udpGSO: no UDP GSO here; runs go out with one send per datagram.
const udpGSO = false

func appendUDPSegment(b []byte, size uint16) []byte { return b }
