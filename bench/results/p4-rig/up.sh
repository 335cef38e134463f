#!/bin/bash
# up.sh BIN: netns nb-p4rig with iperf3 server, natbox relay + appliance (prints pids)
BIN=${1:-/tmp/p4/natbox-base}
NS=nb-p4rig
D=/tmp/p4/rig
ip netns del $NS 2>/dev/null
ip netns add $NS && ip netns exec $NS ip link set lo up
ip netns exec $NS iperf3 -s -B 127.0.0.1 -p 5201 >$D/iperf-s.log 2>&1 & echo $! > $D/iperf.pid
ip netns exec $NS env $RELAY_ENV $BIN relay -c $D/relay${CONF:-}.toml >$D/relay.log 2>&1 & echo $! > $D/relay.pid
sleep 0.5
ip netns exec $NS env $APP_ENV $BIN run -c $D/natbox${CONF:-}.toml >$D/natbox.log 2>&1 & echo $! > $D/app.pid
for i in $(seq 50); do
  ip netns exec $NS timeout 2 iperf3 -c 127.0.0.1 -p 18080 -t 0.3 >/dev/null 2>&1 && break; sleep 0.2
done
# wait for the MTU probe
for i in $(seq 50); do
  $BIN status --json --socket $D/natbox.sock 2>/dev/null | grep -q '"route_mtu": 32000' && break; sleep 0.2
done
echo up
