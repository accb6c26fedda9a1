#!/usr/bin/env bash
# Stop the head that cluster/start-head.sh started on this machine (same RAY_PORT, or
# RAY_TEMP_DIR), and only it: the processes naming its temporary directory get SIGTERM
# (raylet, dashboard, workers, `ray start --block`; the GCS once they are gone or two thirds
# into GRACE), and what is left after GRACE seconds (default 10) SIGKILL.
# Other Ray clusters of this user on the machine keep running (`ray stop` stops them all).
set -euo pipefail
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-insect-${RAY_PORT:-6379}}
grace=${GRACE:-10}
case $grace in
  '' | *[!0-9]*) echo "stop.sh: GRACE must be a whole number of seconds, not '$grace'" >&2; exit 2 ;;
esac

head_pids() {
  local cmdline pid
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}; pid=${pid%/cmdline}
    [ "$pid" = "$$" ] && continue
    # Arguments are NUL-separated: match the directory as a whole path component.
    # grep without -q: its early exit would fail the pipeline (pipefail) on a long cmdline
    if tr '\0' '\n' 2>/dev/null <"$cmdline" | grep -E "(^|=)${temp_dir}(/|$)" >/dev/null; then
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
# The GCS last, as `ray stop` leaves it: stopped with the rest, a token-authenticated head's
# `ray start --block` drained the node against a GCS that was gone, until the SIGKILL.
signalled=" "
for second in $(seq 0 "$grace"); do
  pids=$(head_pids)
  [ -z "$pids" ] && exit 0
  [ "$second" -eq "$grace" ] && break
  others=() gcs=()
  for pid in $pids; do
    args=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" || true)
    if [[ ${args%%$'\n'*} == */gcs_server ]]; then gcs+=("$pid"); else others+=("$pid"); fi
  done
  # The GCS once the rest are gone, or two thirds into GRACE: it always gets its SIGTERM.
  if [ ${#others[@]} -eq 0 ] || [ $((3 * second)) -ge $((2 * grace)) ]; then
    others+=("${gcs[@]}")
  fi
  for pid in "${others[@]}"; do  # each once, those that appeared meanwhile too
    [[ $signalled == *" $pid "* ]] && continue
    kill -TERM "$pid" 2>/dev/null || true
    signalled+="$pid "
  done
  sleep 1
done
kill -KILL $pids 2>/dev/null || true
