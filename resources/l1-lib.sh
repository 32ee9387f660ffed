# shellcheck shell=sh
# Shared helpers of the scripts that boot a guest under the VMM and drive it
# through the API wherever /dev/kvm can run it: inside the L1 (as
# /guest/*.sh, with this file as /guest/l1-lib.sh) or on a host with
# vmx/svm. POSIX sh, so busybox runs it. Source it, do not run it:
#
#   . "$(dirname "$0")/l1-lib.sh"
#
# Environment: VMM, VMMCTL, KERNEL (paths), VMM_CPU (CPU to pin the VMM to,
# optional; L1_VMM_CPU from the L1 otherwise).
VMM=${VMM:-/bin/vmm}
VMMCTL=${VMMCTL:-/bin/vmmctl}
KERNEL=${KERNEL:-/guest/vmlinux}
VMM_CPU=${VMM_CPU:-${L1_VMM_CPU:-}}
pin=""
[ -n "$VMM_CPU" ] && pin="taskset -c $VMM_CPU"

# l1_workdir NAME: a fresh directory $dir for the API socket ($sock) and
# the guest's console ($serial).
l1_workdir() {
    dir=$(mktemp -d "/tmp/$1.XXXXXX")
    sock=$dir/api.sock
    serial=$dir/serial.log
}

# field PATH KEY: the number KEY in the JSON that GET PATH answers.
field() { "$VMMCTL" --sock "$sock" GET "$1" | grep -o "\"$2\": [0-9]*" | head -1 | grep -o '[0-9]*$'; }

# start_vmm ARG...: boots $KERNEL with $INITRD and ${MEMORY_MIB}M under the
# VMM in the background ($vmm is its pid), with the API on $sock, the
# console in $serial and ARG... added; the console is printed when the
# script ends.
start_vmm() {
    $pin "$VMM" --kernel "$KERNEL" --initrd "$INITRD" --memory "${MEMORY_MIB}M" \
        --api-sock "$sock" --serial "file:$serial" --stats "$@" &
    vmm=$!
    trap 'echo "--- guest console ---"; cat "$serial"' EXIT
}

# wait_guest MARKER: until the guest printed MARKER (300 s at most).
wait_guest() {
    n=0
    until grep -q "$1" "$serial" 2>/dev/null; do
        sleep 1
        n=$((n + 1))
        kill -0 "$vmm" 2>/dev/null || { echo "the VMM exited early"; return 1; }
        grep -q GUEST-TIMEOUT "$serial" && { grep GUEST-TIMEOUT "$serial"; return 1; }
        [ $n -lt 300 ] || { echo "the guest never printed $1"; return 1; }
    done
}

# wait_field PATH KEY VALUE: until GET PATH shows KEY at VALUE (300 s at
# most); $n is the seconds it took.
wait_field() {
    n=0
    while [ "$(field "$1" "$2")" != "$3" ]; do
        kill -0 "$vmm" 2>/dev/null || { echo "the VMM exited while $1 $2 went to $3"; return 1; }
        sleep 1
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "$1 $2 is stuck at $(field "$1" "$2"), wanted $3"; return 1; }
    done
}

# finish_vmm: waits for the VMM to end (the guest powers off), prints its
# exit code as VMM-EXIT-CODE and exits with it.
finish_vmm() {
    wait "$vmm"
    code=$?
    echo "VMM-EXIT-CODE=$code"
    exit $code
}
