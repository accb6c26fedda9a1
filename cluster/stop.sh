#!/usr/bin/env bash
# Stop the head that cluster/start-head.sh started on this machine (same RAY_PORT, or
# RAY_TEMP_DIR), and only it: every process naming its temporary directory (GCS, raylet,
# dashboard, workers) gets SIGTERM, then SIGKILL after GRACE seconds (default 10). Other
# Ray clusters of this user on the machine keep running (`ray stop` would stop them all).
set -euo pipefail
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-insect-${RAY_PORT:-6379}}
grace=${GRACE:-10}

head_pids() {
  local cmdline pid
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}; pid=${pid%/cmdline}
    [ "$pid" = "$$" ] && continue
    # Arguments are NUL-separated: match the directory as a whole path component.
    if tr '\0' '\n' <"$cmdline" 2>/dev/null | grep -qE "(^|=)${temp_dir}(/|$)"; then
      echo "$pid"
    fi
  done
}

pids=$(head_pids)
if [ -z "$pids" ]; then
  echo "stop.sh: no Ray head running with $temp_dir (RAY_PORT=${RAY_PORT:-6379})" >&2
  exit 0
fi
echo "stopping the Ray head of $temp_dir: $(echo $pids | wc -w) processes"
kill -TERM $pids 2>/dev/null || true
for _ in $(seq "$grace"); do
  pids=$(head_pids)
  [ -z "$pids" ] && exit 0
  sleep 1
done
kill -KILL $pids 2>/dev/null || true
