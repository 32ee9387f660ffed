//! A stock Debian kernel booted under this VMM, for real, inside the nested
//! L1 (the only place a Linux guest can run on these machines).

use integration_tests::l1::{
    guest_images, guest_images_of, kernel_dir_of, l1_unavailable, run_l1, run_l1_on,
};

#[test]
fn debian_kernel_boots_to_init_with_two_vcpus_on_uffd_memfd_memory() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (_, initramfs) = guest_images().expect("guest images");
    // The ELF vmlinux on 2 vCPUs, then the same kernel as a bzImage.
    let script = r#"#!/bin/sh
taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux \
    --initrd /guest/guest-initramfs.cpio.gz --memory 256M --vcpus 2 \
    --mem-backend memfd --fault-handler uffd --stats
echo "VMM-EXIT-CODE=$?"
taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/bzImage \
    --initrd /guest/guest-initramfs.cpio.gz --memory 128M --vcpus 1
echo "BZIMAGE-EXIT-CODE=$?"
"#;
    let bzimage = integration_tests::l1::repo_root().join("build/kernel/bzImage");
    let out = run_l1(
        "boot",
        &[(initramfs, "/guest/"), (bzimage, "/guest/bzImage")],
        script,
        300,
    )
    .expect("running the L1");
    let fail = |what: &str| -> ! { out.fail(what) };
    out.assert_script_ok();
    let init = out
        .line("GUEST-INIT-OK")
        .unwrap_or_else(|| fail("the guest never reached its init"));
    let nproc = out.value("GUEST-INIT-OK", "nproc").unwrap();
    if nproc != "2" {
        fail(&format!("the guest saw {nproc} CPUs, not 2: {init}"));
    }
    // The VMM offers the TSC-deadline timer KVM emulates: the guest ticks
    // on it instead of an APIC timer it calibrates by busy-waiting.
    if out.value("GUEST-INIT-OK", "clockevent").as_deref() != Some("lapic-deadline") {
        fail(&format!(
            "the guest does not tick on the TSC deadline: {init}"
        ));
    }
    let mem_kb: u64 = out
        .value("GUEST-INIT-OK", "MemTotal")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // 256 MiB minus what the kernel keeps for itself.
    if !(200 * 1024..=256 * 1024).contains(&mem_kb) {
        fail(&format!("the guest saw MemTotal {mem_kb} kB for 256 MiB"));
    }
    if out.line("faults served by userfaultfd").is_none() {
        fail("guest memory was not fault-managed by userfaultfd");
    }
    if out
        .line("vmm: guest stopped: the guest powered off")
        .is_none()
    {
        fail("the VMM did not stop on the guest's power-off");
    }
    if out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE").as_deref() != Some("0") {
        fail("the VMM did not exit cleanly");
    }
    let inits: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("GUEST-INIT-OK"))
        .collect();
    if inits.len() != 2 || !inits[1].contains("nproc=1") {
        fail("the bzImage did not boot to init");
    }
    if out
        .value("BZIMAGE-EXIT-CODE", "BZIMAGE-EXIT-CODE")
        .as_deref()
        != Some("0")
    {
        fail("the VMM did not exit cleanly after the bzImage guest");
    }
}

/// Debian 13's kernel (6.12, zstd bzImage, merged-/usr compressed modules)
/// boots under this VMM in an L1 that runs 6.12 too, where KVM has
/// `KVM_PRE_FAULT_MEMORY`: the boot images are mapped before the guest
/// runs, every range accepted; and the same kernel, as its bzImage, boots
/// with it off.
#[test]
fn debian_13_kernel_boots_to_init() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (vmlinux, initramfs) = guest_images_of("trixie").expect("the Debian 13 kernel");
    let l1_kernel = kernel_dir_of("trixie");
    let script = r#"#!/bin/sh
boot() {
    kernel=$1
    shift
    RUST_LOG=vmm=info taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel "$kernel" \
        --initrd /guest/initramfs-6.12.cpio.gz --memory 256M --vcpus 2 \
        --mem-backend memfd --fault-handler uffd "$@" 2>&1
}
echo "L1-KERNEL $(uname -r)"
boot /guest/vmlinux-6.12
echo "VMM-EXIT-CODE=$?"
boot /guest/bzImage-6.12 --no-pre-fault
echo "PLAIN-EXIT-CODE=$?"
"#;
    let out = run_l1_on(
        Some(&l1_kernel),
        "boot-6.12",
        &[
            (l1_kernel.join("bzImage"), "/guest/bzImage-6.12"),
            (vmlinux, "/guest/vmlinux-6.12"),
            (initramfs, "/guest/initramfs-6.12.cpio.gz"),
        ],
        script,
        400,
    )
    .expect("running the L1");
    out.assert_script_ok();
    if !out.line("L1-KERNEL").is_some_and(|l| l.contains("6.12")) {
        out.fail("the L1 did not run the 6.12 kernel");
    }
    let inits: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("GUEST-INIT-OK"))
        .collect();
    if inits.len() != 2 {
        out.fail("the 6.12 guest did not reach its init twice");
    }
    if out.line("Linux version 6.12").is_none() {
        out.fail("the guest that booted was not the 6.12 kernel");
    }
    if out.value("GUEST-INIT-OK", "nproc").as_deref() != Some("2") {
        out.fail("the 6.12 guest did not see 2 CPUs");
    }
    if out.value("GUEST-INIT-OK", "clockevent").as_deref() != Some("lapic-deadline") {
        out.fail("the 6.12 guest does not tick on the TSC deadline");
    }
    for code in ["VMM-EXIT-CODE", "PLAIN-EXIT-CODE"] {
        if out.value(code, code).as_deref() != Some("0") {
            out.fail("the VMM did not exit cleanly after the 6.12 guest");
        }
    }
    // One pre-fault line, for the first boot only: kernel, initramfs and
    // low memory mapped (well over 8 MiB), no range refused.
    let lines: Vec<&str> = out
        .log
        .lines()
        .filter(|l| l.contains("pre-faulted"))
        .collect();
    let [line] = lines[..] else {
        out.fail("expected one pre-fault line (the second boot has it off)");
    };
    let kib: u64 = line
        .split("pre-faulted ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if kib < 8 << 10 || !line.contains("(0 ranges refused)") {
        out.fail(&format!("the boot images were not pre-faulted: {line}"));
    }
}
