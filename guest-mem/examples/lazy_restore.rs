//! Restores guest memory lazily from a memory image while a balloon-like
//! thread gives pages back, then prints the fault handler's counters.
//!
//! ```text
//! cargo run -p guest-mem --example lazy_restore
//! ```

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use guest_mem::vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use guest_mem::{FileSource, GuestMem, RegionConfig, RegionSource};

const SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A memory image: page p holds p in its first word.
    let image_path = std::env::temp_dir().join(format!("guest-mem-image-{}", std::process::id()));
    {
        let mut image = std::io::BufWriter::new(std::fs::File::create(&image_path)?);
        let mut page = vec![0u8; PAGE as usize];
        for p in 0..SIZE / PAGE {
            page[..8].copy_from_slice(&p.to_le_bytes());
            image.write_all(&page)?;
        }
    }

    // 2. Guest RAM on a memfd, first touches served from the image.
    let mut region = RegionConfig::new(0, SIZE);
    region.source = Some(RegionSource {
        source: Arc::new(FileSource::open(&image_path)?),
        offset: 0,
    });
    let mem = Arc::new(GuestMem::builder().region(region).build()?);
    std::fs::remove_file(&image_path)?;
    println!(
        "guest RAM: {} MiB on a memfd, userfaultfd handler: {}",
        SIZE >> 20,
        mem.userfault_enabled()
    );

    // 3. A "vCPU" reads the low half; meanwhile a "balloon" gives back the
    //    high half in 2 MiB chunks. Neither waits for the other.
    let stop = Arc::new(AtomicBool::new(false));
    let balloon = {
        let (mem, stop) = (mem.clone(), stop.clone());
        thread::spawn(move || {
            let mut at = SIZE / 2;
            while at < SIZE && !stop.load(Ordering::Relaxed) {
                mem.discard(GuestAddress(at), 2 << 20).expect("discard");
                at += 2 << 20;
            }
        })
    };
    let ram = mem.memory();
    for p in 0..SIZE / 2 / PAGE {
        let v: u64 = ram.memory().read_obj(GuestAddress(p * PAGE))?;
        assert_eq!(v, p, "page {p} restored from the image");
    }
    stop.store(true, Ordering::Relaxed);
    balloon.join().expect("balloon thread");

    // 4. What the host holds now, and what the handler did.
    println!(
        "allocated in the memfd: {} MiB of {} MiB",
        mem.allocated_bytes() >> 20,
        SIZE >> 20
    );
    println!("{}", mem.stats());
    Ok(())
}
