package tunnel

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/natbox/natbox/conf"
)

func TestControlMessageRoundTrip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		msg  message
	}{
		{"hello", message{Type: msgHello, Peer: "home-nas", Version: "natbox 1.0"}},
		{"register", message{Type: msgRegister, Ports: []string{"tcp/443", "udp/10000-10100"}}},
		{"result ok", message{Type: msgResult, Port: "tcp/443", OK: true}},
		{"result refused", message{Type: msgResult, Port: "tcp/22", Reason: reasonNotAllowed}},
		{"ping", message{Type: msgPing}},
		{"pong", message{Type: msgPong}},
		{"error", message{Type: msgError, Reason: "expected hello"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var buf bytes.Buffer
			if err := writeMessage(&buf, tt.msg); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasSuffix(buf.Bytes(), []byte("\n")) || bytes.Count(buf.Bytes(), []byte("\n")) != 1 {
				t.Fatalf("not one line: %q", buf.String())
			}
			got, err := readMessage(bufio.NewReaderSize(&buf, maxControlLine))
			if err != nil {
				t.Fatal(err)
			}
			want := tt.msg
			want.V = ProtocolVersion
			if got.V != want.V || got.Type != want.Type || got.Peer != want.Peer || got.Version != want.Version ||
				strings.Join(got.Ports, ",") != strings.Join(want.Ports, ",") || got.Port != want.Port ||
				got.OK != want.OK || got.Reason != want.Reason {
				t.Fatalf("got %+v, want %+v", got, want)
			}
		})
	}
}

func TestControlReadRules(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		input    string
		wantType string
		wantErr  error  // errors.Is target, when set
		errText  string // substring, when set
	}{
		{name: "unknown fields ignored", input: `{"v":1,"type":"ping","future":{"x":[1,2]}}` + "\n", wantType: msgPing},
		{name: "newer version accepted", input: `{"v":7,"type":"pong"}` + "\n", wantType: msgPong},
		{name: "unknown type passed on", input: `{"v":1,"type":"stats"}` + "\n", wantType: "stats"},
		{name: "blank lines skipped", input: "\n\r\n" + `{"v":1,"type":"ping"}` + "\r\n", wantType: msgPing},
		{name: "missing version", input: `{"type":"ping"}` + "\n", errText: "without a protocol version"},
		{name: "missing type", input: `{"v":1}` + "\n", errText: "without a type"},
		{name: "not json", input: "hello\n", errText: "decode control message"},
		{name: "cut mid line", input: `{"v":1,"type":"pi`, wantErr: io.ErrUnexpectedEOF},
		{name: "clean eof", input: "", wantErr: io.EOF},
		{name: "oversize line", input: `{"v":1,"type":"register","ports":["` + strings.Repeat("x", maxControlLine) + `"]}` + "\n", wantErr: ErrControlLineTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m, err := readMessage(bufio.NewReaderSize(strings.NewReader(tt.input), maxControlLine))
			switch {
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
			case tt.errText != "":
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want one containing %q", err, tt.errText)
				}
			default:
				if err != nil {
					t.Fatal(err)
				}
				if m.Type != tt.wantType {
					t.Fatalf("type = %q, want %q", m.Type, tt.wantType)
				}
			}
		})
	}
}

func TestControlWriteRefusesOversize(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	err := writeMessage(&buf, message{Type: msgRegister, Ports: []string{strings.Repeat("x", maxControlLine)}})
	if !errors.Is(err, ErrControlLineTooLong) {
		t.Fatalf("err = %v, want ErrControlLineTooLong", err)
	}
	if buf.Len() != 0 {
		t.Fatalf("wrote %d bytes of an oversize message", buf.Len())
	}
}

func TestParseWireSpec(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in      string
		want    conf.PortSpec
		wantErr bool
	}{
		{in: "tcp/443", want: conf.PortSpec{Proto: conf.TCP, Ports: conf.PortRange{Lo: 443, Hi: 443}}},
		{in: "udp/10000-10100", want: conf.PortSpec{Proto: conf.UDP, Ports: conf.PortRange{Lo: 10000, Hi: 10100}}},
		{in: "tcp+udp/53", wantErr: true},
		{in: "sctp/1", wantErr: true},
		{in: "tcp/0", wantErr: true},
		{in: "443", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseWireSpec(tt.in)
		if (err != nil) != tt.wantErr || (!tt.wantErr && got != tt.want) {
			t.Errorf("parseWireSpec(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestSplitProtos(t *testing.T) {
	t.Parallel()
	in := []conf.PortSpec{
		{Proto: conf.TCPUDP, Ports: conf.PortRange{Lo: 53, Hi: 53}},
		{Proto: conf.TCP, Ports: conf.PortRange{Lo: 80, Hi: 81}},
	}
	got := strings.Join(specStrings(splitProtos(in)), " ")
	if want := "tcp/53 udp/53 tcp/80-81"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
