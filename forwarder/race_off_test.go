//go:build !race

package forwarder

// raceEnabled: heap figures under the race detector are not comparable.
const raceEnabled = false
