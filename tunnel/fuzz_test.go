package tunnel

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/natbox/natbox/conf"
)

// Fuzz targets for the control protocol. CI runs the seeds with go test and
// each target briefly with -fuzz (.ci/run).

// maxFuzzStream caps the stream FuzzReadMessage builds: a few maximum lines,
// enough to cross every framing edge.
const maxFuzzStream = 4 * maxControlLine

// readAllocBound is what one readMessage may allocate (bytes) for a line of
// n bytes: JSON decoding is linear in the line (the worst case, a register of
// empty ports, costs about 24 bytes a byte in string headers and slice
// growth), and the line is capped at maxControlLine, so no stream can make
// one read allocate more than readAllocBound(maxControlLine), about 2 MiB.
func readAllocBound(n int) uint64 { return 32*uint64(n) + 64<<10 }

// allocated returns the bytes the process has allocated so far.
func allocated() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.TotalAlloc
}

// TestReadMessageAllocationBounded drives the reader with the two hostile
// shapes: a line of the maximum length that decodes into the most values, and
// a stream ten times the cap without a newline.
func TestReadMessageAllocationBounded(t *testing.T) {
	prefix, suffix := `{"v":1,"type":"register","ports":[`, `""]}`+"\n"
	worst := prefix + strings.Repeat(`"",`, (maxControlLine-len(prefix)-len(suffix))/3) + suffix
	for _, tt := range []struct {
		name, stream string
		line         int
		wantErr      error
	}{
		{"max line of empty ports", worst, len(worst), nil},
		{"no newline for 640 KiB", strings.Repeat("x", 10*maxControlLine), maxControlLine, ErrControlLineTooLong},
	} {
		r := bufio.NewReaderSize(strings.NewReader(tt.stream), maxControlLine)
		before := allocated()
		m, err := readMessage(r)
		used := allocated() - before
		if !errors.Is(err, tt.wantErr) {
			t.Fatalf("%s: err = %v, want %v", tt.name, err, tt.wantErr)
		}
		if tt.wantErr == nil && len(m.Ports) != (len(worst)-len(prefix)-len(suffix))/3+1 {
			t.Fatalf("%s: %d ports", tt.name, len(m.Ports))
		}
		if bound := readAllocBound(tt.line); used > bound {
			t.Errorf("%s: allocated %d bytes, over the bound %d", tt.name, used, bound)
		}
		t.Logf("%s: %d-byte stream, %d bytes allocated (bound %d)", tt.name, len(tt.stream), used, readAllocBound(tt.line))
	}
}

// nextLine is the reader's contract, written out: the result of reading the
// next message from rest (the line it decodes, or the error it must return)
// and what stays unread.
func nextLine(rest []byte) (line []byte, wantErr error, after []byte) {
	for {
		i := bytes.IndexByte(rest, '\n')
		switch {
		case i >= maxControlLine || i < 0 && len(rest) >= maxControlLine:
			return nil, ErrControlLineTooLong, nil
		case i < 0 && len(rest) == 0:
			return nil, io.EOF, nil
		case i < 0:
			return nil, io.ErrUnexpectedEOF, nil
		}
		line, rest = rest[:i+1], rest[i+1:]
		if len(bytes.TrimSpace(line)) > 0 {
			return line, nil, rest
		}
	}
}

// FuzzReadMessage reads every message from a stream of data repeated
// 1+repeat times (at most maxFuzzStream bytes), as the relay and the uplink
// read what the other side sends. The reader must never panic, frame lines as
// nextLine says, allocate at most readAllocBound per message, and every
// message it returns must write and read back equal. Port specs in a
// register must parse as the relay parses them (one protocol each) and print
// back to themselves.
func FuzzReadMessage(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"type":"hello","version":"natbox 1.2"}` + "\n",
		`{"v":1,"type":"hello","peer":"home-nas","version":"natbox 1.2"}` + "\n" + `{"v":1,"type":"pong"}` + "\n",
		`{"v":1,"type":"register","ports":["tcp/443","udp/10000-10100","tcp+udp/53","x"]}` + "\n",
		`{"v":1,"type":"result","port":"udp/10000-10100","ok":false,"reason":"not in this peer's ports"}` + "\r\n",
		`{"v":2,"type":"future","extra":{"a":[1,2,{"b":null}]},"ok":true}` + "\n",
		"\n \t\r\n" + `{"v":1,"type":"ping"}`,
		`{"v":0,"type":"ping"}` + "\n",
		`{"v":1,"type":"error","reason":"\u00e9\ud800<>&\\"}` + "\n",
		`{"v":1e3,"type":"ping"}` + "\n",
		`{"v":1,"type":"register","ports":["` + strings.Repeat("tcp/1", 100) + `"]}`,
		"x\n",
	} {
		f.Add([]byte(s), uint8(0))
	}
	f.Add([]byte(strings.Repeat(" ", 1024)), uint8(255))          // one blank line past the cap
	f.Add([]byte(`{"v":1,"type":"register","ports":[`), uint8(3)) // cut off
	f.Add([]byte(`"",`), uint8(255))
	f.Fuzz(func(t *testing.T, data []byte, repeat uint8) {
		stream := bytes.Repeat(data, 1+int(repeat))
		if len(stream) > maxFuzzStream {
			stream = stream[:maxFuzzStream]
		}
		r := bufio.NewReaderSize(bytes.NewReader(stream), maxControlLine)
		rest := stream
		for {
			line, wantErr, after := nextLine(rest)
			before := allocated()
			m, err := readMessage(r)
			used := allocated() - before
			if wantErr != nil {
				if !errors.Is(err, wantErr) {
					t.Fatalf("read = %+v, %v; want %v", m, err, wantErr)
				}
				return
			}
			rest = after
			if bound := readAllocBound(len(line)); used > bound {
				t.Fatalf("reading a %d-byte line allocated %d bytes, over the bound %d", len(line), used, bound)
			}
			var want message
			if json.Unmarshal(line, &want) != nil || want.V < 1 || want.Type == "" {
				if err == nil {
					t.Fatalf("line %q was accepted as %+v", line, m)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(m, want) {
				t.Fatalf("line %q read as %+v, %v; want %+v", line, m, err, want)
			}
			want = m
			if len(want.Ports) == 0 { // "ports":[] is written as no ports
				want.Ports = nil
			}
			checkRoundTrip(t, m, want)
			if m.Type == msgRegister {
				for _, p := range m.Ports {
					checkWireSpec(t, p)
				}
			}
		}
	})
}

// checkWireSpec parses s as the relay parses a register's port: one
// protocol, and a form that prints back to the same spec.
func checkWireSpec(t *testing.T, s string) {
	t.Helper()
	spec, err := parseWireSpec(s)
	if err != nil {
		return
	}
	if spec.Proto != conf.TCP && spec.Proto != conf.UDP || spec.Ports.Lo == 0 || spec.Ports.Lo > spec.Ports.Hi {
		t.Fatalf("parseWireSpec(%q) = %+v", s, spec)
	}
	again, err := parseWireSpec(spec.String())
	if err != nil || again != spec {
		t.Fatalf("parseWireSpec(%q) = %+v prints as %q, which parses as %+v, %v", s, spec, spec.String(), again, err)
	}
}

// checkRoundTrip writes m and reads it back: it must come back as want, or
// the writer must refuse it as too long without writing anything.
func checkRoundTrip(t *testing.T, m, want message) {
	t.Helper()
	var buf bytes.Buffer
	if err := writeMessage(&buf, m); err != nil {
		if !errors.Is(err, ErrControlLineTooLong) || buf.Len() != 0 {
			t.Fatalf("write %+v: %v, %d bytes written", m, err, buf.Len())
		}
		return
	}
	b := buf.Bytes()
	if len(b) > maxControlLine || bytes.IndexByte(b, '\n') != len(b)-1 {
		t.Fatalf("write %+v: %d bytes, not one line of at most %d: %q", m, len(b), maxControlLine, b)
	}
	r := bufio.NewReaderSize(&buf, maxControlLine)
	got, err := readMessage(r)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("wrote %+v as %q, read back %+v, %v; want %+v", m, b, got, err, want)
	}
	if _, err := readMessage(r); err != io.EOF {
		t.Fatalf("after the message: %v, want EOF", err)
	}
}

// jsonString is s as it reads back from JSON: each byte that is not part of
// valid UTF-8 becomes U+FFFD (encoding/json's documented coercion).
func jsonString(s string) string { return string([]rune(s)) }

// FuzzWriteMessage builds a message from fuzzed fields (ports separated by
// ","), writes it and reads it back: what the writer writes, the reader must
// read back equal (V 0 is written as ProtocolVersion; strings are coerced to
// UTF-8 as JSON requires), unless the reader refuses it for a missing
// version or type, or the writer refuses it as longer than maxControlLine.
func FuzzWriteMessage(f *testing.F) {
	f.Add(0, msgHello, "home-nas", "natbox 1.2", "", "", false, "")
	f.Add(1, msgRegister, "", "", "tcp/443,udp/10000-10100", "", false, "")
	f.Add(1, msgResult, "", "", "", "tcp/443", true, "")
	f.Add(3, msgResult, "", "", "", "udp/1", false, "not in this peer's ports")
	f.Add(-1, msgPing, "", "", "", "", false, "")
	f.Add(1, "", "", "", "", "", false, "")
	f.Add(1, msgError, "\xff\xfe", "<&>", ",,", "\u2028", false, "\x00\n\"\\")
	f.Add(1, msgError, "", "", "", "", false, strings.Repeat("<", maxControlLine/6))
	f.Fuzz(func(t *testing.T, v int, typ, peer, version, ports, port string, ok bool, reason string) {
		m := message{V: v, Type: typ, Peer: peer, Version: version, Port: port, OK: ok, Reason: reason}
		if ports != "" {
			m.Ports = strings.Split(ports, ",")
		}
		want := message{V: v, Type: jsonString(typ), Peer: jsonString(peer), Version: jsonString(version),
			Port: jsonString(port), OK: ok, Reason: jsonString(reason)}
		if want.V == 0 {
			want.V = ProtocolVersion
		}
		for _, p := range m.Ports {
			want.Ports = append(want.Ports, jsonString(p))
		}
		if want.V >= 1 && want.Type != "" {
			checkRoundTrip(t, m, want)
			return
		}
		var buf bytes.Buffer
		err := writeMessage(&buf, m)
		if err != nil {
			if !errors.Is(err, ErrControlLineTooLong) {
				t.Fatalf("write %+v: %v", m, err)
			}
			return
		}
		if got, err := readMessage(bufio.NewReaderSize(&buf, maxControlLine)); err == nil {
			t.Fatalf("message without version or type %+v was read back as %+v", m, got)
		}
	})
}
