//! Guest RAM as this VMM lays it out: boot RAM in one backing file, split
//! around the MMIO gap, and an optional virtio-mem window with a file of
//! its own; and the size checks that keep both sane.

use std::sync::Arc;

use guest_mem::{Backing, BackingFile, FaultConfig, GuestMem, RegionConfig};

use crate::config::MemBackend;
use crate::error::VmError;
use crate::layout::*;

/// Checks a memory size: not zero, page aligned, not absurd.
pub fn check_memory_size(size: u64, page: u64) -> Result<(), VmError> {
    if size == 0 {
        return Err(VmError::Config("memory size must not be zero".into()));
    }
    if size < (2 << 20) {
        return Err(VmError::Config(format!(
            "memory size {size} bytes is too small (at least 2 MiB)"
        )));
    }
    if size % page != 0 {
        return Err(VmError::Config(format!(
            "memory size {size:#x} is not a multiple of the page size {page:#x}"
        )));
    }
    if size > MAX_MEMORY {
        return Err(VmError::Config(format!(
            "memory size {size:#x} is larger than the {} GiB supported",
            MAX_MEMORY >> 30
        )));
    }
    Ok(())
}

/// Builds the boot RAM: one backing file, one region per side of the MMIO gap.
pub fn build_memory(
    size: u64,
    backend: &MemBackend,
    fault: FaultConfig,
    hotplug: Option<u64>,
) -> Result<GuestMem, VmError> {
    let regions = region_configs(size, backend, hotplug)?;
    let builder = regions
        .into_iter()
        .fold(GuestMem::builder().fault_config(fault), |b, rc| {
            b.region(rc)
        });
    Ok(builder.build()?)
}

/// The regions [`build_memory`] builds, for a caller that adds to them
/// (a restore gives each a page source).
pub fn region_configs(
    size: u64,
    backend: &MemBackend,
    hotplug: Option<u64>,
) -> Result<Vec<RegionConfig>, VmError> {
    let file = match backend {
        MemBackend::Memfd => {
            check_memory_size(size, 4096)?;
            BackingFile::memfd("guest-ram", size)?
        }
        MemBackend::Hugetlbfs(None) => {
            check_memory_size(size, 2 << 20)?;
            BackingFile::memfd_hugetlb("guest-ram", size)?
        }
        MemBackend::File(path) => {
            check_memory_size(size, 4096)?;
            BackingFile::open(path, size)?
        }
        MemBackend::Hugetlbfs(Some(path)) => {
            check_memory_size(size, 2 << 20)?;
            let f = BackingFile::open(path, size)?;
            if f.kind() != guest_mem::BackingKind::Hugetlbfs {
                return Err(VmError::Config(format!(
                    "{} is not on a hugetlbfs mount",
                    path.display()
                )));
            }
            f
        }
    };
    let file = Arc::new(file);
    let mut regions = Vec::new();
    for (gpa, len, offset) in ram_ranges(size) {
        let mut rc = RegionConfig::new(gpa, len);
        rc.backing = Backing::Shared {
            file: file.clone(),
            offset,
        };
        regions.push(rc);
    }
    if let Some(window) = hotplug {
        check_hotplug_size(size, window)?;
        // The window has a memfd of its own, empty until the guest plugs
        // blocks, so that unplugging its tail can truncate it.
        let mut rc = RegionConfig::new(hotplug_base(size), 0);
        rc.max_size = Some(window);
        if matches!(backend, MemBackend::Hugetlbfs(_)) {
            rc.backing = Backing::MemfdHugetlb;
        }
        regions.push(rc);
    }
    Ok(regions)
}

/// Checks a virtio-mem window size: whole Linux memory blocks, and the
/// window must end inside the address space the guest can reach.
pub fn check_hotplug_size(ram: u64, window: u64) -> Result<(), VmError> {
    if window == 0 || window % HOTPLUG_ALIGN != 0 {
        return Err(VmError::Config(format!(
            "the virtio-mem size {window:#x} must be a non-zero multiple of {} MiB",
            HOTPLUG_ALIGN >> 20
        )));
    }
    let limit = MAX_MEMORY * 2;
    if hotplug_base(ram).saturating_add(window) > limit {
        return Err(VmError::Config(format!(
            "the virtio-mem window of {window:#x} bytes would end past {limit:#x}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_are_checked() {
        for (size, page, what) in [
            (0, 4096, "zero"),
            (1 << 20, 4096, "too small"),
            ((64 << 20) + 512, 4096, "not a multiple"),
            (MAX_MEMORY + 4096, 4096, "larger than"),
            (3 << 20, 2 << 20, "not a multiple"),
        ] {
            let e = check_memory_size(size, page).unwrap_err().to_string();
            assert!(e.contains(what), "{size:#x}: {e}");
        }
        check_memory_size(256 << 20, 4096).unwrap();
    }

    #[test]
    fn hotplug_sizes_are_checked() {
        for (window, what) in [
            (0, "non-zero multiple"),
            (64 << 20, "non-zero multiple"),
            ((128 << 20) + 4096, "non-zero multiple"),
            (MAX_MEMORY * 2, "would end past"),
        ] {
            let e = check_hotplug_size(256 << 20, window)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{window:#x}: {e}");
        }
        check_hotplug_size(256 << 20, 512 << 20).unwrap();
        let mem = build_memory(
            256 << 20,
            &MemBackend::Memfd,
            FaultConfig::default(),
            Some(256 << 20),
        )
        .unwrap();
        let w = &mem.regions()[1];
        assert_eq!(
            (w.guest_base().0, w.max_size(), w.backed_size()),
            (4 << 30, 256 << 20, 0)
        );
    }

    #[test]
    fn unusable_backends_are_refused_with_the_path() {
        let fault = FaultConfig::default();
        let e = build_memory(
            64 << 20,
            &MemBackend::File("/proc".into()),
            fault.clone(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/proc"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = build_memory(
            64 << 20,
            &MemBackend::Hugetlbfs(Some(dir.path().join("x"))),
            fault,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not on a hugetlbfs"), "{e}");
    }

    #[test]
    fn big_memory_splits_around_the_gap() {
        let mem = build_memory(4 << 30, &MemBackend::Memfd, FaultConfig::default(), None).unwrap();
        let r = mem.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].guest_base().0, r[0].max_size()), (0, MMIO_GAP_START));
        assert_eq!(r[1].guest_base().0, MMIO_GAP_END);
        assert_eq!(r[1].file_offset(), MMIO_GAP_START);
        assert!(
            Arc::ptr_eq(r[0].backing(), r[1].backing()),
            "one backing file"
        );
    }
}
