//! Guest memory the fault handler cannot serve past some offset, for the
//! tests of how the VMM stops on it or poisons it.

use std::sync::Arc;

use guest_mem::{
    FaultConfig, GuestMem, PageSource, Readahead, RegionConfig, RegionSource, Unservable,
};

/// A memory image whose pages past `bad_from` cannot be read (an I/O error
/// every time); the pages before it are zero.
#[derive(Debug)]
pub struct FailingPast {
    /// First offset that cannot be read.
    pub bad_from: u64,
}

impl PageSource for FailingPast {
    fn size(&self) -> Option<u64> {
        None
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        offset + len <= self.bad_from
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.bad_from {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        buf.fill(0);
        Ok(())
    }
}

/// `size` bytes of guest RAM at 0 served from a [`FailingPast`] image,
/// without readahead (so the failing page is the one touched), by handler
/// threads under the VMM's seccomp filter; a page that cannot be served
/// gets `on_unservable`.
pub fn failing_memory(size: u64, bad_from: u64, on_unservable: Unservable) -> GuestMem {
    let mut rc = RegionConfig::new(0, size);
    rc.source = Some(RegionSource {
        source: Arc::new(FailingPast { bad_from }),
        offset: 0,
    });
    GuestMem::builder()
        .region(rc)
        .fault_config(FaultConfig {
            readahead: Readahead::NONE,
            on_thread_start: Some(vmm::seccomp::fault_thread_hook()),
            on_unservable,
            ..FaultConfig::default()
        })
        .build()
        .expect("guest memory over a failing source")
}
