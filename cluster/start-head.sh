#!/usr/bin/env bash
# Start a single-node Ray cluster (the head) on this machine, dashboard on 127.0.0.1 only.
#
#   cluster/start-head.sh            # plain head
#   cluster/start-head.sh --token    # token-protected head (RAY_AUTH_MODE=token)
#
# With --token the token is $RAY_AUTH_TOKEN when set, else ~/.ray/auth_token (generated
# once by `ray get-auth-token --generate`). Submitters need the same token: see README.
# Ports: RAY_PORT (default 6379), DASHBOARD_PORT (8265); NUM_CPUS limits the CPUs offered.
# Further arguments go to `ray start`.
set -euo pipefail
RAY=${RAY:-ray}
if [ "${1:-}" = "--token" ]; then
  shift
  export RAY_AUTH_MODE=token
  if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    "$RAY" get-auth-token --generate >/dev/null
  fi
else
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
fi
args=(--head --port "${RAY_PORT:-6379}" --dashboard-host 127.0.0.1
      --dashboard-port "${DASHBOARD_PORT:-8265}" --disable-usage-stats)
if [ -n "${NUM_CPUS:-}" ]; then args+=(--num-cpus "$NUM_CPUS"); fi
exec "$RAY" start "${args[@]}" "$@"
