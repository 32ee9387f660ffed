#!/usr/bin/env bash
# End-to-end check of the resources/ tool chain: installs the host packages,
# fetches the kernel, builds the guest initramfs and an L1 image with
# l1-selftest.sh, boots it (expects exit 0: /dev/kvm present, nested paging
# on, added files present), boots it again asking the script to exit 3
# (expects run-l1.sh to exit 3), and with --l2-qemu also boots the L2 guest
# inside L1 with the host's QEMU on nested KVM (expects GUEST-INIT-OK).
#
# Usage: resources/selftest.sh [--l2-qemu] [--timeout SECS]
# GUEST_KERNEL_DIR / L1_KERNEL_DIR (see lib.sh) choose the kernels.
# Ends with a line "selftest: N passed, N failed"; exits 1 if any failed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

l2_qemu=0
timeout_s=600
while (($#)); do
    case "$1" in
        --l2-qemu) l2_qemu=1; shift ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs seconds"; timeout_s="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

R="$RESOURCES_DIR"
passed=0
failed=0
result() {
    if [[ "$1" == ok ]]; then
        passed=$((passed + 1)); log "PASS: $2"
    else
        failed=$((failed + 1)); log "FAIL: $2"
    fi
}
timed() {
    # timed LABEL CMD...: runs CMD, logs its wall time.
    local label="$1" t0=$SECONDS rc=0
    shift
    "$@" || rc=$?
    log "time: $label $((SECONDS - t0)) s"
    return "$rc"
}

timed install-host-deps "$R/install-host-deps.sh"
timed fetch-kernel fetch_kernels
timed build-initramfs "$R/build-initramfs.sh"

img="$GUEST_CACHE/l1-selftest.cpio.gz"
guest_img="$(guest_initramfs_path)"
timed build-l1 "$R/build-l1.sh" --out "$img" --script "$R/l1-selftest.sh" \
    --add "$guest_img:/guest/guest-initramfs.cpio.gz" \
    --add "$GUEST_KERNEL_DIR/vmlinux:/guest/vmlinux"
mkdir -p "$GUEST_CACHE/logs"

rc=0
timed run-l1 "$R/run-l1.sh" --initrd "$img" --timeout "$timeout_s" \
    --log "$GUEST_CACHE/logs/selftest-ok.log" || rc=$?
if [[ $rc -eq 0 ]]; then
    result ok "L1 self-test script passed (exit 0)"
else
    result fail "L1 self-test script: run-l1.sh exited $rc (log: $GUEST_CACHE/logs/selftest-ok.log)"
fi

# Kernel command-line words of the form NAME=value reach init's environment.
rc=0
timed run-l1-exit3 "$R/run-l1.sh" --initrd "$img" --timeout "$timeout_s" \
    --append L1_SELFTEST_EXIT=3 --log "$GUEST_CACHE/logs/selftest-exit3.log" >/dev/null || rc=$?
if [[ $rc -eq 3 ]]; then
    result ok "exit code 3 propagated through run-l1.sh"
else
    result fail "expected run-l1.sh to exit 3, got $rc (log: $GUEST_CACHE/logs/selftest-exit3.log)"
fi

if ((l2_qemu)); then
    script="$GUEST_CACHE/l1-l2-qemu.sh"
    cat >"$script" <<'EOF'
#!/bin/sh
# Boots the L2 guest with QEMU on nested KVM inside L1 (reference run).
t0=$(cut -d' ' -f1 /proc/uptime)
taskset -c "$L1_VMM_CPU" timeout 300 qemu-system-x86_64 -accel kvm -M microvm,rtc=on \
    -cpu host -smp 1 -m 256 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel /guest/vmlinux -initrd /guest/guest-initramfs.cpio.gz \
    -append "console=ttyS0 panic=-1 quiet noxsave" </dev/null
rc=$?
echo "L2 qemu rc=$rc, L1 uptime $t0 -> $(cut -d' ' -f1 /proc/uptime) s"
exit $rc
EOF
    qimg="$GUEST_CACHE/l1-l2-qemu.cpio.gz"
    timed build-l1-qemu "$R/build-l1.sh" --out "$qimg" --script "$script" \
        --add "$guest_img:/guest/guest-initramfs.cpio.gz" \
        --add "$GUEST_KERNEL_DIR/vmlinux:/guest/vmlinux" \
        --add "$(command -v qemu-system-x86_64):/usr/bin/" \
        --add /usr/share/qemu:/usr/share/qemu \
        --add /usr/share/seabios:/usr/share/seabios
    qlog="$GUEST_CACHE/logs/selftest-l2-qemu.log"
    rc=0
    timed run-l1-l2-qemu "$R/run-l1.sh" --initrd "$qimg" --timeout "$timeout_s" --log "$qlog" || rc=$?
    if [[ $rc -eq 0 ]] && grep -a -q GUEST-INIT-OK "$qlog"; then
        result ok "L2 guest booted under QEMU/KVM inside L1 (GUEST-INIT-OK)"
    else
        result fail "L2 guest under QEMU/KVM in L1: exit $rc (log: $qlog)"
    fi
fi

echo "selftest: $passed passed, $failed failed"
((failed == 0))
