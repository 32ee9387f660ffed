//! The races of `race.rs` with pages that come from a real memory image on
//! disk (a `FileSource`), as in a lazy snapshot restore: here a lost race
//! does not cost memory, it hands the guest the snapshot's contents for a
//! page it gave back. Each scenario runs with the re-check (the page reads
//! zero) and without it (the snapshot's page comes back).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::thread;

use common::*;
use guest_mem::vm_memory::GuestAddress;
use guest_mem::{FileSource, GuestMem, Readahead};

const PAGES: u64 = 64;

/// An image file whose page `p` holds `pattern_word(p)` in every word.
fn image() -> (tempfile_like::Dir, FileSource) {
    let dir = tempfile_like::Dir::new();
    let path = dir.path.join("memory.img");
    let mut f = std::fs::File::create(&path).unwrap();
    for p in 0..PAGES {
        let page: Vec<u8> = (0..PAGE / 8)
            .flat_map(|_| pattern_word(p).to_le_bytes())
            .collect();
        f.write_all(&page).unwrap();
    }
    drop(f);
    (dir, FileSource::open(&path).unwrap())
}

/// A scratch directory removed on drop (std only).
mod tempfile_like {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "guest-mem-image-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Faults `touch` with its fetch from the image held, runs `meanwhile`,
/// releases; returns (what the fault read, what `check` reads after, whether
/// `check` is backed in the memory file).
fn race(
    touch: u64,
    readahead: Readahead,
    skip_recheck: bool,
    meanwhile: impl FnOnce(&GuestMem),
    check: u64,
) -> (u64, u64, bool) {
    let (_dir, src) = image();
    let (src, gate) = GatedSource::new(Box::new(src), touch * PAGE);
    let mem = Arc::new(memory(PAGES, src, false, config(readahead, skip_recheck)));
    let t = {
        let mem = mem.clone();
        thread::spawn(move || read_page(&mem, touch))
    };
    gate.fetched.recv().unwrap();
    meanwhile(&mem);
    gate.release.send(()).unwrap();
    let touched = t.join().unwrap();
    let backed = page_has_data(&mem, check);
    (touched, read_page(&mem, check), backed)
}

#[test]
fn a_page_given_back_during_its_fetch_from_the_image_reads_zero() {
    let run = |off| {
        race(
            5,
            Readahead::NONE,
            off,
            |m| m.discard(GuestAddress(5 * PAGE), PAGE).unwrap(),
            5,
        )
    };
    let (touched, _, _) = run(false);
    assert_eq!(
        touched, 0,
        "the snapshot's page came back after the discard"
    );
    let (touched, _, _) = run(true);
    assert_eq!(
        touched,
        pattern_word(5),
        "without the re-check the snapshot's page comes back"
    );
}

#[test]
fn a_readahead_window_over_a_just_given_back_page_leaves_it_a_hole() {
    let run = |off| {
        race(
            8,
            Readahead::fixed(4 * PAGE),
            off,
            |m| m.discard(GuestAddress(10 * PAGE), PAGE).unwrap(),
            10,
        )
    };
    let (touched, after, backed) = run(false);
    assert_eq!(touched, pattern_word(8));
    assert!(!backed, "page 10 stays a hole after the race");
    assert_eq!(after, 0, "page 10 was given back");
    let (_, after, backed_off) = run(true);
    assert_eq!(
        after,
        pattern_word(10),
        "without the re-check readahead refills it"
    );
    assert!(backed_off);
}

#[test]
fn a_page_past_a_shrink_during_its_fetch_comes_back_zero_after_a_regrow() {
    let run = |off| {
        race(
            40,
            Readahead::NONE,
            off,
            |m| {
                m.resize(guest_mem::RegionIndex(0), 32 * PAGE).unwrap();
                m.resize(guest_mem::RegionIndex(0), PAGES * PAGE).unwrap();
            },
            40,
        )
    };
    let (touched, _, _) = run(false);
    assert_eq!(touched, 0, "the truncated page came back from the snapshot");
    let (touched, _, _) = run(true);
    assert_eq!(
        touched,
        pattern_word(40),
        "without the re-check the snapshot's page comes back"
    );
}
