//go:build race

package app_test

// raceEnabled scales load tests down: -race slows gVisor about tenfold.
const raceEnabled = true
