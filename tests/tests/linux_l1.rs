//! A stock Debian kernel booted under this VMM, for real, inside the nested
//! L1 (the only place a Linux guest can run on these machines).

use integration_tests::l1::{guest_images, guest_images_of, l1_unavailable, run_l1};

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
/// boots under this VMM as well, in the same (6.1) L1.
#[test]
fn debian_13_kernel_boots_to_init() {
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let (vmlinux, initramfs) = guest_images_of("trixie").expect("the Debian 13 kernel");
    let script = r#"#!/bin/sh
taskset -c "${L1_VMM_CPU:-1}" /bin/vmm --kernel /guest/vmlinux-6.12 \
    --initrd /guest/initramfs-6.12.cpio.gz --memory 256M --vcpus 2 \
    --mem-backend memfd --fault-handler uffd
echo "VMM-EXIT-CODE=$?"
"#;
    let out = run_l1(
        "boot-6.12",
        &[
            (vmlinux, "/guest/vmlinux-6.12"),
            (initramfs, "/guest/initramfs-6.12.cpio.gz"),
        ],
        script,
        300,
    )
    .expect("running the L1");
    out.assert_script_ok();
    let init = out
        .line("GUEST-INIT-OK")
        .unwrap_or_else(|| out.fail("the 6.12 guest never reached its init"));
    if !init.contains("6.12") && out.line("Linux version 6.12").is_none() {
        out.fail("the guest that booted was not the 6.12 kernel");
    }
    if out.value("GUEST-INIT-OK", "nproc").as_deref() != Some("2") {
        out.fail("the 6.12 guest did not see 2 CPUs");
    }
    if out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE").as_deref() != Some("0") {
        out.fail("the VMM did not exit cleanly after the 6.12 guest");
    }
}
