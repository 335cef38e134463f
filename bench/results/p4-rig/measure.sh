#!/bin/bash
# measure.sh ITER BIN...: per binary and test: Gbit/s, CPU s/GiB and context switches per MiB for each side
D=/tmp/p4/rig
ITER=$1; shift
snap() { # pid -> "ticks ctxsw"
  local p=$1 t c=0
  t=$(awk '{print $14+$15}' /proc/$p/stat)
  for s in /proc/$p/task/*/status; do c=$((c + $(awk '/ctxt_switches/{s+=$2} END{print s}' $s 2>/dev/null || echo 0))); done
  echo "$t $c"
}
for i in $(seq $ITER); do
  for B in "$@"; do
    CONF=; [[ $B == *:* ]] && CONF=${B#*:}; CONF=$CONF RELAY_ENV=$RELAY_ENV APP_ENV=$APP_ENV $D/up.sh ${B%%:*} >/dev/null
    R=$(cat $D/relay.pid) A=$(cat $D/app.pid)
    for T in "1" "4" "R"; do
      flag="-P 1"; [ $T = 4 ] && flag="-P 4"; [ $T = R ] && flag="-R"
      r0=($(snap $R)); a0=($(snap $A))
      ip netns exec nb-p4rig timeout 20 iperf3 -c 127.0.0.1 -p 18080 -t ${DUR:-4} $flag -J > $D/m.json
      r1=($(snap $R)); a1=($(snap $A))
      python3 - "$B" "$T" "${r0[*]}" "${r1[*]}" "${a0[*]}" "${a1[*]}" <<'PY'
import json,sys
b,t=sys.argv[1],sys.argv[2]
r0,r1,a0,a1=[list(map(int,x.split())) for x in sys.argv[3:7]]
j=json.load(open('/tmp/p4/rig/m.json'))['end']['sum_received']
g=j['bytes']/2**30; mib=j['bytes']/2**20
print(f"{b.split('/')[-1]} tcp{t} {j['bits_per_second']/1e9:.2f} r_s/GiB {(r1[0]-r0[0])/100/g:.2f} a_s/GiB {(a1[0]-a0[0])/100/g:.2f} r_csw/MiB {(r1[1]-r0[1])/mib:.1f} a_csw/MiB {(a1[1]-a0[1])/mib:.1f}", flush=True)
PY
    done
    $D/down.sh >/dev/null
  done
done
