#!/bin/bash
# down.sh: stops the rig's processes and removes its namespace (nb-p4rig); inst.sh calls it after each instance
D=/tmp/p4/rig
for f in app relay iperf; do [ -f $D/$f.pid ] && kill $(cat $D/$f.pid) 2>/dev/null; rm -f $D/$f.pid; done
sleep 0.5
ip netns del nb-p4rig 2>/dev/null
echo down
