#!/bin/bash
# inst.sh N BIN: N instances; per instance tcp1 with a perf profile of the relay and instance facts
D=/tmp/p4/rig
N=$1 B=$2
for i in $(seq $N); do
  $D/up.sh $B >/dev/null
  R=$(cat $D/relay.pid) A=$(cat $D/app.pid)
  t0=$(awk '{print $14+$15}' /proc/$R/stat); g0=$(grep -c "^gc " $D/relay.log); ga0=$(grep -c "^gc " $D/natbox.log)
  perf record -q -e cpu-clock -F 999 -p $R -o $D/inst$i.perf -- sleep 3.5 >/dev/null 2>&1 &
  ip netns exec nb-p4rig timeout 20 iperf3 -c 127.0.0.1 -p 18080 -t 4 -J > $D/m.json
  wait
  t1=$(awk '{print $14+$15}' /proc/$R/stat); g1=$(grep -c "^gc " $D/relay.log); ga1=$(grep -c "^gc " $D/natbox.log); tail -1 $D/relay.log | cut -c1-120
  g=$(python3 -c "import json;j=json.load(open('$D/m.json'))['end']['sum_received'];print('%.2f %.2f' % (j['bits_per_second']/1e9, ($t1-$t0)/100/(j['bytes']/2**30)))")
  thp=$(grep AnonHuge /proc/$R/smaps_rollup | awk '{print $2}')
  thr=$(ls /proc/$R/task | wc -l)
  cpus=$(for t in /proc/$R/task/*; do awk '{print $39}' $t/stat; done | sort | uniq -c | tr '\n' ' ')
  echo "inst$i gcs relay $((g1-g0)) app $((ga1-ga0)) Gbit/s,s/GiB $g thp_kB $thp threads $thr lastcpu: $cpus"
  $D/down.sh >/dev/null
done
