#!/bin/sh
# A custom-executor driver, for testing the conformance suite's containment
# section: what berth's chroot backend did before #11. Each job gets an
# overlay of an image and every stage runs chrooted into it as the host's
# root, with every capability, in a PID namespace of its own:
#
#   plain-chroot.sh STATE_DIR IMAGE_ROOT config|prepare|run SCRIPT STAGE|cleanup
#
# A job sees none of the host's files at first (containment.own-root passes),
# but the classic chroot escape reaches the host's / and open_by_handle_at is
# open: containment.chroot-escape and containment.open-by-handle must fail.
set -eu
state=$1 image=$2 hook=$3
shift 3
id=$(grep -o '"id":[0-9]*' "${JOB_RESPONSE_FILE:-/dev/null}" | head -n 1 | cut -d: -f2)
if [ -z "$id" ]; then
    echo "plain-chroot: no job id in JOB_RESPONSE_FILE" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
fi
job="$state/job-$id"

case $hook in
config)
    printf '{"driver":{"name":"plain-chroot","version":"1.0"},"builds_dir":"/builds","cache_dir":"/cache"}\n'
    ;;
prepare)
    mkdir -p "$job/upper" "$job/work" "$job/root"
    mount -t overlay overlay -o "lowerdir=$image,upperdir=$job/upper,workdir=$job/work" "$job/root"
    mkdir -p "$job/root/builds" "$job/root/cache" "$job/root/proc"
    ;;
run)
    cp "$1" "$job/root/tmp/stage.sh"
    status=0
    unshare --pid --fork --kill-child --mount-proc --root="$job/root" --wd=/ /bin/bash /tmp/stage.sh || status=$?
    if [ "$status" -ne 0 ]; then
        echo "$status" > "$BUILD_EXIT_CODE_FILE"
        exit "$BUILD_FAILURE_EXIT_CODE"
    fi
    ;;
cleanup)
    umount -R "$job/root" 2>/dev/null || true
    rm -rf "$job"
    ;;
*)
    echo "plain-chroot: unknown hook $hook" >&2
    exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
    ;;
esac
