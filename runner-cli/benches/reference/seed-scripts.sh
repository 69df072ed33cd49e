#!/bin/bash
# A yardstick kept for berth's backends bench (benches/backends.rs): the seed design's driver,
# the scripts this project started from, run beside berth on the same host and image. Copied
# unchanged below this comment from the project's shared reference drivers; not part of berth.
# The seed's four scripts verbatim in spirit, for a host whose PID 1 is systemd: systemd-run a
# transient unit running systemd-nspawn --boot on an overlay, systemd-run --machine --pipe --wait
# for each stage, machinectl stop + rm for cleanup. (The seed's prepare.sh misses a line
# continuation after --overlay; fixed here.) usage: driver.sh ROOTFS STATE (config|prepare|run S N|cleanup)
ROOTFS=$1; STATE=$2; shift 2
MACHINE="run-$CUSTOM_ENV_CI_JOB_ID"
OVERLAY="$STATE/$MACHINE"
case "$1" in
config) exit 0 ;;
prepare)
  set -eo pipefail
  trap "exit $SYSTEM_FAILURE_EXIT_CODE" ERR
  logger "gitlab CI: preparing $MACHINE"
  mkdir -p "$OVERLAY"
  systemd-run -p 'KillMode=mixed' -p 'Type=notify' -p 'RestartForceExitStatus=133' -p 'SuccessExitStatus=133' \
    -p 'Slice=machine.slice' -p 'Delegate=yes' -p 'TasksMax=16384' -p 'WatchdogSec=3min' \
    systemd-nspawn --quiet -D "$ROOTFS" --overlay="$ROOTFS:$OVERLAY:/" --machine="$MACHINE" --boot --notify-ready=yes ;;
run)
  set -eo pipefail
  trap "exit $SYSTEM_FAILURE_EXIT_CODE" ERR
  systemd-run --quiet --pipe --wait --machine="$MACHINE" /bin/bash < "$2" ;;
cleanup)
  machinectl stop "$MACHINE"
  rm -rf "$OVERLAY" ;;
esac
