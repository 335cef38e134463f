//go:build !linux

package netstack

// writeStepState: the zero-copy paths are Linux's (zerocopy_linux.go).
type writeStepState struct{}
