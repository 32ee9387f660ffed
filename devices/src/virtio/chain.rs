//! Taking descriptor chains off a queue with bounded work.
//!
//! Everything here reads guest-controlled memory, so every step is bounded
//! and checked: a notification buys at most a queue's worth of chains and
//! [`DESCRIPTORS_PER_NOTIFY`] descriptors (the rest waits for the next turn
//! of the event loop), a chain at most a
//! device-chosen number of descriptors — zero-length ones included, so they
//! cannot slip past the cap — and indirect tables are refused because no
//! device here offers `VIRTIO_RING_F_INDIRECT_DESC`. `virtio-queue`'s own
//! iterator would follow an indirect table of up to 65,535 descriptors
//! whatever was negotiated, so the chain is walked here instead.

use std::fmt;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use super::{signal_used, Interrupt};

/// Most descriptors one notification processes before the device yields
/// (refused chains count one each). Chains are also limited to the queue's
/// size per notification.
pub const DESCRIPTORS_PER_NOTIFY: usize = 1024;

const VRING_DESC_F_INDIRECT: u16 = 4;

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index at or past the queue size.
    #[error("descriptor index {0} is outside the queue")]
    BadIndex(u16),
    /// The descriptor table could not be read.
    #[error("descriptor {0} cannot be read from guest memory")]
    Unreadable(u16),
    /// An indirect descriptor, which was not negotiated.
    #[error("indirect descriptor {0}, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    Indirect(u16),
    /// More descriptors than the device accepts (or a loop).
    #[error("more than {0} descriptors (or a loop)")]
    TooLong(usize),
}

/// What the device did with its notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The queue is empty (as far as this notification saw).
    Done,
    /// The budget ran out with chains left: process the queue again later.
    MoreWork,
}

/// How much more work one notification may do.
#[derive(Debug)]
pub struct Budget {
    chains: usize,
    descriptors: usize,
}

impl Budget {
    /// A fresh budget for a notification of `queue`.
    pub fn new(queue: &Queue) -> Self {
        Budget {
            chains: usize::from(queue.size()),
            descriptors: DESCRIPTORS_PER_NOTIFY,
        }
    }

    /// Whether it is spent.
    pub fn spent(&self) -> bool {
        self.chains == 0 || self.descriptors == 0
    }

    /// Spends one chain of `descriptors` (at least one).
    pub fn spend(&mut self, descriptors: usize) {
        self.chains = self.chains.saturating_sub(1);
        self.descriptors = self.descriptors.saturating_sub(descriptors.max(1));
    }
}

/// Pops the next available chain's head, if any. An avail index that runs
/// further ahead than the queue holds is the driver's error.
pub fn pop_head<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<Option<u16>, virtio_queue::Error> {
    let mut iter = queue.iter(mem)?;
    Ok(iter.next().map(|c| c.head_index()))
}

/// The descriptors of the chain starting at `head`, at most `max` of them.
pub fn read_chain<M: GuestMemory>(
    mem: &M,
    queue: &Queue,
    head: u16,
    max: usize,
) -> Result<Vec<Descriptor>, ChainError> {
    let size = queue.size();
    let table = GuestAddress(queue.desc_table());
    let limit = max.min(usize::from(size));
    let mut out = Vec::new();
    let mut index = head;
    loop {
        if index >= size {
            return Err(ChainError::BadIndex(index));
        }
        if out.len() == limit {
            return Err(ChainError::TooLong(limit));
        }
        let at = table
            .checked_add(u64::from(index) * std::mem::size_of::<Descriptor>() as u64)
            .ok_or(ChainError::Unreadable(index))?;
        let desc: Descriptor = mem
            .read_obj(at)
            .map_err(|_| ChainError::Unreadable(index))?;
        if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect(index));
        }
        out.push(desc);
        if !desc.has_next() {
            return Ok(out);
        }
        index = desc.next();
    }
}

/// What a device did with a chain [`serve_queue`] handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Return it to the driver now, saying the device wrote this many bytes.
    Used(u32),
    /// The device keeps it and returns it itself later (the balloon's
    /// statistics buffer).
    Held,
}

/// Serves `queue` for one notification: each available chain is read (at
/// most `max_descs` descriptors), handed to `handle` with its head index,
/// and returned before the next is taken, within one [`Budget`]. The driver
/// is signalled once at the end if anything was returned.
///
/// A memory guard is held only while a chain is taken and while it is
/// returned, never while `handle` runs: a handler may unplug memory, which
/// waits for every guard. A malformed chain is refused through `refuse`
/// and returned with nothing written; a broken avail ring ends the turn
/// (nothing more until the next notification).
pub fn serve_queue<D: ?Sized, S: GuestAddressSpace>(
    dev: &mut D,
    mem: &S,
    queue: &mut Queue,
    interrupt: Option<&Interrupt>,
    max_descs: usize,
    refuse: impl Fn(&D, fmt::Arguments<'_>),
    mut handle: impl FnMut(&mut D, &mut Queue, u16, &[Descriptor]) -> Served,
) -> Progress {
    let mut budget = Budget::new(queue);
    let mut returned = false;
    let progress = loop {
        if budget.spent() {
            break Progress::MoreWork;
        }
        let taken = {
            let guard = mem.memory();
            match pop_head(queue, &*guard) {
                Ok(Some(head)) => Ok((head, read_chain(&*guard, queue, head, max_descs))),
                Ok(None) => break Progress::Done,
                Err(e) => Err(e),
            }
        };
        let served = match taken {
            Ok((head, Ok(descs))) => {
                budget.spend(descs.len());
                (head, handle(dev, queue, head, &descs))
            }
            Ok((head, Err(e))) => {
                budget.spend(1);
                refuse(dev, format_args!("{e}"));
                (head, Served::Used(0))
            }
            Err(e) => {
                refuse(dev, format_args!("{e}"));
                break Progress::Done;
            }
        };
        if let (head, Served::Used(len)) = served {
            match queue.add_used(&*mem.memory(), head, len) {
                Ok(()) => returned = true,
                Err(e) => refuse(dev, format_args!("returning {head}: {e}")),
            }
        }
    };
    if returned {
        signal_used(queue, &*mem.memory(), interrupt);
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = 1;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn setup() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn chains_are_read_within_their_limits() {
        let mem = setup();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        mock.add_desc_chains(
            &[
                desc(0x8000, 8, NEXT, 1),
                desc(0x9000, 0, NEXT, 2),
                desc(0xa000, 0, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        let chain = read_chain(&mem, &q, head, 8).unwrap();
        assert_eq!(chain.len(), 3, "zero-length descriptors are descriptors");
        assert_eq!(
            read_chain(&mem, &q, head, 2).unwrap_err(),
            ChainError::TooLong(2),
            "zero-length descriptors count against the cap"
        );
        assert_eq!(pop_head(&mut q, &mem).unwrap(), None, "one chain only");
    }

    #[test]
    fn loops_indirect_tables_and_bad_indices_are_refused() {
        let mem = setup();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // A loop: 0 -> 1 -> 0.
        mock.add_desc_chains(&[desc(0x8000, 8, NEXT, 1), desc(0x8000, 8, NEXT, 0)], 0)
            .unwrap();
        let q: Queue = mock.create_queue().unwrap();
        assert_eq!(
            read_chain(&mem, &q, 0, 64).unwrap_err(),
            ChainError::TooLong(16)
        );
        // An indirect table of 65,535 descriptors is not followed.
        mock.add_desc_chains(&[desc(0x8000, 0xffff * 16, VRING_DESC_F_INDIRECT, 0)], 0)
            .unwrap();
        assert_eq!(
            read_chain(&mem, &q, 0, 64).unwrap_err(),
            ChainError::Indirect(0)
        );
        mock.add_desc_chains(&[desc(0x8000, 8, NEXT, 200)], 0)
            .unwrap();
        assert_eq!(
            read_chain(&mem, &q, 0, 64).unwrap_err(),
            ChainError::BadIndex(200)
        );
        assert_eq!(
            read_chain(&mem, &q, 16, 64).unwrap_err(),
            ChainError::BadIndex(16)
        );
    }

    #[test]
    fn an_avail_index_too_far_ahead_is_an_error_not_a_flood() {
        let mem = setup();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut q: Queue = mock.create_queue().unwrap();
        mock.avail().idx().store(100);
        assert!(pop_head(&mut q, &mem).is_err());
    }
}
