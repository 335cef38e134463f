//go:build linux

package app_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/chromedp"

	"github.com/natbox/natbox/internal/app"
)

// screenshotEnv names a file the browser test saves its screenshot to
// (the README's docs/status-page.png is made this way).
const screenshotEnv = "NATBOX_STATUS_SCREENSHOT"

// findChromium returns the headless browser, or skips the test without one
// (fails under CI=true, where .ci/run installs Debian's chromium).
func findChromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("browser test: no chromium on PATH under CI=true (.ci/run installs Debian's chromium)")
	}
	t.Skip("browser test: needs chromium on PATH (apt-get install chromium)")
	return ""
}

// TestStatusPageInBrowser drives headless Chromium against a running
// appliance with real traffic through its netstack: the login, the
// mappings, a counter rising during a transfer, a refusal appearing live.
func TestStatusPageInBrowser(t *testing.T) {
	chromium := findChromium(t)

	sink := serveTCP(t, func(c *net.TCPConn) { c.ReadFrom(c) }) // echo, so bytes flow both ways
	token := "browser-test-token-0123456789"
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	listen := freeLoopbackAddr(t)
	// A token file makes the loopback listener require the token, as it
	// must off loopback.
	h := newHarness(t, spec{
		Admin: fmt.Sprintf("listen = %q\ntoken_file = %q", listen, tokenFile),
		Mappings: mapping("bulk", "tcp", "8900", sink.String(), `description = "the NAS"`) +
			mapping("guarded", "tcp", "8901", sink.String(), `allow = ["192.0.2.0/24"]`) +
			mapping("old", "tcp", "8902", sink.String(), "expires = 2020-01-01"),
	}, app.Options{Version: "browser-test"})
	h.run()
	base := "http://" + listen

	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		append(chromedp.DefaultExecAllocatorOptions[:],
			chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(1280, 1000))...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	// The first action starts the browser, which lives as long as the
	// context of that call: it gets bctx itself, later steps a deadline.
	if err := chromedp.Do(bctx, chromedp.Navigate(base+"/")); err != nil {
		t.Fatalf("browser: open the page: %v", err)
	}
	step := func() context.Context {
		ctx, cancel := context.WithTimeout(bctx, 20*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	run := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(step(), actions...); err != nil {
			t.Fatalf("browser: %s: %v", what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(step(), chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("browser: read %s: %v", sel, err)
		}
		return s
	}
	mappingRows := func() int {
		t.Helper()
		n, err := chromedp.Run(step(), chromedp.Evaluate[int](`document.querySelectorAll("tr[data-mapping]").length`))
		if err != nil {
			t.Fatalf("browser: count mappings: %v", err)
		}
		return n
	}

	// Without the token: the login form, and no mapping.
	run("the login form", chromedp.WaitVisible(chromedp.ID("token")))
	if n := mappingRows(); n != 0 {
		t.Fatalf("the page shows %d mappings before the login", n)
	}
	run("log in with a wrong token", chromedp.SendKeys(chromedp.ID("token"), "not-the-token"),
		chromedp.Submit(chromedp.ID("token")), chromedp.WaitVisible(chromedp.ID("problem")))
	if p, n := text("#problem"), mappingRows(); p != "Wrong token." || n != 0 {
		t.Fatalf("wrong token: problem %q, %d mappings shown", p, n)
	}
	run("log in", chromedp.SendKeys(chromedp.ID("token"), token), chromedp.Submit(chromedp.ID("token")),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-mapping="bulk"]`)))

	for name, want := range map[string]string{"bulk": "active", "guarded": "active", "old": "expired"} {
		if got := text(fmt.Sprintf(`tr[data-mapping=%q] [data-k="state"]`, name)); got != want {
			t.Errorf("mapping %s shows state %q, want %q", name, got, want)
		}
	}
	if w := text("#warnings"); !strings.Contains(w, "old expired on 2020-01-01") {
		t.Errorf("warnings %q lack the expired mapping", w)
	}

	// A refused connection appears under its reason without a reload.
	h.expectRefused(ap(client4, 0), ap(public4, 8901))
	run("the refusal appears", chromedp.WaitVisible(chromedp.CSS(`tr[data-mapping="guarded"] .refusal[data-reason="not_allowed"]`)))
	if got := text(`tr[data-mapping="guarded"] .refusal[data-reason="not_allowed"] b`); got != "1" {
		t.Errorf("not_allowed shows %q, want 1", got)
	}

	// A transfer runs: the byte counter rises on its own, twice, and the rate is drawn.
	c := h.mustDial(ap(client4, 0), ap(public4, 8900))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		chunk := make([]byte, 64<<10)
		for range 1200 { // at most ~77 MiB over ~60 s
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	go func() { defer wg.Done(); io.Copy(io.Discard, c) }()
	defer func() { close(stop); c.Close(); wg.Wait() }()

	in := `tr[data-mapping="bulk"] [data-k="bytes_in"]`
	seen := []string{text(in)}
	deadline := time.Now().Add(20 * time.Second)
	for len(seen) < 3 && time.Now().Before(deadline) {
		if v := text(in); v != seen[len(seen)-1] {
			seen = append(seen, v)
		}
		time.Sleep(100 * time.Millisecond) // the page polls every 2 s; this only paces the reads
	}
	if len(seen) < 3 {
		t.Fatalf("bytes in of bulk did not rise twice during the transfer: %q", seen)
	}
	run("the rate is drawn", chromedp.Poll[chromedp.Void](`(() => {
		const p = document.querySelector('tr[data-mapping="bulk"] polyline.in').getAttribute("points");
		return p && p.split(" ").length >= 2;
	})()`, chromedp.WithPollingTimeout(15*time.Second)))
	if r := text(`tr[data-mapping="bulk"] [data-k="rate_in"]`); !strings.HasSuffix(r, "iB/s") {
		t.Errorf("rate while transferring: %q, want KiB/s or more", r)
	}

	if path := os.Getenv(screenshotEnv); path != "" {
		// A chart of a dozen samples (24 s) shows what it is for.
		if _, err := chromedp.Run(bctx, chromedp.Poll[chromedp.Void](
			`document.querySelector('tr[data-mapping="bulk"] polyline.in').getAttribute("points").split(" ").length >= 12`,
			chromedp.WithPollingTimeout(40*time.Second))); err != nil {
			t.Fatalf("browser: a longer chart: %v", err)
		}
		png, err := chromedp.Run(step(), chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("browser: screenshot: %v", err)
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// On a phone the page fits the screen's width; in dark mode it is dark.
	run("a phone", chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile),
		chromedp.Poll[chromedp.Void](`document.documentElement.scrollWidth <= window.innerWidth`, chromedp.WithPollingTimeout(5*time.Second)))
	if d, err := chromedp.Run(step(), chromedp.Evaluate[string](`getComputedStyle(document.querySelector("#mappings thead")).display`)); err != nil || d != "none" {
		t.Errorf("on a phone the mapping table's head is %q (%v), want cards without it", d, err)
	}
	dark := func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
		_, err := cdp.Call(ctx, tg, emulation.SetEmulatedMedia, emulation.SetEmulatedMediaParams{
			Features: []*emulation.MediaFeature{{Name: "prefers-color-scheme", Value: "dark"}}})
		return chromedp.Void{}, err
	}
	run("dark mode", dark, chromedp.Poll[chromedp.Void](`getComputedStyle(document.body).backgroundColor === "rgb(18, 18, 18)"`,
		chromedp.WithPollingTimeout(5*time.Second)))

	// The sessions view lists the live transfer with its real client.
	run("open the sessions", chromedp.Click(chromedp.CSS(`tr[data-mapping="bulk"] a`)),
		chromedp.WaitVisible(chromedp.ID("sessions")))
	if s := text("#sessions tbody"); !strings.Contains(s, client4.String()) || !strings.Contains(s, sink.String()) {
		t.Errorf("sessions view %q lacks the client %s or the target %s", s, client4, sink)
	}
}
