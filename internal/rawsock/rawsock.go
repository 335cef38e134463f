// Package rawsock makes the non-blocking socket calls of the data path (a
// splice's reads and writes of a kernel socket) as raw system calls, which
// never enter the Go scheduler's system-call state.
//
// Why: every syscall.Syscall goes through entersyscall, and entersyscall
// wakes the runtime's sysmon thread whenever it sleeps because every P was
// idle. A proxy that waits between round trips (a terminal, a game, an API
// call) goes idle after each, so each request and each answer woke sysmon,
// and those thread switches took about a third of natbox's CPU in a gateway
// round trip (netstack/BENCH.md, "sysmon"). A call on a non-blocking socket
// never waits, so it need not hand its P over either; the netpoller does
// the waiting, as for the TUN (netstack/tun_linux.go).
package rawsock
