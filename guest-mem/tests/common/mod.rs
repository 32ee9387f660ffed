//! Helpers for the host-only tests: page sources with known contents and a
//! gate that holds a fetch until the test releases it.

#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use guest_mem::source::PageSource;
use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FaultConfig, GuestMem, Readahead, RegionConfig, RegionSource, RetryPolicy};

pub const PAGE: u64 = 4096;

/// The word a pattern page holds everywhere: tagged with the page number so
/// stale contents are recognisable.
pub fn pattern_word(page: u64) -> u64 {
    0xA5A5_0000_0000_0000 | page
}

/// A memory image whose page `p` holds `pattern_word(p)` in every word.
#[derive(Debug)]
pub struct PatternSource {
    pub len: u64,
}

impl PageSource for PatternSource {
    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
    fn is_zero(&self, offset: u64, _len: u64) -> bool {
        offset >= self.len
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(8).enumerate() {
            let at = offset + i as u64 * 8;
            let w = if at < self.len {
                pattern_word(at / PAGE)
            } else {
                0
            };
            chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

/// Wraps a source; the first fetch that covers `gate_offset` signals
/// `fetched` and then waits for `release` before returning (the injected
/// delay that opens the race window deterministically).
#[derive(Debug)]
pub struct GatedSource {
    inner: Box<dyn PageSource>,
    gate_offset: u64,
    armed: AtomicBool,
    fetched: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
    pub fetches: AtomicU64,
}

pub struct Gate {
    pub fetched: Receiver<()>,
    pub release: Sender<()>,
}

impl GatedSource {
    pub fn new(inner: Box<dyn PageSource>, gate_offset: u64) -> (Arc<Self>, Gate) {
        let (ftx, frx) = channel();
        let (rtx, rrx) = channel();
        (
            Arc::new(GatedSource {
                inner,
                gate_offset,
                armed: AtomicBool::new(true),
                fetched: Mutex::new(ftx),
                release: Mutex::new(rrx),
                fetches: AtomicU64::new(0),
            }),
            Gate {
                fetched: frx,
                release: rtx,
            },
        )
    }
}

impl PageSource for GatedSource {
    fn size(&self) -> Option<u64> {
        self.inner.size()
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        self.inner.is_zero(offset, len)
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch(offset, buf)?;
        let covers = offset <= self.gate_offset && self.gate_offset < offset + buf.len() as u64;
        if covers && self.armed.swap(false, Ordering::SeqCst) {
            self.fetched.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        Ok(())
    }
}

/// Fault configuration for the race tests.
pub fn config(readahead: Readahead, skip_recheck: bool) -> FaultConfig {
    FaultConfig {
        readahead,
        retry_policy: RetryPolicy::Overlapping,
        skip_recheck,
        ..FaultConfig::default()
    }
}

/// One region of `pages` pages (resizable up to that), served from `source`.
pub fn memory(
    pages: u64,
    source: Arc<dyn PageSource>,
    private: bool,
    fault: FaultConfig,
) -> GuestMem {
    let mut rc = RegionConfig::new(0, pages * PAGE);
    rc.max_size = Some(pages * PAGE);
    rc.private = private;
    rc.source = Some(RegionSource { source, offset: 0 });
    GuestMem::builder()
        .region(rc)
        .fault_config(fault)
        .build()
        .expect("building guest memory")
}

/// Reads the first word of guest page `page` (faulting it in if needed).
pub fn read_page(mem: &GuestMem, page: u64) -> u64 {
    mem.memory()
        .memory()
        .read_obj::<u64>(GuestAddress(page * PAGE))
        .expect("reading guest memory")
}

/// Whether the backing file holds data anywhere in guest page `page`.
pub fn page_has_data(mem: &GuestMem, page: u64) -> bool {
    let r = &mem.regions()[0];
    r.backing()
        .has_data(r.file_range(page * PAGE, PAGE))
        .expect("SEEK_DATA")
}

/// Writes `value` as the first word of guest page `page`.
pub fn write_page(mem: &GuestMem, page: u64, value: u64) {
    mem.memory()
        .memory()
        .write_obj(value, GuestAddress(page * PAGE))
        .expect("writing guest memory")
}

/// Where [`ram_and_window`] puts its window.
pub const WINDOW_BASE: u64 = 1 << 30;

/// 1 MiB of RAM at 0 and, as region 1, an empty hotplug window of
/// `max_size` bytes at [`WINDOW_BASE`].
pub fn ram_and_window(max_size: u64) -> Arc<GuestMem> {
    let mut w = RegionConfig::new(WINDOW_BASE, 0);
    w.max_size = Some(max_size);
    Arc::new(
        GuestMem::builder()
            .region(RegionConfig::new(0, 1 << 20))
            .region(w)
            .build()
            .unwrap(),
    )
}

/// A file of `len` bytes with a position-dependent pattern, in `dir`
/// (already unlinked; positioned at its end).
pub fn image_in(dir: &str, tag: &str, len: usize) -> (std::fs::File, Vec<u8>) {
    use std::io::Write;
    let path =
        std::path::PathBuf::from(dir).join(format!("guest-mem-image-{tag}-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8 | 1).collect();
    f.write_all(&bytes).unwrap();
    (f, bytes)
}

/// `len` bytes of guest memory at `gpa`, read through the memory map.
pub fn guest_bytes(mem: &GuestMem, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.memory()
        .memory()
        .read_slice(&mut out, GuestAddress(gpa))
        .unwrap();
    out
}
