//! The virtio-mem window as KVM sees it, and how it keeps a guest away
//! from blocks it has not plugged: a guest touching one must not make the
//! host back it (host allocation beyond the plugged blocks, and memory
//! nobody accounts for). Two guards ([`WindowGuard`]):
//!
//! - **Poison**: one KVM memory slot over the whole window, mapped once.
//!   The window's file spans it ([`HotplugRegion::spanning`]) and the fault
//!   handler never serves a page that is not plugged: it poisons it
//!   (`UFFDIO_POISON`, Linux 6.6+), so the guest's access ends in a machine
//!   check and the host allocates nothing. Plugging and unplugging never
//!   touch the guest's memory map: no memory-slot update (each one waits
//!   for a grace period, and deleting a slot zaps the guest's mappings).
//! - **Protection**: one memory slot over the whole window, as with
//!   poisoning, and the VMM's mapping of every block that is not plugged
//!   is `PROT_NONE`. KVM cannot map such a page for the guest (its
//!   `mprotect` zaps just that range through KVM's MMU notifier), so a
//!   guest touch makes `KVM_RUN` fail with `EFAULT` and the VM stops with
//!   that error; the host allocates nothing. For kernels without
//!   poisoning (before 6.6): there, a slot deletion drops every mapping of
//!   the guest (`KVM_X86_QUIRK_SLOT_ZAP_ALL` cannot be turned off), which
//!   the guest then faults back in, so unplugging under slots cost the
//!   guest its whole working set each time.
//! - **Slots**: one memory slot per plugged extent, not one over the whole
//!   window. A guest access outside them has no slot behind it and exits to
//!   the VMM as an MMIO access no device claims (reads all ones, writes
//!   dropped, counted). For hugetlbfs windows, whose file cannot span the
//!   window unless the huge-page pool could hold all of it.
//!
//! The devices' memory map leaves unplugged ranges out either way
//! (`GuestMem::set_accessible`).

use std::sync::{Arc, Mutex};

use devices::memory::{BackendError, HotplugBackend};
use guest_mem::backend::HotplugRegion;
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{GuestMem, Region, RegionIndex, Unservable};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Most KVM memory slots the window may use (a fully fragmented 1 GiB
/// window of 2 MiB blocks needs 256).
pub const MAX_WINDOW_SLOTS: usize = 4096;

/// How the window keeps the guest off blocks it has not plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowGuard {
    /// One memory slot per plugged extent.
    Slots,
    /// One memory slot over the whole window; the fault handler poisons
    /// what is not plugged.
    Poison,
    /// One memory slot over the whole window; what is not plugged is
    /// `PROT_NONE` in the VMM's mapping.
    Protection,
}

impl WindowGuard {
    /// Its name in the API and messages.
    pub fn name(self) -> &'static str {
        match self {
            WindowGuard::Slots => "memory slots",
            WindowGuard::Poison => "poisoning",
            WindowGuard::Protection => "protection",
        }
    }

    /// The guard the window of region `index` of `mem` allows: poisoning
    /// where the fault handler poisons pages it will not serve, else
    /// protection. A hugetlbfs window keeps slots: its file cannot span
    /// the window unless the huge-page pool could hold all of it.
    pub fn for_window(mem: &GuestMem, index: RegionIndex) -> Self {
        let hugetlb = mem
            .region(index)
            .is_some_and(|r| r.backing().kind() == guest_mem::BackingKind::Hugetlbfs);
        if hugetlb {
            WindowGuard::Slots
        } else if mem.unservable() == Some(Unservable::Poison) {
            WindowGuard::Poison
        } else {
            WindowGuard::Protection
        }
    }
}

/// A hotplug window mapped into a VM, guarded by [`WindowGuard`].
pub struct HotplugWindow {
    // Declared first: dropped before the memory the slots point into.
    vm: Arc<VmFd>,
    inner: HotplugRegion,
    mem: Arc<GuestMem>,
    index: RegionIndex,
    guard: WindowGuard,
    first_slot: u32,
    /// Slot `first_slot + i` maps extent `slots[i]` (guest address, length).
    slots: Mutex<Vec<Option<(u64, u64)>>>,
}

impl HotplugWindow {
    /// The window of region `index` of `mem`, mapped into `vm` with slots
    /// numbered from `first_slot`, guarded as `mem` allows
    /// ([`WindowGuard::for_window`]).
    pub fn new(
        vm: Arc<VmFd>,
        mem: Arc<GuestMem>,
        index: RegionIndex,
        first_slot: u32,
    ) -> guest_mem::Result<Self> {
        let guard = WindowGuard::for_window(&mem, index);
        let inner = match guard {
            WindowGuard::Slots => HotplugRegion::new(mem.clone(), index)?,
            WindowGuard::Poison | WindowGuard::Protection => {
                HotplugRegion::spanning(mem.clone(), index)?
            }
        };
        let w = HotplugWindow {
            vm,
            inner,
            mem,
            index,
            guard,
            first_slot,
            slots: Mutex::new(Vec::new()),
        };
        match guard {
            WindowGuard::Slots => w.sync()?,
            WindowGuard::Poison | WindowGuard::Protection => {
                let (base, size) = w.inner.window();
                if guard == WindowGuard::Protection {
                    // Out of reach before the guest can reach anything.
                    let reachable = w.mem.accessible_extents(index);
                    for (off, len) in uncovered(&[(0, size)], &reachable) {
                        w.protect(off, len, false)?;
                    }
                }
                w.set_slot(first_slot, base.0, size)?;
                *w.slots.lock().unwrap_or_else(|p| p.into_inner()) = vec![Some((base.0, size))];
            }
        }
        Ok(w)
    }

    /// Under [`WindowGuard::Protection`]: makes `[offset, offset + len)` of
    /// the window's mapping readable and writable, or `PROT_NONE`.
    fn protect(&self, offset: u64, len: u64, reachable: bool) -> guest_mem::Result<()> {
        let region = self.region();
        if offset
            .checked_add(len)
            .is_none_or(|end| end > region.max_size())
        {
            return Err(guest_mem::Error::Config(format!(
                "protecting {offset:#x}+{len:#x}: past the window's {:#x} bytes",
                region.max_size()
            )));
        }
        let prot = if reachable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: the range lies inside the region's own mapping (checked
        // above), which lives as long as `self.mem`; blocks are page
        // aligned. Only the protection changes: nothing in the VMM reads
        // or writes a block that is not plugged (the devices' memory map
        // leaves it out, and `set_plugged` makes a block reachable here
        // before it enters that map and unreachable after it has left),
        // and the fault handler installs pages through userfaultfd, which
        // needs no access rights in this mapping.
        let rc = unsafe {
            libc::mprotect(
                (region.host_addr() + offset) as *mut libc::c_void,
                len as usize,
                prot,
            )
        };
        if rc != 0 {
            return Err(guest_mem::Error::Mmap(format!(
                "mprotect of the window at {offset:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// How the window is guarded.
    pub fn guard(&self) -> WindowGuard {
        self.guard
    }

    fn region(&self) -> &Region {
        // HotplugRegion::new checked that the region exists.
        &self.mem.regions()[self.index.0]
    }

    fn set_slot(&self, slot: u32, gpa: u64, len: u64) -> guest_mem::Result<()> {
        let region = self.region();
        let offset = gpa - region.guest_base().0;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: region.host_addr() + offset,
        };
        // SAFETY: the host range is part of the region's own mapping
        // (offset + len <= max_size: an accessible extent, or the window),
        // which lives as long as `self.mem`; `self.vm` is dropped before
        // `self.mem`, and the Vm drops its own VM fd before its memory. A
        // length of 0 deletes the slot. No other slot covers these guest
        // addresses: the window's extents are disjoint (a poison-guarded
        // window has one slot) and the window lies apart from boot RAM.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| {
            guest_mem::Error::Config(format!(
                "KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}+{len:#x}: {e}"
            ))
        })
    }

    /// Makes the KVM slots cover exactly the accessible extents, changing
    /// as few slots as it can: a slot that stays wholly accessible is kept
    /// (a plug only adds slots for what it plugs; neighbouring slots are not
    /// merged), and only a slot that lost part of its range is deleted, its
    /// remaining parts re-added. Deleting a slot is the dear operation: on
    /// kernels with `KVM_X86_QUIRK_SLOT_ZAP_ALL` in force it drops every
    /// mapping of the guest, which the guest then faults back in.
    fn sync(&self) -> guest_mem::Result<()> {
        if self.guard != WindowGuard::Slots {
            return Ok(());
        }
        let base = self.region().guest_base().0;
        let want: Vec<(u64, u64)> = self
            .mem
            .accessible_extents(self.index)
            .into_iter()
            .map(|(off, len)| (base + off, len))
            .collect();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let (started, mut deleted, mut created) = (std::time::Instant::now(), 0, 0);
        // Slots no longer wholly accessible are deleted first, so that no
        // two slots ever overlap.
        for (i, s) in slots.iter_mut().enumerate() {
            if let Some((gpa, _)) = s.filter(|&e| !within(e, &want)) {
                self.set_slot(self.first_slot + i as u32, gpa, 0)?;
                *s = None;
                deleted += 1;
            }
        }
        let kept: Vec<(u64, u64)> = slots.iter().flatten().copied().collect();
        for e in uncovered(&want, &kept) {
            let i = match slots.iter().position(Option::is_none) {
                Some(i) => i,
                None if slots.len() < MAX_WINDOW_SLOTS => {
                    slots.push(None);
                    slots.len() - 1
                }
                None => {
                    return Err(guest_mem::Error::Config(format!(
                        "the virtio-mem window needs more than {MAX_WINDOW_SLOTS} memory slots"
                    )))
                }
            };
            self.set_slot(self.first_slot + i as u32, e.0, e.1)?;
            slots[i] = Some(e);
            created += 1;
        }
        if deleted + created > 0 {
            log::debug!(
                "virtio-mem window: {deleted} memory slots deleted, {created} created in {} us",
                started.elapsed().as_micros()
            );
        }
        Ok(())
    }

    /// Memory slots in use (one per plugged extent; one in all when
    /// guarded by poisoning).
    pub fn slots_in_use(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .count()
    }
}

impl HotplugBackend for HotplugWindow {
    fn window(&self) -> (GuestAddress, u64) {
        self.inner.window()
    }

    fn backed_size(&self) -> u64 {
        self.inner.backed_size()
    }

    fn set_backed_size(&self, size: u64) -> Result<(), BackendError> {
        let r = self.inner.set_backed_size(size);
        self.sync()?;
        Ok(r?)
    }

    fn discard_range(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        Ok(self.inner.discard_range(offset, len)?)
    }

    fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<(), BackendError> {
        if self.guard == WindowGuard::Protection {
            // Reachable in the mapping before the devices may use it;
            // unreachable only once they no longer can.
            if plugged {
                self.protect(offset, len, true)?;
                if let Err(e) = self.inner.set_plugged(offset, len, true) {
                    let _ = self.protect(offset, len, false);
                    return Err(e.into());
                }
            } else {
                self.inner.set_plugged(offset, len, false)?;
                if let Err(e) = self.protect(offset, len, false) {
                    let _ = self.inner.set_plugged(offset, len, true);
                    return Err(e.into());
                }
            }
            return Ok(());
        }
        let r = self.inner.set_plugged(offset, len, plugged);
        self.sync()?;
        Ok(r?)
    }

    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
}

/// Whether extent `e` (address, length) lies wholly inside one of
/// `extents` (disjoint and merged, as the accessible extents are).
fn within(e: (u64, u64), extents: &[(u64, u64)]) -> bool {
    extents
        .iter()
        .any(|&(a, len)| a <= e.0 && e.0 + e.1 <= a + len)
}

/// The parts of `want` (disjoint extents) that no extent of `covered`
/// (disjoint, each inside one of `want`) covers.
fn uncovered(want: &[(u64, u64)], covered: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut covered = covered.to_vec();
    covered.sort_unstable();
    let mut out = Vec::new();
    for &(start, len) in want {
        let end = start + len;
        let mut at = start;
        for &(c, clen) in covered.iter().filter(|&&(c, _)| c >= start && c < end) {
            if c > at {
                out.push((at, c - at));
            }
            at = at.max(c + clen);
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_mem::{FaultConfig, FaultMode, RegionConfig};

    /// 2 MiB of RAM and a 4 MiB window, faults served as `fault` says.
    fn window_memory(fault: FaultConfig) -> GuestMem {
        let mut w = RegionConfig::new(1 << 30, 0);
        w.max_size = Some(4 << 20);
        GuestMem::builder()
            .region(RegionConfig::new(0, 2 << 20))
            .region(w)
            .fault_config(fault)
            .build()
            .unwrap()
    }

    #[test]
    fn the_window_is_guarded_by_poisoning_where_the_handler_poisons_else_by_protection() {
        let guard = |fault| WindowGuard::for_window(&window_memory(fault), RegionIndex(1));
        let report = FaultConfig {
            on_unservable: Unservable::Report,
            ..FaultConfig::default()
        };
        let kernel = FaultConfig {
            mode: FaultMode::Kernel,
            ..FaultConfig::default()
        };
        assert_eq!(guard(report), WindowGuard::Protection);
        assert_eq!(guard(kernel), WindowGuard::Protection);
        let poisoning = window_memory(FaultConfig::default());
        if poisoning.unservable() == Some(Unservable::Poison) {
            assert_eq!(
                WindowGuard::for_window(&poisoning, RegionIndex(1)),
                WindowGuard::Poison
            );
        }
    }

    /// Whether this process can read the byte at `addr` (without faulting:
    /// `process_vm_readv` answers `EFAULT` for an unreadable page).
    fn readable(addr: u64) -> bool {
        let mut byte = 0u8;
        let local = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: reads one byte of this process into `byte`; an
        // unreadable source is an error, not a fault.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) == 1 }
    }

    #[test]
    fn a_protection_guarded_window_is_unreachable_where_not_plugged() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: /dev/kvm is not available");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = Arc::new(window_memory(FaultConfig {
            on_unservable: Unservable::Report,
            ..FaultConfig::default()
        }));
        let w = HotplugWindow::new(vm, mem.clone(), RegionIndex(1), 1).unwrap();
        assert_eq!(w.guard(), WindowGuard::Protection);
        assert_eq!(w.slots_in_use(), 1, "one slot over the whole window");
        let host = mem.regions()[1].host_addr();
        let block = 2 << 20;
        assert!(
            !readable(host) && !readable(host + block),
            "nothing plugged yet"
        );
        w.set_backed_size(2 * block).unwrap();
        w.set_plugged(block, block, true).unwrap();
        assert!(readable(host + block) && readable(host + 2 * block - 4096));
        assert!(!readable(host), "block 0 was not plugged");
        w.set_plugged(block, block, false).unwrap();
        assert!(!readable(host + block), "unplugged again");
        assert_eq!(w.slots_in_use(), 1, "no slot changed");
    }

    #[test]
    fn a_plug_next_to_a_slot_adds_a_slot_and_keeps_the_old_one() {
        let want = [(0, 4 << 20)];
        let slots = [(0, 2 << 20)];
        assert!(within(slots[0], &want));
        assert_eq!(uncovered(&want, &slots), vec![(2 << 20, 2 << 20)]);
    }

    #[test]
    fn an_unplug_inside_a_slot_splits_it() {
        // Slot [0, 6 MiB) with [2, 4) unplugged: the slot goes, both
        // remaining parts come back.
        let want = [(0, 2 << 20), (4 << 20, 2 << 20)];
        assert!(!within((0, 6 << 20), &want));
        assert_eq!(uncovered(&want, &[]), want.to_vec());
    }

    #[test]
    fn gaps_between_kept_slots_are_filled() {
        let want = [(0, 10 << 20), (20 << 20, 2 << 20)];
        let kept = [(6 << 20, 2 << 20), (2 << 20, 2 << 20)];
        assert_eq!(
            uncovered(&want, &kept),
            vec![
                (0, 2 << 20),
                (4 << 20, 2 << 20),
                (8 << 20, 2 << 20),
                (20 << 20, 2 << 20)
            ]
        );
        assert_eq!(
            uncovered(&want, &[(0, 10 << 20), (20 << 20, 2 << 20)]),
            vec![]
        );
    }
}
