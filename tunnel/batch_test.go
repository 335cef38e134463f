package tunnel

import (
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/natbox/natbox/conf"
)

// TestDeviceBatchSize: the device natbox builds holds deviceBatch buffers
// per receive function and TUN reader, not the standard bind's 128.
func TestDeviceBatchSize(t *testing.T) {
	t.Parallel()
	key, _ := conf.GenerateKey()
	d, _, err := newDevice(tuntest.NewChannelTUN().TUN(), newUDPBind(), key, 0, gatePackets, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if got := d.BatchSize(); got != deviceBatch {
		t.Fatalf("device batch size %d, want %d", got, deviceBatch)
	}
}

// TestDeviceRefusesLargerBatch: a bind that wants more buffers per receive
// than the device passes (the standard bind's 128 on Linux) is refused with
// a reason, not run to misread its batches.
func TestDeviceRefusesLargerBatch(t *testing.T) {
	t.Parallel()
	b := conn.NewStdNetBind()
	if b.BatchSize() <= deviceBatch {
		t.Skipf("the standard bind's batch is %d here", b.BatchSize())
	}
	key, _ := conf.GenerateKey()
	_, _, err := newDevice(tuntest.NewChannelTUN().TUN(), b, key, 0, gatePackets, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err == nil || !strings.Contains(err.Error(), "exceeds the device's") {
		t.Fatalf("newDevice with a batch of %d: %v, want a refusal", b.BatchSize(), err)
	}
}
