package tunnel

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/natbox/natbox/conf"
)

// wgLog adapts wireguard-go's printf logger to zap: its verbose lines go to
// debug, its errors to warn (they are mostly transient: a lost handshake, a
// send to a vanished endpoint). Muted, it writes nothing: wireguard-go's
// Close does not wait for its handshake, encryption and decryption workers,
// which may still log after it returned, into a logger whose owner is done
// with it (wgDevice.Close mutes).
type wgLog struct {
	log   *zap.Logger
	mu    sync.RWMutex // held for reading while a line is written
	muted bool
}

func (l *wgLog) write(level zapcore.Level, format string, args []any) {
	ce := l.log.Check(level, "wireguard")
	if ce == nil {
		return
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if !l.muted {
		ce.Write(zap.String("event", fmt.Sprintf(format, args...)))
	}
}

// mute returns once no line is being written, and none will be.
func (l *wgLog) mute() {
	l.mu.Lock()
	l.muted = true
	l.mu.Unlock()
}

func (l *wgLog) logger() *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) { l.write(zap.DebugLevel, format, args) },
		Errorf:   func(format string, args ...any) { l.write(zap.WarnLevel, format, args) },
	}
}

// wgDevice is a wireguard-go device whose Close also mutes its logger.
type wgDevice struct {
	*device.Device
	log *wgLog
}

func (d *wgDevice) Close() {
	d.Device.Close()
	d.log.mute()
}

// newDevice builds a wireguard-go device on dev with bind (a streamBind
// around natbox's UDP bind, udpbind_linux.go, with GSO/GRO where the kernel
// has them), both gated (gate.go) so each direction of the device holds at
// most gate data packets, with batches of deviceBatch (batch.go), sets its
// private key and listen port (0: any), and brings it up. The device owns dev from here on:
// closing the device closes dev.
func newDevice(dev tun.Device, bind conn.Bind, key conf.Key, listenPort uint16, gate int, log *zap.Logger) (*wgDevice, gates, error) {
	if n := bind.BatchSize(); n > deviceBatch {
		dev.Close()
		return nil, gates{}, fmt.Errorf("wireguard bind batch %d exceeds the device's %d: its receive functions would want more buffers than wireguard-go passes", n, deviceBatch)
	}
	g := newGates(gate)
	wl := &wgLog{log: log}
	d := &wgDevice{Device: device.NewDevice(&gatedTUN{Device: dev, g: g, batch: deviceBatch},
		&gatedBind{Bind: bind, g: g, batch: deviceBatch}, wl.logger()), log: wl}
	uapi := fmt.Sprintf("private_key=%s\nlisten_port=%d\n", key.Hex(), listenPort)
	if err := d.IpcSet(uapi); err != nil {
		d.Close()
		return nil, g, fmt.Errorf("configure wireguard device: %w", err)
	}
	if err := d.Up(); err != nil {
		d.Close()
		return nil, g, fmt.Errorf("bring up wireguard on udp port %d: %w; pick a free port or stop what holds it", listenPort, err)
	}
	return d, g, nil
}

// peerUAPI is the UAPI "set" text for one peer. endpoint may be invalid (the
// peer's endpoint is then learned from its handshakes); keepalive 0 disables
// persistent keepalives. The peer's allowed IPs are replaced by allowed.
func peerUAPI(pub conf.Key, endpoint netip.AddrPort, keepalive time.Duration, allowed []netip.Prefix) string {
	var b strings.Builder
	fmt.Fprintf(&b, "public_key=%s\n", pub.Hex())
	if endpoint.IsValid() {
		fmt.Fprintf(&b, "endpoint=%s\n", endpoint)
	}
	fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(keepalive/time.Second))
	b.WriteString("replace_allowed_ips=true\n")
	for _, p := range allowed {
		fmt.Fprintf(&b, "allowed_ip=%s\n", p)
	}
	return b.String()
}

// removePeerUAPI is the UAPI "set" text that removes a peer.
func removePeerUAPI(pub conf.Key) string {
	return fmt.Sprintf("public_key=%s\nremove=true\n", pub.Hex())
}

// peerStats is what wireguard-go reports about one peer.
type peerStats struct {
	Endpoint      string
	LastHandshake time.Time // zero: never
	RxBytes       uint64
	TxBytes       uint64
}

// readPeerStats parses the device's UAPI "get" output into stats per public key.
func readPeerStats(d *wgDevice) (map[conf.Key]peerStats, error) {
	text, err := d.IpcGet()
	if err != nil {
		return nil, fmt.Errorf("read wireguard state: %w", err)
	}
	return parsePeerStats(text)
}

func parsePeerStats(text string) (map[conf.Key]peerStats, error) {
	out := make(map[conf.Key]peerStats)
	var (
		cur     conf.Key
		st      peerStats
		inPeer  bool
		hsSec   int64
		hsNsec  int64
		lineErr error
	)
	flush := func() {
		if !inPeer {
			return
		}
		if hsSec != 0 || hsNsec != 0 {
			st.LastHandshake = time.Unix(hsSec, hsNsec)
		}
		out[cur] = st
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		switch key {
		case "public_key":
			flush()
			b, err := hex.DecodeString(value)
			if err != nil || len(b) != len(cur) {
				return nil, fmt.Errorf("parse wireguard state: bad public key %q", value)
			}
			copy(cur[:], b)
			st, inPeer, hsSec, hsNsec = peerStats{}, true, 0, 0
		case "endpoint":
			st.Endpoint = value
		case "last_handshake_time_sec":
			hsSec, lineErr = strconv.ParseInt(value, 10, 64)
		case "last_handshake_time_nsec":
			hsNsec, lineErr = strconv.ParseInt(value, 10, 64)
		case "rx_bytes":
			st.RxBytes, lineErr = strconv.ParseUint(value, 10, 64)
		case "tx_bytes":
			st.TxBytes, lineErr = strconv.ParseUint(value, 10, 64)
		}
		if lineErr != nil {
			return nil, fmt.Errorf("parse wireguard state: %s: %w", key, lineErr)
		}
	}
	flush()
	return out, nil
}

// listenPort extracts the UDP port of a "host:port" WireGuard listen address.
// wireguard-go's bind listens on every address, so a specific host cannot be
// honoured; the caller warns about it.
func listenPort(hostPort string) (port uint16, host string, err error) {
	h, p, err := net.SplitHostPort(hostPort)
	if err != nil {
		return 0, "", fmt.Errorf("relay.listen %q: %w; write host:port, e.g. \"0.0.0.0:51820\"", hostPort, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return 0, "", fmt.Errorf("relay.listen %q: bad port: %w", hostPort, err)
	}
	return uint16(n), h, nil
}

// boundPort returns the UDP port the device listens on.
func boundPort(d *wgDevice) (uint16, error) {
	text, err := d.IpcGet()
	if err != nil {
		return 0, fmt.Errorf("read wireguard state: %w", err)
	}
	for line := range strings.Lines(text) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			n, err := strconv.ParseUint(v, 10, 16)
			return uint16(n), err
		}
	}
	return 0, errors.New("wireguard device has no listen port")
}
