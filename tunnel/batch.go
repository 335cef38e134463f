package tunnel

// wireguard-go gives every receive function (UDP over IPv4, over IPv6,
// the streams) and its TUN reader as many 64 KiB message buffers as the
// bind and the tun device report in BatchSize, all allocated up front:
// with the standard bind's 128 that would be 32 MiB per device before a
// packet moves. natbox's bind (udpbind_linux.go) and tun device report
// deviceBatch; UDP GSO and GRO still carry up to 64 datagrams per message,
// so a smaller batch costs few syscalls (tunnel/BENCH.md).
const deviceBatch = 32
