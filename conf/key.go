package conf

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"

	"golang.org/x/crypto/curve25519"
)

// GenerateKey returns a new random, clamped Curve25519 private key, as
// wg genkey does.
func GenerateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return Key{}, fmt.Errorf("generate key: %w", err)
	}
	k[0] &= 248
	k[31] = k[31]&127 | 64
	return k, nil
}

// Public returns the public key of the private key k.
func (k Key) Public() Key {
	var pub Key
	curve25519.ScalarBaseMult((*[32]byte)(&pub), (*[32]byte)(&k))
	return pub
}

// String returns k in standard base64, the form wg and config files use.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// Hex returns k in lowercase hex, the form wireguard-go's UAPI wants.
func (k Key) Hex() string { return hex.EncodeToString(k[:]) }

// ParseKey parses a base64 key as printed by wg genkey or wg pubkey.
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(k) {
		// The value is not echoed: it may be a private key.
		return Key{}, valueErr("use 44 base64 characters (32 bytes) as printed by wg genkey or wg pubkey",
			"not a valid key")
	}
	copy(k[:], b)
	return k, nil
}

// UnmarshalText parses a base64 key.
func (k *Key) UnmarshalText(b []byte) error {
	v, err := ParseKey(string(b))
	if err != nil {
		return err
	}
	*k = v
	return nil
}

// MarshalText returns the base64 form.
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }
