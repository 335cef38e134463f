package app_test

import (
	"fmt"
	"net/netip"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/natbox/natbox/conf"
	"github.com/natbox/natbox/internal/app"
	"github.com/natbox/natbox/netstack"
)

// TestMTULimitsAgreeWithTheStack: every mtu natbox check accepts runs, and
// the stack refuses just outside conf's range, so check and run agree.
func TestMTULimitsAgreeWithTheStack(t *testing.T) {
	t.Parallel()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	for _, tt := range []struct {
		mtu int
		ok  bool
	}{
		{conf.MinMTU - 1, false},
		{conf.MinMTU, true},
		{conf.MaxTunnelMTU, true},
		{conf.MaxMTU, true},
		{conf.MaxMTU + 1, false},
	} {
		stackSide, outer := netstack.Pipe(tt.mtu)
		s, err := netstack.New(stackSide, netstack.Config{MTU: tt.mtu}, nopHandler{}, log)
		if (err == nil) != tt.ok {
			t.Errorf("netstack mtu %d: err = %v, want ok = %v", tt.mtu, err, tt.ok)
		}
		if s != nil {
			s.Close()
		}
		outer.Close()
	}

	// The appliance's TUN at both ends of what check accepts for tun.mtu.
	for _, mtu := range []int{conf.MinMTU, conf.MaxMTU} {
		cfg, _, err := conf.Parse("t.toml", []byte(fmt.Sprintf("[tun]\nmtu = %d\naddresses = [\"198.51.100.1/32\"]\n[admin]\nsocket = %q\n",
			mtu, t.TempDir()+"/a.sock")))
		if err != nil {
			t.Fatalf("check refused tun.mtu %d: %v", mtu, err)
		}
		appSide, outer := netstack.Pipe(mtu)
		a, err := app.NewAppliance(cfg, app.Options{TUNDevice: appSide}, log)
		if err != nil {
			t.Errorf("tun.mtu %d passes check but does not run: %v", mtu, err)
		} else {
			a.Close()
		}
		outer.Close()
	}
	// The relay's tunnel at both ends of what check accepts for relay.mtu.
	key, err := conf.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, mtu := range []int{conf.MinMTU, conf.MaxTunnelMTU} {
		cfg, _, err := conf.ParseRelay("r.toml", []byte(fmt.Sprintf("[relay]\nlisten = \"127.0.0.1:%d\"\nprivate_key = %q\naddress = \"10.77.0.1\"\nmtu = %d\n[admin]\nsocket = %q\n",
			freeUDPPort(t), key, mtu, t.TempDir()+"/r.sock")))
		if err != nil {
			t.Fatalf("check refused relay.mtu %d: %v", mtu, err)
		}
		n, err := app.NewRelayNode(cfg, "test", log)
		if err != nil {
			t.Errorf("relay.mtu %d passes check but does not run: %v", mtu, err)
			continue
		}
		n.Close()
	}
}

type nopHandler struct{}

func (nopHandler) HandleTCP(r *netstack.TCPRequest)        { r.Reject() }
func (nopHandler) HandleUDP(_, _ netip.AddrPort, _ []byte) {}

// TestTUNQueueLimitAgrees: the largest tun.queues check accepts is the
// largest the netstack opens.
func TestTUNQueueLimitAgrees(t *testing.T) {
	if conf.MaxTUNQueues != netstack.MaxTUNQueues {
		t.Fatalf("conf.MaxTUNQueues = %d, netstack.MaxTUNQueues = %d", conf.MaxTUNQueues, netstack.MaxTUNQueues)
	}
}
