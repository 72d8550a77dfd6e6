#!/usr/bin/env bash
# Measures the foundation's two figures on this machine, with the release build:
# the single-target round trip of `fleetrun run --machine M true` (median of 20, through the
# CLI, process start included), a named run command's synchronous PUT (plain, and replacing
# a running script), and the idle RSS of a real agent process.
# Usage: scripts/measure-foundation.sh   (builds target/release/fleetrun if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p fleetrun --quiet
bin=$PWD/target/release/fleetrun
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

"$bin" server --listen 127.0.0.1:0 --data-dir "$work/server" 2>"$work/server.log" &
for _ in $(seq 100); do [ -s "$work/server/server.env" ] && break; sleep 0.05; done
set -a; . "$work/server/server.env"; set +a
"$bin" agent --server "$FLEETRUN_URL" --enroll-token "$FLEETRUN_ENROLL_TOKEN" --name bench-1 \
  --state-dir "$work/agent" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do
  "$bin" machines list 2>/dev/null | grep -q 'bench-1.*online' && break; sleep 0.05
done

"$bin" run --machine bench-1 true   # warm up
times=()
for _ in $(seq 20); do
  start=$(date +%s%N)
  "$bin" run --machine bench-1 true
  end=$(date +%s%N)
  times+=($(( (end - start) / 1000 )))
done
sorted=($(printf '%s\n' "${times[@]}" | sort -n))
median=$(( (sorted[9] + sorted[10]) / 2 ))
printf 'round trip `fleetrun run --machine bench-1 true` (20 runs): median %d.%03d ms, min %d.%03d ms, max %d.%03d ms\n' \
  $((median / 1000)) $((median % 1000)) $((sorted[0] / 1000)) $((sorted[0] % 1000)) \
  $((sorted[19] / 1000)) $((sorted[19] % 1000))

# A named run command: a synchronous PUT of `true` answers once the script has ended; each
# replaces the last. curl's own time, from connect to the last byte.
put() {
  curl -s -o /dev/null -w '%{time_total}\n' -X PUT \
    -H "Authorization: Bearer $FLEETRUN_TOKEN" -H 'content-type: application/json' \
    "$FLEETRUN_URL/v1/machines/bench-1/run-commands/$1" -d "$2"
}
put bench '{"source":{"script":"true"}}' >/dev/null   # warm up
put_times=($(for _ in $(seq 20); do put bench '{"source":{"script":"true"}}'; done | sort -n))
printf 'named run command, synchronous PUT of `true` (20 puts): median %.1f ms, max %.1f ms\n' \
  "$(echo "(${put_times[9]} + ${put_times[10]}) * 500" | bc -l)" "$(echo "${put_times[19]} * 1000" | bc -l)"
put long '{"source":{"script":"sleep 300"},"asyncExecution":true}' >/dev/null
sleep 0.5
printf 'named run command, PUT replacing a running `sleep 300` (stopped first): %.1f ms\n' \
  "$(echo "$(put long '{"source":{"script":"true"}}') * 1000" | bc -l)"

ticks_before=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
sleep 10
ticks_after=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status")
hz=$(getconf CLK_TCK)
printf 'idle agent: RSS %d KiB (%.1f MiB), CPU over 10 s idle: %s%% of a core\n' "$rss_kib" \
  "$(echo "$rss_kib / 1024" | bc -l)" "$(echo "scale=3; ($ticks_after - $ticks_before) * 100 / $hz / 10" | bc -l)"
