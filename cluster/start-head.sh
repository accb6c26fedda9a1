#!/usr/bin/env bash
# Start a single-node Ray cluster (the head) on this machine, dashboard on 127.0.0.1 only,
# with token authentication (RAY_AUTH_MODE=token) unless told otherwise.
#
#   cluster/start-head.sh              # token-protected head
#   cluster/start-head.sh --no-auth    # no authentication: anyone who reaches a port runs code
#
# Binding the dashboard to 127.0.0.1 does not close the head: the GCS (6379), Ray Client
# (10001) and the dashboard agent's job API listen on the node's address. So the token is
# on by default. It is $RAY_AUTH_TOKEN when set, else the file $RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token, which is created here (mode 600) when missing. Every node and every
# submitter needs the same token and RAY_AUTH_MODE=token in its environment: see README.
# Ports: RAY_PORT (default 6379), DASHBOARD_PORT (8265); NUM_CPUS limits the CPUs offered.
# The head keeps its files (and its processes name it) in RAY_TEMP_DIR, default
# /tmp/ray-insect-$RAY_PORT: cluster/stop.sh stops exactly the processes of this head.
# Further arguments go to `ray start`. (--token, the former opt-in, is accepted.)
set -euo pipefail
RAY=${RAY:-ray}
if [ "${1:-}" = "--no-auth" ]; then
  shift
  echo "warning: starting a Ray head WITHOUT authentication: anyone who can reach its" \
    "ports can run code as $(id -un) on this machine" >&2
  export RAY_AUTH_MODE=disabled
else
  if [ "${1:-}" = "--token" ]; then shift; fi
  export RAY_AUTH_MODE=token
  if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$token_file" ]; then
      echo "start-head.sh: RAY_AUTH_TOKEN_PATH=$token_file is missing or empty" >&2
      exit 2
    fi
    if [ ! -s "$token_file" ]; then
      # umask 077: the token file is readable by its owner only, from its creation on.
      (umask 077 && "$RAY" get-auth-token --generate >/dev/null)
    fi
    chmod 600 "$token_file"  # also an older, looser one
  fi
fi
args=(--head --port "${RAY_PORT:-6379}" --dashboard-host 127.0.0.1
      --dashboard-port "${DASHBOARD_PORT:-8265}" --disable-usage-stats
      --temp-dir "${RAY_TEMP_DIR:-/tmp/ray-insect-${RAY_PORT:-6379}}")
if [ -n "${NUM_CPUS:-}" ]; then args+=(--num-cpus "$NUM_CPUS"); fi
exec "$RAY" start "${args[@]}" "$@"
