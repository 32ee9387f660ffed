//! virtio-mem driven through the API on the Debian kernel, inside the
//! nested L1: plug 256 MiB and check the guest's MemTotal rose and the
//! memory holds data, unplug and check MemTotal fell and the window's
//! backing file was truncated away, then unplug again while the guest
//! faults in fresh memory. Once on memfd memory, once on hugetlbfs (boot
//! RAM and window in 2 MiB huge pages, the virtio-mem block size), in the
//! default (Linux 6.1) L1, whose userfaultfd cannot poison, so the memfd
//! window is one slot guarded by protection and the hugetlbfs one is
//! guarded by memory slots; and once on memfd in a Linux 6.12 L1, where it
//! is one slot guarded by poisoning.

use integration_tests::l1::{
    guest_image_with, guest_images_of, kernel_dir_of, l1_unavailable, repo_root, run_l1_on,
};

#[test]
fn virtio_mem_plugs_and_unplugs_256_mib_under_a_workload() {
    cycle("memfd", false);
}

#[test]
fn virtio_mem_on_hugetlbfs_plugs_and_unplugs_whole_huge_pages() {
    cycle("hugetlbfs", false);
}

#[test]
fn virtio_mem_in_a_6_12_l1_keeps_one_slot_guarded_by_poisoning() {
    cycle("memfd", true);
}

/// One L1 at a time: they share the guest image and two TCG L1s on this
/// machine's two cores would only slow each other down.
static ONE_L1: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cycle(backend: &str, l1_6_12: bool) {
    let _one = ONE_L1.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = l1_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let script = format!(
        "#!/bin/sh\nMEM_BACKEND={backend} VMMCTL=/bin/vmmctl MEMORY_MIB=512 WINDOW_MIB=512 \
         PLUG_MIB=256 sh /guest/virtio-mem-cycle.sh\n"
    );
    let image = guest_image_with("virtio-mem", "resources/guest/virtio-mem-workload.sh")
        .expect("building the virtio-mem guest initramfs");
    let vmmctl = integration_tests::l1::vmm_binary()
        .unwrap()
        .with_file_name("vmmctl");
    let l1_kernel = l1_6_12.then(|| {
        guest_images_of("trixie").expect("the Debian 13 kernel");
        kernel_dir_of("trixie")
    });
    let out = run_l1_on(
        l1_kernel.as_deref(),
        &format!("virtio-mem-{backend}{}", if l1_6_12 { "-6.12" } else { "" }),
        &[
            (image, "/guest/virtio-mem.cpio.gz"),
            (vmmctl, "/bin/vmmctl"),
            (
                repo_root().join("resources/virtio-mem-cycle.sh"),
                "/guest/virtio-mem-cycle.sh",
            ),
        ],
        &script,
        600,
    )
    .expect("running the L1");
    let fail = |what: &str| -> ! { out.fail(what) };
    out.assert_script_ok();
    let kind = if backend == "hugetlbfs" {
        "(Hugetlbfs,"
    } else {
        "(Memfd,"
    };
    if !out.log.contains(kind) {
        fail(&format!("the VMM did not report {kind} guest RAM"));
    }
    let guard = match (backend, l1_6_12) {
        (_, true) => "guarded by poisoning",
        ("hugetlbfs", false) => "guarded by memory slots",
        _ => "guarded by protection",
    };
    if !out.log.contains(guard) {
        fail(&format!("the VMM did not report its window {guard}"));
    }
    let num = |marker: &str, key: &str| -> u64 {
        out.value(marker, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("no {key} on a {marker} line")))
    };
    let (before, plugged) = (
        num("GUEST-READY", "MemTotal"),
        num("GUEST-SAW-PLUG", "MemTotal"),
    );
    eprintln!("guest MemTotal: {before} kB, then {plugged} kB after the plug");
    if plugged < before + 250 * 1024 {
        fail("the guest's MemTotal did not grow by the plugged 256 MiB");
    }
    // The guest filled more than boot RAM had free: the window got backed.
    let used = num("HOT-USED", "allocated_mib");
    eprintln!("window allocated on the host while in use: {used} MiB");
    if used < 64 {
        fail("the plugged memory was not used");
    }
    for marker in ["HOT-UNPLUGGED", "HOT-UNPLUGGED-UNDER-LOAD"] {
        let (alloc, file) = (num(marker, "allocated_mib"), num(marker, "file_mib"));
        if alloc != 0 || file != 0 {
            fail(&format!(
                "{marker}: the window still has {file} MiB of file, {alloc} MiB allocated"
            ));
        }
    }
    let unplugged = num("GUEST-SAW-UNPLUG", "MemTotal");
    if unplugged > before + 50 * 1024 {
        fail("the guest's MemTotal did not fall back after the unplug");
    }
    // The second unplug raced the guest's churn: its fresh pages land in
    // the re-plugged window (the movable zone comes first), so the fault
    // handler was installing pages there while the file was cut back.
    let during = num("FAULTS-AFTER-UNPLUG", "pages_installed")
        - num("FAULTS-BEFORE-UNPLUG", "pages_installed");
    eprintln!("pages installed during the unplug under load: {during}");
    if num("GUEST-CHURNED", "rounds") == 0 || during == 0 {
        fail("the guest did not fault in fresh memory during the second unplug");
    }
    if !out.log.contains("\"backend_errors\": 0") {
        fail("virtio-mem reported backend errors");
    }
    if out.value("VMM-EXIT-CODE", "VMM-EXIT-CODE").as_deref() != Some("0") {
        fail("the VMM did not exit cleanly");
    }
}
