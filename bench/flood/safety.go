package main

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"syscall"
	"time"
)

// Every address the generator may send to or forge lies in ranges that are
// never routed on the internet: the benchmarking block the bench topology
// uses for its client side and natbox's public address (RFC 2544), the
// documentation blocks (RFC 5737), and the topology's private side.
var (
	allowedSources = []netip.Prefix{
		netip.MustParsePrefix("198.18.0.0/15"),
		netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("198.51.100.0/24"),
		netip.MustParsePrefix("203.0.113.0/24"),
	}
	allowedDestinations = append([]netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")}, allowedSources...)
)

// Hard caps, whatever the flags say: a phase of the bench is 3 s at 20k
// SYN/s or 50k datagrams/s.
const (
	maxCount = 200_000
	maxRate  = 200_000
	maxTime  = 60 * time.Second
)

func within(p netip.Prefix, allowed []netip.Prefix) bool {
	for _, a := range allowed {
		if a.Bits() <= p.Bits() && a.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// checkTargets refuses a destination or a spoofed source prefix outside the
// test ranges.
func checkTargets(dst netip.Addr, src netip.Prefix) error {
	if !dst.Is4() || !within(netip.PrefixFrom(dst, 32), allowedDestinations) {
		return fmt.Errorf("destination %s is outside the test ranges %v", dst, allowedDestinations)
	}
	if src.IsValid() && (!src.Addr().Is4() || !within(src.Masked(), allowedSources)) {
		return fmt.Errorf("source prefix %s is outside the test ranges %v", src, allowedSources)
	}
	return nil
}

// checkNetns refuses to run unless this process sits in the named network
// namespace (the one `ip netns add NAME` created, bind-mounted under
// /run/netns), and that namespace is not the initial one.
func checkNetns(name string) error {
	if name == "" {
		return errors.New("-netns is required: the namespace (from `ip netns add`) this must run in")
	}
	if filepath.Base(name) != name || name == "." || name == ".." {
		return fmt.Errorf("-netns %q: a namespace name, not a path", name)
	}
	self, err := nsID("/proc/self/ns/net")
	if err != nil {
		return err
	}
	want, err := nsID(filepath.Join("/run/netns", name))
	if err != nil {
		return fmt.Errorf("namespace %q: %w", name, err)
	}
	if self != want {
		return fmt.Errorf("not inside network namespace %q: run under `ip netns exec %s`", name, name)
	}
	if self.ino == initNetIno {
		return fmt.Errorf("namespace %q is the initial network namespace: refusing", name)
	}
	// PID 1's namespace is the initial one where a sandbox lets us read it.
	if initial, err := nsID("/proc/1/ns/net"); err == nil && self == initial {
		return fmt.Errorf("namespace %q is PID 1's network namespace: refusing", name)
	}
	return nil
}

// initNetIno is the fixed inode number of the initial network namespace
// (PROC_NET_INIT_INO, Linux 6.x); older kernels number it like any other.
const initNetIno = 0xEFFFFFF9

type nsIdent struct{ dev, ino uint64 }

func nsID(path string) (nsIdent, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return nsIdent{}, fmt.Errorf("stat %s: %w", path, err)
	}
	return nsIdent{uint64(st.Dev), st.Ino}, nil
}
