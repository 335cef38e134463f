package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
)

// ErrNotRunning means no natbox answers on the control socket. The CLI exits 1.
var ErrNotRunning = errors.New("natbox is not running")

// Client talks to a running natbox over its control socket.
type Client struct {
	socket string
	hc     *http.Client
}

// Dial returns a client for the natbox whose control socket is at socketPath.
// It fails with ErrNotRunning when there is no socket there. Close the client
// when done.
func Dial(socketPath string) (*Client, error) {
	fi, err := os.Stat(socketPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w (no socket at %s); start it with natbox run, or pass --socket", ErrNotRunning, socketPath)
	case err != nil:
		return nil, socketError(socketPath, err)
	case fi.Mode().Type() != fs.ModeSocket:
		return nil, fmt.Errorf("%s is not a socket; pass the [admin] socket of the running natbox with --socket", socketPath)
	}
	var d net.Dialer
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socketPath, hc: &http.Client{Transport: tr}}, nil
}

// Close releases the client's idle connection.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

// Status returns the running natbox's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/status", &st)
	return st, err
}

// Sessions returns the live sessions, only mapping's when it is not "".
func (c *Client) Sessions(ctx context.Context, mapping string) ([]Session, error) {
	path := "/v1/sessions"
	if mapping != "" {
		path += "?mapping=" + url.QueryEscape(mapping)
	}
	var ss []Session
	err := c.do(ctx, http.MethodGet, path, &ss)
	return ss, err
}

// Reload asks natbox to re-read its config. An invalid config comes back as a
// *ConfigError listing every problem; nothing changed then.
func (c *Client) Reload(ctx context.Context) (ReloadResult, error) {
	var res ReloadResult
	err := c.do(ctx, http.MethodPost, "/v1/reload", &res)
	return res, err
}

// Ready asks the running natbox's /readyz: nil when it is ready, else why
// not (not running, or an ingress not up yet, such as an unregistered uplink).
func (c *Client) Ready(ctx context.Context) error {
	status, body, err := c.roundTrip(ctx, http.MethodGet, "/readyz", 4096)
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		msg := strings.TrimSpace(string(body))
		if msg == "" {
			msg = http.StatusText(status)
		}
		return errors.New(msg)
	}
	return nil
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	status, body, err := c.roundTrip(ctx, method, path, 64<<20)
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		var eb errorBody
		if json.Unmarshal(body, &eb) != nil || eb.Error == "" {
			return fmt.Errorf("%s %s: %d %s", method, path, status, http.StatusText(status))
		}
		if status == http.StatusUnprocessableEntity {
			return &ConfigError{Lines: eb.Errors}
		}
		return errors.New(eb.Error)
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("decode answer from %s: %w; is natbox the same version as this command?", c.socket, err)
	}
	return nil
}

// roundTrip sends one request over the socket and reads at most limit bytes
// of the answer.
func (c *Client) roundTrip(ctx context.Context, method, path string, limit int64) (status int, body []byte, err error) {
	// The host is ignored: the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://natbox"+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, socketError(c.socket, err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		return 0, nil, fmt.Errorf("read answer from %s: %w", c.socket, err)
	}
	return resp.StatusCode, body, nil
}

// socketError turns a dial failure into words that say what to do.
func socketError(socket string, err error) error {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w (nothing answers on %s, a stale socket); start it with natbox run, or pass --socket", ErrNotRunning, socket)
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w (no socket at %s); start it with natbox run, or pass --socket", ErrNotRunning, socket)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("permission denied on %s; run as root or as a member of the socket's group", socket)
	}
	return fmt.Errorf("talk to natbox on %s: %w", socket, err)
}
