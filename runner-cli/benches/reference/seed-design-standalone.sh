#!/bin/bash
# A yardstick kept for berth's backends bench (benches/backends.rs): the seed design's driver,
# the scripts this project started from, run beside berth on the same host and image. Copied
# unchanged below this comment from the project's shared reference drivers; not part of berth.
# The seed's config/prepare/run/cleanup scripts as one driver, adapted to a host whose PID 1 is
# not systemd: nspawn is started detached with --register=no --keep-unit and run.sh enters the
# container with nsenter instead of systemd-run --machine. Used as the performance baseline.
# usage: driver.sh ROOTFS STATE_DIR (config|prepare|run SCRIPT STAGE|cleanup)
ROOTFS=$1; STATE=$2; shift 2
MACHINE="run-$CUSTOM_ENV_CI_JOB_ID"
OVERLAY="$STATE/$MACHINE"
case "$1" in
config) exit 0 ;;
prepare)
  trap "exit $SYSTEM_FAILURE_EXIT_CODE" ERR
  set -eo pipefail
  mkdir -p "$OVERLAY"
  setsid systemd-nspawn --quiet --register=no --keep-unit -D "$ROOTFS" \
    --overlay="$ROOTFS:$OVERLAY:/" --machine="$MACHINE" --boot >"$OVERLAY.log" 2>&1 </dev/null &
  echo $! > "$OVERLAY.pid"
  for i in $(seq 1 500); do
    L=$(pgrep -P "$(cat "$OVERLAY.pid")" systemd | head -1 || true)
    if [ -n "$L" ] && nsenter -t "$L" -a systemctl is-system-running --wait >/dev/null 2>&1; then echo "$L" > "$OVERLAY.leader"; exit 0; fi
    sleep 0.02
  done
  exit "$SYSTEM_FAILURE_EXIT_CODE" ;;
run)
  nsenter -t "$(cat "$OVERLAY.leader")" -a /bin/bash < "$2" || exit "$BUILD_FAILURE_EXIT_CODE" ;;
cleanup)
  pid=$(cat "$OVERLAY.pid" 2>/dev/null) && kill -TERM "$pid" 2>/dev/null
  while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
  rm -rf "$OVERLAY" "$OVERLAY".* ;;
esac
