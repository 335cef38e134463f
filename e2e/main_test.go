//go:build linux

// Package e2e tests the built natbox binary end to end: network namespaces,
// a real kernel TUN, a simulated carrier-grade NAT and real kernel clients.
// The tests need root (CAP_NET_ADMIN) and iproute2; without them they skip,
// except under CI=true, where they fail so a broken CI machine cannot pass.
package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

var (
	// envErr says why this machine cannot run the e2e tests (nil: it can).
	envErr error
	// binDir holds the binaries built once by TestMain.
	binDir    string
	natboxBin string
	toolBin   string
	buildErr  error
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	envErr = probeEnv()
	if envErr == nil {
		sweepStaleNetns()
		buildErr = buildBinaries()
	}
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	return code
}

// probeEnv checks for root, iproute2, and that a namespace can really be made.
func probeEnv() error {
	if os.Geteuid() != 0 {
		return errors.New("not root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("iproute2 missing: %w", err)
	}
	name := fmt.Sprintf("%s%d-probe", netnsPrefix, os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add: %v: %s", err, out)
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns del: %v: %s", err, out)
	}
	return nil
}

// buildBinaries builds natbox and the traffic tool into a directory that an
// unprivileged user can read and execute (the relay test runs natbox as nobody).
func buildBinaries() error {
	dir, err := os.MkdirTemp("", "natbox-e2e-bin-")
	if err != nil {
		return err
	}
	binDir = dir
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	goBin, err := exec.LookPath("go") // go test puts GOROOT/bin on PATH
	if err != nil {
		return fmt.Errorf("find go: %w", err)
	}
	natboxBin = filepath.Join(dir, "natbox")
	toolBin = filepath.Join(dir, "tool")
	for _, b := range []struct{ out, pkg string }{
		{natboxBin, "./cmd/natbox"},
		{toolBin, "./e2e/internal/tool"},
	} {
		cmd := exec.Command(goBin, "build", "-o", b.out, b.pkg)
		cmd.Dir = ".." // the module root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	return nil
}

// requireE2E skips (or under CI=true fails) a test on a machine that cannot
// run it, and fails it when the binaries did not build.
func requireE2E(t *testing.T) {
	t.Helper()
	if envErr != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("e2e: cannot run under CI=true: %v (needs root with CAP_NET_ADMIN and iproute2)", envErr)
		}
		t.Skipf("e2e: needs root (CAP_NET_ADMIN) and iproute2 (%v)", envErr)
	}
	if buildErr != nil {
		t.Fatalf("e2e: %v", buildErr)
	}
}

// sweepStaleNetns deletes namespaces left by e2e runs whose process is gone
// (a run killed by a timeout cannot clean up after itself).
func sweepStaleNetns() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], netnsPrefix) {
			continue
		}
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(f[0], netnsPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			continue // another live run owns it
		}
		exec.Command("ip", "netns", "del", f[0]).Run()
	}
}
