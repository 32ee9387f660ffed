#!/usr/bin/env bash
# Boots an L1 initramfs (see build-l1.sh) in QEMU TCG with emulated SVM and
# nested paging, streams its serial console to stdout and a log file, and
# exits with the L1 script's exit code (parsed from `L1-EXIT-CODE=<n>`).
#
# Usage: resources/run-l1.sh --initrd L1.cpio.gz [--timeout SECS] [--log FILE]
#            [--mem MiB] [--smp N] [--kernel FILE] [--append ARGS]
#            [-- EXTRA_QEMU_ARGS...]
#
#   --initrd FILE   the L1 initramfs (required)
#   --timeout SECS  wall-clock limit for the whole boot+script (default 900)
#   --ready-timeout SECS
#                   limit for the L1's own boot, up to L1-READY (default
#                   180; it takes 6-15 s): an L1 kernel that hangs in its
#                   boot under TCG is stopped then, not at --timeout
#   --log FILE      console log (default: $GUEST_CACHE/logs/l1-<time>-<pid>.log)
#   --mem MiB       L1 memory (default 3072)
#   --smp N         L1 vCPUs (default 2)
#   --kernel FILE   L1 kernel (default: $L1_KERNEL_DIR/vmlinux, that is
#                   $GUEST_CACHE/kernel/vmlinux unless L1_KERNEL_DIR is set;
#                   it must match the kvm modules build-l1.sh packed)
#   --append ARGS   extra L1 kernel command-line arguments
#
# Exit status: the script's code from L1-EXIT-CODE=<n>; 124 when the timeout
# hit before that marker; 125 when QEMU ended without the marker (L1 crashed,
# QEMU failed to start, ...). When the marker was printed but QEMU still had
# to be killed by the timeout, the script's code is returned with a warning.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

initrd=""
timeout_s=900
ready_timeout_s=180
log_file=""
mem=3072
smp=2
kernel="$L1_KERNEL_DIR/vmlinux"
append_extra=""
extra_qemu=()
while (($#)); do
    case "$1" in
        --initrd) [[ $# -ge 2 ]] || die "--initrd needs a file"; initrd="$(abspath "$2")"; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs seconds"; timeout_s="$2"; shift 2 ;;
        --ready-timeout) [[ $# -ge 2 ]] || die "--ready-timeout needs seconds"; ready_timeout_s="$2"; shift 2 ;;
        --log) [[ $# -ge 2 ]] || die "--log needs a file"; log_file="$(abspath "$2")"; shift 2 ;;
        --mem) [[ $# -ge 2 ]] || die "--mem needs MiB"; mem="$2"; shift 2 ;;
        --smp) [[ $# -ge 2 ]] || die "--smp needs a count"; smp="$2"; shift 2 ;;
        --kernel) [[ $# -ge 2 ]] || die "--kernel needs a file"; kernel="$(abspath "$2")"; shift 2 ;;
        --append) [[ $# -ge 2 ]] || die "--append needs arguments"; append_extra="$2"; shift 2 ;;
        --) shift; extra_qemu=("$@"); break ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -n "$initrd" ]] || die "--initrd FILE is required (see --help)"
[[ -f "$initrd" ]] || die "initrd not found: $initrd (build it with resources/build-l1.sh)"
[[ -f "$kernel" ]] || die "L1 kernel not found: $kernel (run $(fetch_hint "$(dirname "$kernel")"))"
[[ "$timeout_s" =~ ^[0-9]+$ && "$timeout_s" -gt 0 ]] || die "--timeout must be a positive integer"
[[ "$ready_timeout_s" =~ ^[0-9]+$ && "$ready_timeout_s" -gt 0 ]] || die "--ready-timeout must be a positive integer"
[[ "$mem" =~ ^[0-9]+$ ]] || die "--mem must be an integer (MiB)"
[[ "$smp" =~ ^[0-9]+$ ]] || die "--smp must be an integer"
need_cmd qemu-system-x86_64 "Debian package qemu-system-x86"
need_cmd timeout

if [[ -z "$log_file" ]]; then
    log_file="$GUEST_CACHE/logs/l1-$(date +%Y%m%d-%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$log_file")"
: >"$log_file"

cmdline="console=ttyS0 panic=-1 quiet loglevel=5${append_extra:+ $append_extra}"
# shellcheck disable=SC2054 # the commas are QEMU option syntax
qemu=(
    qemu-system-x86_64 -accel tcg -M q35
    -cpu qemu64,+svm,+npt,+xsave,+xsaveopt
    -smp "$smp" -m "$mem"
    -nographic -no-reboot
    -kernel "$kernel" -initrd "$initrd"
    -append "$cmdline"
    -pidfile "$log_file.pid"
    "${extra_qemu[@]}"
)
log "booting L1: initrd $(basename "$initrd") ($(du -h "$initrd" | cut -f1)), ${mem} MiB, $smp vCPUs, timeout ${timeout_s}s"
log "log: $log_file"

start=$SECONDS
rm -f "$log_file.pid"
# The L1's own boot has its own, shorter limit.
(
    # (its own descriptors: a sleep outliving this script must not hold
    # the caller's pipes open)
    sleep "$ready_timeout_s" >/dev/null 2>&1
    if ! grep -q -a L1-READY "$log_file" && [[ -s "$log_file.pid" ]]; then
        log "ERROR: the L1 did not get ready in ${ready_timeout_s} s; stopping it"
        kill "$(cat "$log_file.pid")" 2>/dev/null
    fi
) &
ready_watch=$!
set +e
# stdin from /dev/null: QEMU must not touch (or block on) a terminal, and
# `timeout` runs it in a background process group.
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 |
    tee -a "$log_file" |
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case "$line" in
            *L1-READY*) log "L1-READY after $((SECONDS - start)) s" ;;
        esac
    done
status=("${PIPESTATUS[@]}")
kill "$ready_watch" 2>/dev/null
wait "$ready_watch" 2>/dev/null
rm -f "$log_file.pid"
set -e
qemu_rc="${status[0]}"
elapsed=$((SECONDS - start))

marker="$(tr -d '\r' <"$log_file" | grep -a -o 'L1-EXIT-CODE=[0-9]\+' | tail -n1 || true)"
if [[ -n "$marker" ]]; then
    rc="${marker#L1-EXIT-CODE=}"
    if [[ "$qemu_rc" -eq 124 || "$qemu_rc" -eq 137 ]]; then
        log "warning: the script finished but QEMU did not power off; killed by the timeout"
    fi
    if [[ "$rc" -eq 0 ]]; then
        log "L1 script exited 0 (total ${elapsed} s)"
    else
        log "L1 script exited $rc (total ${elapsed} s); log: $log_file"
    fi
    exit "$rc"
fi
if [[ "$qemu_rc" -eq 124 || "$qemu_rc" -eq 137 ]]; then
    log "ERROR: timeout after ${timeout_s} s without L1-EXIT-CODE; log: $log_file"
    exit 124
fi
log "ERROR: QEMU exited with status $qemu_rc after ${elapsed} s without printing L1-EXIT-CODE; log: $log_file"
exit 125
