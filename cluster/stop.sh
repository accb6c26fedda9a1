#!/usr/bin/env bash
# Stop every Ray process this user started on this machine (head and workers).
set -euo pipefail
exec "${RAY:-ray}" stop --force
