#!/bin/sh
# A custom-executor driver, for testing `berth conformance --driver`: jobs run
# with bash on the host (no isolation), each in STATE_DIR/job-ID, ID being the
# job id from JOB_RESPONSE_FILE.
#
#   wrong-exit-code.sh STATE_DIR config|prepare|run SCRIPT STAGE|cleanup
#
# Deliberately wrong in one known way: when a stage script fails, run exits 1
# instead of $BUILD_FAILURE_EXIT_CODE and never writes $BUILD_EXIT_CODE_FILE,
# so the job's exit code is lost. The suite's exit.codes, exit.codes-from-env
# and job.failure checks must fail; everything else that applies passes.
set -eu
state=$1 hook=$2
shift 2
id=$(grep -o '"id":[0-9]*' "${JOB_RESPONSE_FILE:-/dev/null}" | head -n 1 | cut -d: -f2)
if [ -z "$id" ]; then
    echo "wrong-exit-code: no job id in JOB_RESPONSE_FILE" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
fi
job="$state/job-$id"

case $hook in
config)
    printf '{"driver":{"name":"wrong-exit-code","version":"1.0"},"builds_dir":"%s","cache_dir":"%s"}\n' \
        "$job/builds" "$state/cache"
    ;;
prepare)
    mkdir -p "$job/builds" "$state/cache"
    echo "wrong-exit-code: job $id in $job"
    ;;
run)
    cd "$job"
    # The script in a session of its own, so that what it leaves in the
    # background is killed when it ends (and does not hold the job log);
    # SIGTERM to this hook's process group is passed on to it.
    setsid bash "$1" &
    pid=$!
    trap 'kill -s TERM -- "-$pid" 2>/dev/null' TERM
    status=0
    wait "$pid" || status=$?
    kill -s KILL -- "-$pid" 2>/dev/null || true
    [ "$status" -eq 0 ] || exit 1 # the defect: should be $BUILD_FAILURE_EXIT_CODE, after writing $BUILD_EXIT_CODE_FILE
    ;;
cleanup)
    rm -rf "$job"
    ;;
*)
    echo "wrong-exit-code: unknown hook $hook" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
    ;;
esac
