package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"

	"github.com/natbox/natbox/conf"
)

// isLoopbackListen reports whether a host:port listen address only accepts
// connections from this machine. An empty host, a wildcard or a name other
// than "localhost" is not loopback.
func isLoopbackListen(listen string) (bool, error) {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false, fmt.Errorf("admin.listen %q: %w; write host:port, e.g. \"127.0.0.1:9108\"", listen, err)
	}
	if host == "localhost" {
		return true, nil
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return false, nil // a name may resolve anywhere
	}
	return addr.Unmap().IsLoopback(), nil
}

// CheckListen reports what would stop the HTTP listener of cfg from starting
// for want of a token (natbox check runs it, so a missing token file is found
// before natbox starts).
func CheckListen(cfg conf.Admin) error {
	if cfg.Listen == "" {
		return nil
	}
	_, err := listenToken(cfg)
	return err
}

// listenToken returns the bearer token the HTTP listener requires: the content
// of cfg.TokenFile, or "" (open) on loopback without a token file.
func listenToken(cfg conf.Admin) (string, error) {
	loopback, err := isLoopbackListen(cfg.Listen)
	if err != nil {
		return "", err
	}
	if cfg.TokenFile == "" {
		if loopback {
			return "", nil
		}
		return "", fmt.Errorf("admin.listen %q is not a loopback address, so it needs a token; "+
			"set [admin] token_file to a file holding a long random string (e.g. head -c 32 /dev/urandom | base64 > /etc/natbox/admin.token), "+
			"or listen on 127.0.0.1", cfg.Listen)
	}
	data, err := os.ReadFile(cfg.TokenFile)
	if err != nil {
		return "", fmt.Errorf("admin.token_file: %w; create it with a long random string", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("admin.token_file %s is empty; write a long random string into it", cfg.TokenFile)
	}
	return token, nil
}

// requireToken answers 401 unless the request carries Authorization: Bearer token.
func requireToken(token string, next http.Handler) http.Handler {
	g := &tokenGate{}
	g.set(token)
	return g.wrap(next)
}

// tokenGate holds the bearer token the HTTP listener requires; a reload can
// replace it (token rotation) while requests are served.
type tokenGate struct {
	// Comparing fixed-size digests keeps the comparison constant-time
	// whatever the length of the presented token. nil: no token required.
	want atomic.Pointer[[sha256.Size]byte]
}

func (g *tokenGate) set(token string) {
	if token == "" {
		g.want.Store(nil)
		return
	}
	sum := sha256.Sum256([]byte(token))
	g.want.Store(&sum)
}

func (g *tokenGate) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := g.want.Load()
		if want == nil {
			next.ServeHTTP(w, r)
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(strings.TrimSpace(got)))
		if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="natbox"`)
			http.Error(w, "unauthorized: send Authorization: Bearer <the content of [admin] token_file>", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}
