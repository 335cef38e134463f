package tunnel

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"time"

	"github.com/natbox/natbox/conf"
)

// The TCP transport's TLS, and why it is enough.
//
// TLS here is a disguise and a channel, not the security: the stream looks
// like HTTPS (port 443, SNI, ALPN "h2"/"http/1.1", TLS 1.3), and WireGuard
// inside it authenticates and encrypts every packet exactly as over UDP.
// What TLS pinning must add is that a middlebox which terminates TLS (a
// corporate proxy with its own CA) cannot sit in the stream unnoticed, and
// that the relay spends nothing on strangers. No CA is involved; instead
// both ends prove their WireGuard keys bound to this TLS session:
//
//	S = X25519(appliance private, relay public) = X25519(relay private, appliance public)
//	E = TLS exporter(streamExporterLabel, 32 bytes): different on each leg of a TLS-terminating middlebox
//	appliance -> relay: its public key A
//	relay -> appliance: HMAC-SHA256(S, "relay" || E || A)   (32 random bytes when A is not a peer)
//	appliance -> relay: HMAC-SHA256(S, "appliance" || E || A)
//
// The relay's certificate is a fresh self-signed one; the appliance checks
// the relay's proof instead of it, so "the certificate is pinned" by the
// relay's WireGuard public key through the session it signs. A
// middlebox knows neither private key, so it cannot produce a proof for
// either leg. A prober that does not know a configured peer's public key
// gets 32 random bytes and a closed connection, like any server refusing a
// bad request. Not hidden: traffic analysis (a long-lived TLS connection with
// WireGuard's packet sizes), and that the relay speaks TLS on 443.
const (
	streamExporterLabel = "EXPORTER-natbox-wireguard-tcp-v1"
	proofSize           = sha256.Size
)

// errRelayProof is the appliance's error for a relay that did not prove
// its key.
var errRelayProof = errors.New("the relay did not prove uplink.relay_public_key over TLS; " +
	"check relay_public_key, that this appliance is a [[peer]] of the relay, and that no proxy terminates TLS on the way")

var streamALPN = []string{"h2", "http/1.1"}

// streamServerTLS is the relay's TLS config with a fresh self-signed
// certificate for name.
func streamServerTLS(name string) (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   streamALPN,
		MinVersion:   tls.VersionTLS13,
	}, nil
}

// streamClientTLS is the appliance's TLS config; serverName is the SNI
// (empty for an IP address, as browsers send none for one).
func streamClientTLS(serverName string) *tls.Config {
	return &tls.Config{
		ServerName: serverName,
		NextProtos: streamALPN,
		MinVersion: tls.VersionTLS13,
		// The certificate is not what is trusted: streamAuthClient checks the
		// relay's proof of its WireGuard key, bound to this session.
		InsecureSkipVerify: true,
	}
}

// sharedSecret is X25519(priv, pub) for two WireGuard keys.
func sharedSecret(priv, pub conf.Key) ([]byte, error) {
	k, err := ecdh.X25519().NewPrivateKey(priv[:])
	if err != nil {
		return nil, err
	}
	p, err := ecdh.X25519().NewPublicKey(pub[:])
	if err != nil {
		return nil, err
	}
	return k.ECDH(p) // fails for a low-order public key
}

func streamProof(secret []byte, role string, exporter []byte, appliance conf.Key) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(role))
	m.Write(exporter)
	m.Write(appliance[:])
	return m.Sum(nil)
}

func exporterOf(c *tls.Conn) ([]byte, error) {
	cs := c.ConnectionState()
	return cs.ExportKeyingMaterial(streamExporterLabel, nil, 32)
}

// streamAuthClient runs the appliance's side of the proof on a completed
// TLS connection.
func streamAuthClient(c *tls.Conn, priv, relayPub conf.Key) error {
	exp, err := exporterOf(c)
	if err != nil {
		return err
	}
	secret, err := sharedSecret(priv, relayPub)
	if err != nil {
		return fmt.Errorf("uplink.relay_public_key: %w", err)
	}
	pub := priv.Public()
	if _, err := c.Write(pub[:]); err != nil {
		return fmt.Errorf("send key: %w", err)
	}
	got := make([]byte, proofSize)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("%w (read proof: %v)", errRelayProof, err)
	}
	if !hmac.Equal(got, streamProof(secret, "relay", exp, pub)) {
		return errRelayProof
	}
	if _, err := c.Write(streamProof(secret, "appliance", exp, pub)); err != nil {
		return fmt.Errorf("send proof: %w", err)
	}
	return nil
}

// errPeerProof is the relay's refusal of a stream whose appliance is not a
// peer or did not prove its key.
var errPeerProof = errors.New("not a configured peer, or a bad proof")

// streamAuthServer runs the relay's side; lookup says whether a public key
// is a configured peer, and returns its name. It returns the peer's name
// and public key.
func streamAuthServer(c *tls.Conn, priv conf.Key, lookup func(conf.Key) (string, bool)) (string, conf.Key, error) {
	var pub conf.Key
	exp, err := exporterOf(c)
	if err != nil {
		return "", pub, err
	}
	if _, err := io.ReadFull(c, pub[:]); err != nil {
		return "", pub, fmt.Errorf("read key: %w", err)
	}
	name, known := lookup(pub)
	var secret []byte
	if known {
		if secret, err = sharedSecret(priv, pub); err != nil {
			known = false
		}
	}
	proof := make([]byte, proofSize)
	if known {
		proof = streamProof(secret, "relay", exp, pub)
	} else {
		rand.Read(proof)
	}
	if _, err := c.Write(proof); err != nil {
		return "", pub, fmt.Errorf("send proof: %w", err)
	}
	got := make([]byte, proofSize)
	if _, err := io.ReadFull(c, got); err != nil {
		return "", pub, fmt.Errorf("read proof: %w", err)
	}
	if !known || !hmac.Equal(got, streamProof(secret, "appliance", exp, pub)) {
		return "", pub, errPeerProof
	}
	return name, pub, nil
}

// serverName is the SNI to send for host: none for an IP address.
func serverName(host string) string {
	if net.ParseIP(host) != nil {
		return ""
	}
	return host
}
