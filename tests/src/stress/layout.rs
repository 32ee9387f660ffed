//! Where the stress guest keeps its code, its shared control words, its
//! virtqueues and its record of every page, in guest-physical memory. The
//! payload (assembled with these constants) and the host driver agree on
//! this map; nothing else does.
//!
//! ```text
//! 0x0010_0000  payload code
//! 0x0020_0000  control page (stop, lock, balloon actual, window limit/epoch)
//! 0x0020_1000  per-vCPU counters, STATS_SIZE bytes each
//! 0x0021_0000  inflate queue: descriptors, +0x1000 avail, +0x2000 used
//! 0x0022_0000  deflate queue: the same
//! 0x0023_0000  free page reporting queue: the same
//! 0x0026_0000  PFN buffers, one request's worth (256 bytes) per vCPU
//! 0x0030_0000  vCPU stacks, one page each
//! 0x0040_0000  page states: u32 per RAM pool page, then per window page
//! 0x0080_0000  RAM pool: up to the end of boot RAM
//! window       the resizable region (4 GiB up), its own pool
//! ```

/// Where the payload is loaded.
pub const LOAD: u64 = 0x10_0000;
/// Control page.
pub const CTRL: u64 = 0x20_0000;
/// Per-vCPU counter blocks.
pub const STATS: u64 = 0x20_1000;
/// Bytes per vCPU counter block.
pub const STATS_SIZE: u64 = 128;
/// Inflate queue (descriptor table; avail and used rings follow a page apart).
pub const INFLATE_Q: u64 = 0x21_0000;
/// Deflate queue.
pub const DEFLATE_Q: u64 = 0x22_0000;
/// Free page reporting queue.
pub const REPORT_Q: u64 = 0x23_0000;
/// vCPU `i`'s balloon request PFNs are at `PFN_BUF + i * 256` (CHUNK u32s).
pub const PFN_BUF: u64 = 0x26_0000;
/// vCPU `i`'s stack top is `STACKS + (i + 1) * 0x1000`.
pub const STACKS: u64 = 0x30_0000;
/// Page-state array.
pub const STATE: u64 = 0x40_0000;
/// First page of the RAM pool.
pub const POOL_START: u64 = 0x80_0000;
/// Most pages the state array can describe.
pub const MAX_POOL_PAGES: u64 = (POOL_START - STATE) / 4;
/// Entries of each virtqueue the payload uses.
pub const QUEUE_SIZE: u16 = 16;

/// Pages per chunk: an operation works on the pages a vCPU owns in one
/// chunk, and pool page `i` belongs to vCPU `(i % CHUNK) % vcpus`, so
/// every chunk (and every readahead window) mixes pages of all vCPUs.
pub const CHUNK: u64 = 64;
/// Chunks around the host's hot spot that operations pick from.
pub const HOT_SPAN: u64 = 4;
/// Window resizes move in steps of this many bytes.
pub const RESIZE_STEP: u64 = 2 << 20;

/// Control page words (byte offsets).
pub mod ctrl {
    /// Host: 1 = finish the current operation and exit, 2 = abort waits.
    pub const STOP: u64 = 0;
    /// Guest spinlock around the balloon queues.
    pub const LOCK: u64 = 8;
    /// Pages the guest holds in the balloon.
    pub const ACTUAL: u64 = 16;
    /// Window pages the guest may use.
    pub const LIMIT: u64 = 24;
    /// Bumped by the host after every LIMIT change.
    pub const EPOCH: u64 = 32;
    /// vCPU 0 finished the device set-up.
    pub const READY: u64 = 40;
    /// First chunk of the hot span (host-moved).
    pub const HOT: u64 = 48;
    /// Non-zero: the device set-up failed at this step.
    pub const INIT_ERR: u64 = 56;
    /// Requests made on the inflate, deflate and reporting queues.
    pub const SUBMITTED: [u64; 3] = [64, 72, 80];
}

/// Per-vCPU counter words (byte offsets in its block).
pub mod stat {
    /// The last window epoch this vCPU saw.
    pub const ACK: u64 = 0;
    pub const OPS: u64 = 8;
    /// Pages whose stamp was checked and then rewritten.
    pub const VERIFIED: u64 = 16;
    /// Stamps written.
    pub const WRITES: u64 = 24;
    pub const INFLATED: u64 = 32;
    pub const DEFLATED: u64 = 40;
    /// Pages that did not hold the stamp last written.
    pub const LOST: u64 = 48;
    /// Pages given back that did not read zero when taken again.
    pub const STRAY: u64 = 56;
    /// The first bad page: address, expected word, found word.
    pub const BAD_ADDR: u64 = 64;
    pub const BAD_EXPECTED: u64 = 72;
    pub const BAD_FOUND: u64 = 80;
    /// Set when the vCPU leaves its loop.
    pub const EXITED: u64 = 88;
    pub const WINDOW_OPS: u64 = 96;
    pub const BALLOON_OPS: u64 = 104;
    /// Pages reported free (and so given back).
    pub const REPORTED: u64 = 112;
}

/// Page states (u32 each).
pub mod state {
    /// Never written by the guest: holds whatever the source gave.
    pub const FRESH: u32 = 0;
    /// Written stamps carry a sequence number in `1..=SEQ_MAX`.
    pub const SEQ_MAX: u32 = 0x00ff_ffff;
    /// Given back (reported free, deflated, or cut off by a window shrink):
    /// must read zero when next used, and the host must not back it.
    pub const ZERO: u32 = 0xffff_fffc;
    /// On its way out of the balloon or being reported.
    pub const TAKING: u32 = 0xffff_fffd;
    /// In the balloon: the guest does not touch it, the host must not back it.
    pub const BALLOONED: u32 = 0xffff_fffe;
}

/// The word a vCPU writes at the first and last 8 bytes of a page:
/// sequence, vCPU and page frame number, so a wrong word tells whose write
/// it was and when.
pub fn stamp(gpa: u64, vcpu: u8, seq: u32) -> u64 {
    (u64::from(seq) << 40) | (u64::from(vcpu) << 32) | (gpa >> 12)
}

/// Reads a stamp back as (page frame, vCPU, sequence).
pub fn decode(word: u64) -> (u64, u8, u32) {
    (word & 0xffff_ffff, (word >> 32) as u8, (word >> 40) as u32)
}

/// A pool of pages the payload works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Guest-physical address of page 0.
    pub base: u64,
    /// Address of its first page-state entry.
    pub state: u64,
    /// Pages (for the window: its largest size).
    pub pages: u64,
}

/// The two pools of a stress guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub vcpus: u8,
    pub ram: Pool,
    pub window: Pool,
    /// Virtio-mmio base of the balloon.
    pub balloon_mmio: u64,
}

impl Layout {
    /// The layout for `memory` bytes of boot RAM and a `window`-byte
    /// resizable region at `window_base`.
    pub fn new(
        vcpus: u8,
        memory: u64,
        window_base: u64,
        window: u64,
        balloon_mmio: u64,
    ) -> Result<Layout, String> {
        if vcpus == 0 || u64::from(vcpus) > CHUNK {
            return Err(format!(
                "{vcpus} vCPUs: between 1 and {CHUNK} are supported"
            ));
        }
        if memory <= POOL_START + CHUNK * 4096 * HOT_SPAN || memory % (CHUNK * 4096) != 0 {
            return Err(format!(
                "memory {memory:#x} must be a multiple of {} KiB above {} MiB",
                CHUNK * 4,
                (POOL_START + CHUNK * 4096 * HOT_SPAN) >> 20
            ));
        }
        if window % RESIZE_STEP != 0 {
            return Err(format!(
                "the window {window:#x} must be a multiple of {} MiB",
                RESIZE_STEP >> 20
            ));
        }
        let ram_pages = (memory - POOL_START) / 4096;
        let window_pages = window / 4096;
        if ram_pages + window_pages > MAX_POOL_PAGES {
            return Err(format!(
                "{} MiB of memory and window is more than the page record holds ({} MiB)",
                (memory + window) >> 20,
                (MAX_POOL_PAGES * 4096 + POOL_START) >> 20
            ));
        }
        Ok(Layout {
            vcpus,
            ram: Pool {
                base: POOL_START,
                state: STATE,
                pages: ram_pages,
            },
            window: Pool {
                base: window_base,
                state: STATE + ram_pages * 4,
                pages: window_pages,
            },
            balloon_mmio,
        })
    }

    /// vCPU `id`'s counter block.
    pub fn stats(id: u8) -> u64 {
        STATS + u64::from(id) * STATS_SIZE
    }

    /// Owner of pool page `index`.
    pub fn owner(&self, index: u64) -> u8 {
        (index % CHUNK % u64::from(self.vcpus)) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_decode_to_what_they_were_made_of() {
        let w = stamp(0x1_2345_6000, 7, 0x00ab_cdef);
        assert_eq!(decode(w), (0x12_3456, 7, 0x00ab_cdef));
        assert_ne!(stamp(0x1000, 0, 1), stamp(0x1000, 1, 1));
        assert_ne!(stamp(0x1000, 0, 1), stamp(0x1000, 0, 2));
    }

    #[test]
    fn layouts_are_checked() {
        let ok = Layout::new(4, 256 << 20, 4 << 30, 64 << 20, 0xd000_0000).unwrap();
        assert_eq!(ok.ram.pages, (256 - 8) * 256);
        assert_eq!(ok.window.state, STATE + ok.ram.pages * 4);
        assert_eq!(ok.owner(5), 1);
        let three = Layout::new(3, 256 << 20, 4 << 30, 0, 0).unwrap();
        // Each chunk starts again at vCPU 0.
        assert_eq!(
            (three.owner(63), three.owner(64), three.owner(65)),
            (0, 0, 1)
        );
        assert!(Layout::new(0, 256 << 20, 4 << 30, 0, 0).is_err());
        assert!(Layout::new(65, 256 << 20, 4 << 30, 0, 0).is_err());
        assert!(Layout::new(2, 8 << 20, 4 << 30, 0, 0).is_err());
        assert!(Layout::new(2, (256 << 20) + 4096, 4 << 30, 0, 0).is_err());
        assert!(Layout::new(2, 256 << 20, 4 << 30, 3 << 20, 0).is_err());
        assert!(Layout::new(2, 8 << 30, 4 << 30, 0, 0).is_err());
    }
}
