//go:build linux

package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// netnsPrefix starts every namespace name this package creates; the rest is
// the test process id, a per-lab sequence number and the namespace's role,
// so parallel runs and stale leftovers never collide.
const netnsPrefix = "nbe2e-"

// cmdTimeout bounds every command a test runs in the foreground.
const cmdTimeout = 30 * time.Second

var labSeq atomic.Int32

// lab is one test's set of namespaces, processes and files, all removed by
// t.Cleanup even when the test fails.
type lab struct {
	t   *testing.T
	id  string // netnsPrefix + pid + "-" + seq
	dir string // config files, keys, sockets; world-traversable for unprivileged natbox
}

func newLab(t *testing.T) *lab {
	t.Helper()
	requireE2E(t)
	dir, err := os.MkdirTemp("", "natbox-e2e-lab-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return &lab{
		t:   t,
		id:  fmt.Sprintf("%s%d-%d", netnsPrefix, os.Getpid(), labSeq.Add(1)),
		dir: dir,
	}
}

// netns is one network namespace of a lab.
type netns struct {
	t    *testing.T
	name string
}

// netns creates a namespace with loopback up, reverse-path filtering off and
// forwarding on (every namespace here is a router or a host that does not care).
func (l *lab) netns(role string) *netns {
	l.t.Helper()
	n := &netns{t: l.t, name: l.id + "-" + role}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		l.t.Fatalf("ip netns add %s: %v: %s", n.name, err, out)
	}
	l.t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			l.t.Errorf("ip netns del %s: %v: %s", n.name, err, out)
		}
	})
	n.must("ip", "link", "set", "lo", "up")
	n.must("sysctl", "-qw",
		"net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.ip_forward=1")
	return n
}

// link joins two namespaces with a veth pair (each end created directly in its
// namespace, so nothing ever appears in the host's) and addresses both ends.
// Interface names are per namespace; keep them short (15 bytes max).
func (l *lab) link(a *netns, aIf, aAddr string, b *netns, bIf, bAddr string) {
	l.t.Helper()
	if out, err := exec.Command("ip", "link", "add", aIf, "netns", a.name,
		"type", "veth", "peer", "name", bIf, "netns", b.name).CombinedOutput(); err != nil {
		l.t.Fatalf("ip link add %s/%s <-> %s/%s: %v: %s", a.name, aIf, b.name, bIf, err, out)
	}
	for _, end := range []struct {
		ns        *netns
		ifc, addr string
	}{{a, aIf, aAddr}, {b, bIf, bAddr}} {
		end.ns.must("ip", "addr", "add", end.addr, "dev", end.ifc)
		end.ns.must("ip", "link", "set", end.ifc, "up")
	}
}

// writeFile writes a file into the lab directory and returns its path.
func (l *lab) writeFile(name, content string, mode os.FileMode) string {
	l.t.Helper()
	p := filepath.Join(l.dir, name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		l.t.Fatal(err)
	}
	return p
}

// result is a finished foreground command.
type result struct {
	code   int // exit code; -1 if it did not start or was killed
	stdout string
	stderr string
	err    error
}

func (r result) String() string {
	if r.code == -1 && r.err != nil {
		return fmt.Sprintf("did not run to completion: %v, stdout %q, stderr %q", r.err, r.stdout, r.stderr)
	}
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
}

// run runs a command inside the namespace and returns what happened.
func (n *netns) run(args ...string) result {
	return n.runInput(nil, args...)
}

func (n *netns) runInput(stdin []byte, args ...string) result {
	return runCmd(stdin, append([]string{"ip", "netns", "exec", n.name}, args...)...)
}

func runCmd(stdin []byte, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := cmd.Run()
	r := result{code: -1, stdout: stdout.String(), stderr: stderr.String(), err: err}
	if cmd.ProcessState != nil {
		r.code = cmd.ProcessState.ExitCode()
	}
	return r
}

// must runs a command inside the namespace and fails the test if it fails.
func (n *netns) must(args ...string) string {
	n.t.Helper()
	r := n.run(args...)
	if r.code != 0 {
		n.t.Fatalf("%s: %s: %s", n.name, strings.Join(args, " "), r)
	}
	return r.stdout
}

// tool runs the traffic helper inside the namespace.
func (n *netns) tool(args ...string) result {
	return n.run(append([]string{toolBin}, args...)...)
}

// proc is a background process inside a namespace. Its output goes to the test
// log line by line and is kept for waitOutput.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited and its output is drained

	mu  sync.Mutex
	out bytes.Buffer // stdout and stderr interleaved
}

// start runs args in the namespace in the background. The process is killed
// (if still running) and reaped by t.Cleanup, before the namespace is deleted.
func (n *netns) start(name string, args ...string) *proc {
	n.t.Helper()
	return startProc(n.t, name, append([]string{"ip", "netns", "exec", n.name}, args...))
}

func startProc(t *testing.T, name string, args []string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, done: make(chan struct{})}
	p.cmd = exec.Command(args[0], args[1:]...)
	w := &lineLogger{p: p}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	// ip netns exec execs the command, so the pid is the command's own and
	// signals reach it directly; Pdeathsig stops it if the test binary dies.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.WaitDelay = 5 * time.Second
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.cmd.Wait() // the exit status is read from ProcessState
		w.flush()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
			return
		default:
		}
		p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not exit after SIGKILL", name, p.cmd.Process.Pid)
		}
	})
	return p
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func (p *proc) signal(sig os.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %s to %s: %v", sig, p.name, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(timeout time.Duration) (int, error) {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode(), nil
	case <-time.After(timeout):
		return -1, fmt.Errorf("%s still running after %v", p.name, timeout)
	}
}

// waitOutput waits until the process has printed substr.
func (p *proc) waitOutput(substr string, timeout time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if strings.Contains(p.output(), substr) {
			return
		}
		if p.exited() {
			p.t.Fatalf("%s exited (%v) before printing %q", p.name, p.cmd.ProcessState, substr)
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s did not print %q within %v", p.name, substr, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lineLogger copies a process's output to the test log, one line at a time.
type lineLogger struct {
	p       *proc
	partial []byte
}

func (w *lineLogger) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	w.p.out.Write(b)
	w.p.mu.Unlock()
	w.partial = append(w.partial, b...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		w.p.t.Logf("%s: %s", w.p.name, w.partial[:i])
		w.partial = w.partial[i+1:]
	}
	return len(b), nil
}

func (w *lineLogger) flush() {
	if len(w.partial) > 0 {
		w.p.t.Logf("%s: %s", w.p.name, w.partial)
		w.partial = nil
	}
}

// eventually polls check until it succeeds, failing the test with the last
// error after timeout, or at once if one of the watched processes exits.
func eventually(t *testing.T, what string, timeout time.Duration, check func() error, watch ...*proc) time.Duration {
	t.Helper()
	start := time.Now()
	var last error
	for {
		if last = check(); last == nil {
			return time.Since(start)
		}
		for _, p := range watch {
			if p.exited() {
				t.Fatalf("%s: %s exited (%v) while waiting; last check: %v", what, p.name, p.cmd.ProcessState, last)
			}
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v: %v", what, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// errResult turns a tool result into an error unless it exited 0.
func errResult(r result) error {
	if r.code == 0 {
		return nil
	}
	return errors.New(r.String())
}

// field returns the value of key=value in a whoami line.
func field(line, key string) string {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}
