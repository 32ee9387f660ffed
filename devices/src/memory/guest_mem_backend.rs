//! [`MemoryBackend`] and [`HotplugBackend`] for `guest-mem`: its
//! [`GuestMem`] gives memory back by truncate-generation invalidations, and
//! a [`HotplugRegion`] is a resizable region of it.

use guest_mem::backend::HotplugRegion;
use guest_mem::GuestMem;
use vm_memory::GuestAddress;

use super::{BackendError, HotplugBackend, MemoryBackend};

impl From<guest_mem::Error> for BackendError {
    fn from(e: guest_mem::Error) -> Self {
        use guest_mem::Error as E;
        match e {
            E::NotRam { gpa, len } => BackendError::NotRam { gpa, len },
            E::ZeroSize | E::Unaligned { .. } | E::TooLarge { .. } => {
                BackendError::InvalidRange(e.to_string())
            }
            E::MemoryInUse => BackendError::Busy,
            e => BackendError::Failed(Box::new(e)),
        }
    }
}

impl MemoryBackend for GuestMem {
    fn discard_granularity(&self, gpa: GuestAddress) -> Option<u64> {
        GuestMem::discard_granularity(self, gpa)
    }

    fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
        GuestMem::is_ram(self, gpa, len)
    }

    fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), BackendError> {
        Ok(GuestMem::discard(self, gpa, len)?)
    }

    fn populated(&self, gpa: GuestAddress, len: u64) -> Option<bool> {
        GuestMem::populated(self, gpa, len)
    }

    fn ram_bytes(&self) -> Option<u64> {
        Some(self.mapped_bytes())
    }
}

impl HotplugBackend for HotplugRegion {
    fn window(&self) -> (GuestAddress, u64) {
        HotplugRegion::window(self)
    }

    fn backed_size(&self) -> u64 {
        HotplugRegion::backed_size(self)
    }

    fn set_backed_size(&self, size: u64) -> Result<(), BackendError> {
        Ok(HotplugRegion::set_backed_size(self, size)?)
    }

    fn discard_range(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        Ok(HotplugRegion::discard_range(self, offset, len)?)
    }

    fn set_plugged(&self, offset: u64, len: u64, plugged: bool) -> Result<(), BackendError> {
        Ok(HotplugRegion::set_plugged(self, offset, len, plugged)?)
    }

    fn allocated_bytes(&self) -> u64 {
        HotplugRegion::allocated_bytes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mem_errors_keep_their_meaning() {
        let e = BackendError::from(guest_mem::Error::NotRam { gpa: 1, len: 2 });
        assert!(matches!(e, BackendError::NotRam { gpa: 1, len: 2 }));
        assert!(matches!(
            BackendError::from(guest_mem::Error::MemoryInUse),
            BackendError::Busy
        ));
        let e = BackendError::from(guest_mem::Error::PunchHole(std::io::Error::other("x")));
        assert_eq!(e.to_string(), "punching a hole: x", "the cause is kept");
    }
}
