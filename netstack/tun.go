package netstack

import (
	"fmt"

	"golang.zx2c4.com/wireguard/tun"
)

// CreateTUN creates (or attaches to) the kernel TUN device name with the given
// MTU. It wraps wireguard-go's tun.CreateTUN, which on Linux opens it with
// IFF_VNET_HDR and enables TSO/USO offloads where the kernel has them: reads
// split the kernel's TSO frames into MTU packets, writes coalesce ours (GRO),
// and batches hold up to 128 packets. Needs CAP_NET_ADMIN.
func CreateTUN(name string, mtu int) (tun.Device, error) {
	dev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("netstack: create tun %q: %w; natbox needs CAP_NET_ADMIN and /dev/net/tun", name, err)
	}
	return dev, nil
}
