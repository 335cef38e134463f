//go:build !linux

package netstack

import (
	"fmt"

	"golang.zx2c4.com/wireguard/tun"
)

// CreateTUN creates the TUN device name with the given MTU through
// wireguard-go's tun package; queues is ignored (only Linux has multi-queue
// TUNs and natbox's own vnet data path). Needs administrator rights.
func CreateTUN(name string, mtu, queues int) (tun.Device, error) {
	dev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("netstack: create tun %q: %w", name, err)
	}
	return dev, nil
}

// DefaultTUNQueues is the number of TUN queues when the config leaves it at
// 0.
func DefaultTUNQueues() int { return 1 }

// MaxTUNQueues bounds the queues a config may ask for.
const MaxTUNQueues = 64
