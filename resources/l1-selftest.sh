#!/bin/sh
# L1 script used by resources/selftest.sh (runs inside the L1 VM under busybox
# sh as /l1-script.sh). Checks that nested KVM is usable and that files added
# with build-l1.sh --add arrived. Exits with $L1_SELFTEST_EXIT (default 0)
# when everything passed, so the exit-code propagation can be tested too.
fail=0
check() {
    # check DESCRIPTION COMMAND...
    desc="$1"
    shift
    if "$@"; then
        echo "SELFTEST ok:   $desc"
    else
        echo "SELFTEST FAIL: $desc"
        fail=1
    fi
}

check "/dev/kvm is a character device" test -c /dev/kvm
check "kvm_amd is loaded" grep -q '^kvm_amd ' /proc/modules
echo "--- dmesg lines about SVM / nested paging:"
dmesg | grep -i -E 'svm|nested|npt' || true
echo "---"
check "dmesg says nested paging is enabled" sh -c "dmesg | grep -q -i 'Nested Paging enabled'"
check "guest initramfs was added" test -s /guest/guest-initramfs.cpio.gz
check "guest kernel was added" test -s /guest/vmlinux
check "guest initramfs is gzip" sh -c "head -c 2 /guest/guest-initramfs.cpio.gz | od -An -tx1 | grep -q '1f 8b'"
check "getrandom-backed /dev/urandom works" sh -c "head -c 16 /dev/urandom | od -An -tx1 >/dev/null"
check "pinned to CPU 0 (affinity mask 1)" sh -c "taskset -p \$\$ | grep -q 'mask: 1\$'"
echo "L1_VMM_CPU=${L1_VMM_CPU:-unset} cpus=$(grep -c '^processor' /proc/cpuinfo)"
ls -la /guest

if [ "$fail" -ne 0 ]; then
    echo "SELFTEST: some checks failed"
    exit 1
fi
echo "SELFTEST: all checks passed"
exit "${L1_SELFTEST_EXIT:-0}"
