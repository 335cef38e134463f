package tunnel

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/natbox/natbox/conf"
)

// The control protocol runs over one TCP connection from an appliance to the
// relay's ControlPort, inside the tunnel. Each message is one JSON object on
// one line (at most maxControlLine bytes with its newline). Every message
// carries "v" (the sender's protocol version) and "type"; receivers ignore
// unknown fields and unknown types, so either side can grow the protocol.
//
//	appliance -> relay  {"v":1,"type":"hello","version":"natbox 1.2","checksums_optional":true,"warm_streams":true}
//	relay -> appliance  {"v":1,"type":"hello","peer":"home-nas","version":"natbox 1.2","checksums_optional":true}
//	appliance -> relay  {"v":1,"type":"register","ports":["tcp/443","udp/10000-10100"],"udp_idle_ms":{"udp/10000-10100":300000}}
//	relay -> appliance  {"v":1,"type":"result","port":"tcp/443","ok":true}
//	relay -> appliance  {"v":1,"type":"result","port":"udp/10000-10100","ok":false,"reason":"not in this peer's ports"}
//	appliance -> relay  {"v":1,"type":"warm_reset"}   its path MTU changed (warm.go)
//	appliance -> relay  {"v":1,"type":"ping"}   every pingInterval
//	relay -> appliance  {"v":1,"type":"pong"}
//	either              {"v":1,"type":"error","reason":"..."}   then closes
//
// A register carries the appliance's whole wanted set: the relay keeps the
// ports listed, opens the new ones and releases the rest. It answers with one
// result per listed spec, in order, and sends a fresh result later whenever a
// port's state changes on its own (a reload took the allowance away, or a port
// another peer held became free). Each spec names one protocol and a port or
// range; a range is granted or refused as a whole.
//
// The relay bounds what one peer can make it hold (control_limits.go): one
// connection waiting for its hello per peer, a hello within 5 s, and a
// message rate; a refused connection gets an error naming the reason.

// ProtocolVersion is the control protocol version this package speaks.
const ProtocolVersion = 1

// The control protocol versions a relay accepts in a hello. An appliance
// outside them is refused with a reason naming both: upgrade the relay
// before its appliances when the protocol changes.
const (
	MinProtocolVersion = 1
	MaxProtocolVersion = ProtocolVersion
)

// maxControlLine bounds one control message, newline included.
const maxControlLine = 64 << 10

// Control message types.
const (
	msgHello    = "hello"
	msgRegister = "register"
	msgResult   = "result"
	msgPing     = "ping"
	msgPong     = "pong"
	msgError    = "error"
	msgWarm     = "warm_reset"
)

// message is every control message; fields unused by a type are omitted.
type message struct {
	V       int    `json:"v"`
	Type    string `json:"type"`
	Peer    string `json:"peer,omitempty"`    // hello from the relay: the name it knows the appliance by
	Version string `json:"version,omitempty"` // hello: software version, for logs
	// ChecksumsOptional (hello): the sender's stack does not verify TCP
	// and UDP checksums of tunnel packets; its peer may leave them 0
	// (WithChecksumsOptional).
	ChecksumsOptional bool `json:"checksums_optional,omitempty"`
	// WarmStreams (hello, from an appliance): it serves warm streams
	// (warm.go).
	WarmStreams bool     `json:"warm_streams,omitempty"`
	Ports       []string `json:"ports,omitempty"` // register
	// UDPIdle is a register's UDP idle timeout per spec, in milliseconds:
	// the appliance mapping's idle_timeout, which the relay's session for
	// it follows. Absent (an older appliance): the relay's default.
	UDPIdle map[string]int64 `json:"udp_idle_ms,omitempty"`
	Port    string           `json:"port,omitempty"`   // result
	OK      bool             `json:"ok,omitempty"`     // result
	Reason  string           `json:"reason,omitempty"` // result (refused) or error
}

// ErrControlLineTooLong is returned when a control message exceeds 64 KiB.
var ErrControlLineTooLong = errors.New("control message longer than 64 KiB")

// errBadMessage marks a line that is not a control message.
var errBadMessage = errors.New("not a control message")

// controlConn frames messages on a connection. One goroutine reads; any
// goroutine may write (writes are serialised).
type controlConn struct {
	c  net.Conn
	r  *bufio.Reader
	mu sync.Mutex // serialises writes
}

func newControlConn(c net.Conn) *controlConn {
	return &controlConn{c: c, r: bufio.NewReaderSize(c, maxControlLine)}
}

// read returns the next message, waiting at most timeout (0: no deadline).
func (cc *controlConn) read(timeout time.Duration) (message, error) {
	if timeout > 0 {
		_ = cc.c.SetReadDeadline(time.Now().Add(timeout))
	}
	return readMessage(cc.r)
}

// write sends m, waiting at most timeout for the peer to take it.
func (cc *controlConn) write(m message, timeout time.Duration) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if timeout > 0 {
		_ = cc.c.SetWriteDeadline(time.Now().Add(timeout))
	}
	return writeMessage(cc.c, m)
}

// readMessage reads one line from r, which must have a buffer of at least
// maxControlLine bytes, and decodes it. Blank lines are skipped.
func readMessage(r *bufio.Reader) (message, error) {
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return message{}, ErrControlLineTooLong
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return message{}, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var m message
		if err := json.Unmarshal(line, &m); err != nil {
			return message{}, fmt.Errorf("decode control message: %w (%w)", err, errBadMessage)
		}
		if m.V < 1 {
			return message{}, fmt.Errorf("control message without a protocol version (\"v\"): %w", errBadMessage)
		}
		if m.Type == "" {
			return message{}, fmt.Errorf("control message without a type: %w", errBadMessage)
		}
		return m, nil
	}
}

// writeMessage encodes m as one line; V is filled in when zero.
func writeMessage(w io.Writer, m message) error {
	if m.V == 0 {
		m.V = ProtocolVersion
	}
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode control message: %w", err)
	}
	if len(b)+1 > maxControlLine {
		return ErrControlLineTooLong
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err
}

// portKey is one protocol (TCP or UDP, never both) and one port.
type portKey struct {
	proto conf.Proto
	port  uint16
}

func (k portKey) String() string {
	return conf.PortSpec{Proto: k.proto, Ports: conf.PortRange{Lo: k.port, Hi: k.port}}.String()
}

// splitProtos returns specs with every tcp+udp spec split in two, so each
// result names a single protocol.
func splitProtos(specs []conf.PortSpec) []conf.PortSpec {
	out := make([]conf.PortSpec, 0, len(specs))
	for _, s := range specs {
		for _, p := range []conf.Proto{conf.TCP, conf.UDP} {
			if s.Proto.Has(p) {
				out = append(out, conf.PortSpec{Proto: p, Ports: s.Ports})
			}
		}
	}
	return out
}

// parseWireSpec parses a spec from a register message: one protocol only.
func parseWireSpec(s string) (conf.PortSpec, error) {
	var ps conf.PortSpec
	if err := ps.UnmarshalText([]byte(s)); err != nil {
		return conf.PortSpec{}, err
	}
	if ps.Proto != conf.TCP && ps.Proto != conf.UDP {
		return conf.PortSpec{}, fmt.Errorf("port spec %q names more than one protocol; send tcp and udp separately", s)
	}
	return ps, nil
}
