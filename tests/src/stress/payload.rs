//! The stress guest: a CPL3 payload for every vCPU, with a polling
//! virtio-mmio balloon driver of its own.
//!
//! vCPU 0 sets the balloon up (reset, features: VERSION_1 and free page
//! reporting, the inflate, deflate and reporting queues, DRIVER_OK) while
//! the others wait. Then each vCPU
//! loops until the host says stop, picking with its own xorshift generator
//! (seeded by the host) one operation on a chunk near the host's hot spot:
//!
//! - write/verify: every page it owns in the chunk is checked against the
//!   stamp it last wrote (or, for a page given back, against zero) and
//!   stamped again with the next sequence number;
//! - balloon: when the guest holds fewer pages than the device's
//!   `num_pages`, its written pages in the chunk go to the inflate queue;
//!   when more, its ballooned pages come back through the deflate queue and
//!   must read zero before they are stamped;
//! - report: up to a queue's worth of its written pages in the chunk are
//!   reported free (one descriptor each, as Linux's driver does); they must
//!   read zero when next used;
//! - window: write/verify on the resizable region, below the limit the host
//!   last published (the vCPU acknowledges each limit change first).
//!
//! A bad page is counted and the first one recorded (address, expected and
//! found word) in the vCPU's counter block; the vCPU carries on. Exit codes
//! through port 0xe0: 0 done, 4 device set-up failed (rbx = step), 5 the
//! host aborted a wait for the device (rbx = queue).

use iced_x86::code_asm::*;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::layout::{ctrl, stat, state, Layout, Pool, CHUNK, CTRL, HOT_SPAN, INFLATE_Q};
use super::layout::{DEFLATE_Q, PFN_BUF, QUEUE_SIZE, REPORT_Q, STATS, STATS_SIZE};

/// virtio-mmio registers the driver uses (offsets from virtio-bindings).
mod reg {
    use virtio_bindings::virtio_mmio as m;
    pub const MAGIC: i32 = m::VIRTIO_MMIO_MAGIC_VALUE as i32;
    pub const VERSION: i32 = m::VIRTIO_MMIO_VERSION as i32;
    pub const DEVICE_ID: i32 = m::VIRTIO_MMIO_DEVICE_ID as i32;
    pub const DEVICE_FEATURES: i32 = m::VIRTIO_MMIO_DEVICE_FEATURES as i32;
    pub const DEVICE_FEATURES_SEL: i32 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as i32;
    pub const DRIVER_FEATURES: i32 = m::VIRTIO_MMIO_DRIVER_FEATURES as i32;
    pub const DRIVER_FEATURES_SEL: i32 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as i32;
    pub const QUEUE_SEL: i32 = m::VIRTIO_MMIO_QUEUE_SEL as i32;
    pub const QUEUE_NUM_MAX: i32 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as i32;
    pub const QUEUE_NUM: i32 = m::VIRTIO_MMIO_QUEUE_NUM as i32;
    pub const QUEUE_READY: i32 = m::VIRTIO_MMIO_QUEUE_READY as i32;
    pub const QUEUE_NOTIFY: i32 = m::VIRTIO_MMIO_QUEUE_NOTIFY as i32;
    pub const STATUS: i32 = m::VIRTIO_MMIO_STATUS as i32;
    pub const QUEUE_DESC_LOW: i32 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as i32;
    pub const QUEUE_DESC_HIGH: i32 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as i32;
    pub const QUEUE_DRIVER_LOW: i32 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as i32;
    pub const QUEUE_DRIVER_HIGH: i32 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as i32;
    pub const QUEUE_DEVICE_LOW: i32 = m::VIRTIO_MMIO_QUEUE_USED_LOW as i32;
    pub const QUEUE_DEVICE_HIGH: i32 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as i32;
    /// Balloon config: `num_pages`, then `actual`.
    pub const NUM_PAGES: i32 = m::VIRTIO_MMIO_CONFIG as i32;
    pub const ACTUAL: i32 = NUM_PAGES + 4;
}

/// Step numbers reported when the device set-up fails.
pub mod init_step {
    pub const MAGIC: u32 = 1;
    pub const VERSION: u32 = 2;
    pub const DEVICE_ID: u32 = 3;
    pub const NO_VERSION_1: u32 = 4;
    pub const FEATURES_OK: u32 = 5;
    pub const QUEUE_TOO_SMALL: u32 = 6;
    pub const DRIVER_OK: u32 = 7;
    pub const NO_REPORTING: u32 = 8;
}

/// VIRTIO_BALLOON_F_REPORTING.
const F_REPORTING: u32 = 5;

/// Port the payload reports through (as the other payloads).
const DONE_PORT: u32 = 0xe0;
const AVAIL: i32 = 0x1000;
const USED: i32 = 0x2000;
const LAST_WORD: i32 = 0xff8;

fn c(v: u64) -> i32 {
    i32::try_from(v).expect("layout addresses fit in a 32-bit displacement")
}

/// Assembles the payload for `layout`, to be loaded at `load_addr`.
pub fn stress_payload(layout: &Layout, load_addr: u64) -> Vec<u8> {
    build(layout, load_addr).expect("the stress payload assembles")
}

struct Labels {
    rng: CodeLabel,
    stamp: CodeLabel,
    report_lost: CodeLabel,
    report_stray: CodeLabel,
    wv_page: CodeLabel,
    wv_ram: CodeLabel,
    wv_window: CodeLabel,
    pick_ram_chunk: CodeLabel,
    lock: CodeLabel,
    unlock: CodeLabel,
    submit: CodeLabel,
    publish: CodeLabel,
    report: CodeLabel,
    abort: CodeLabel,
    inflate: CodeLabel,
    deflate: CodeLabel,
    device_init: CodeLabel,
}

fn build(layout: &Layout, load_addr: u64) -> Result<Vec<u8>, IcedError> {
    assert!(STATS_SIZE == 128 && CHUNK == 64 && QUEUE_SIZE.is_power_of_two());
    let mut a = CodeAssembler::new(64)?;
    let mut l = Labels {
        rng: a.create_label(),
        stamp: a.create_label(),
        report_lost: a.create_label(),
        report_stray: a.create_label(),
        wv_page: a.create_label(),
        wv_ram: a.create_label(),
        wv_window: a.create_label(),
        pick_ram_chunk: a.create_label(),
        lock: a.create_label(),
        unlock: a.create_label(),
        submit: a.create_label(),
        publish: a.create_label(),
        report: a.create_label(),
        abort: a.create_label(),
        inflate: a.create_label(),
        deflate: a.create_label(),
        device_init: a.create_label(),
    };
    main_loop(&mut a, &mut l, layout)?;
    helpers(&mut a, &mut l, layout)?;
    balloon_ops(&mut a, &mut l, layout)?;
    device_init(&mut a, &mut l, layout)?;
    a.assemble(load_addr)
}

/// Entry (rdi = vCPU id, rsi = seed), the device set-up hand-off and the
/// operation loop. Registers kept throughout: r15 = id, r14 = counter
/// block, r13 = generator state, r12 = control page, rbp = window limit.
fn main_loop(a: &mut CodeAssembler, l: &mut Labels, layout: &Layout) -> Result<(), IcedError> {
    let mut wait_ready = a.create_label();
    let mut init_failed = a.create_label();
    let mut init_failed_other = a.create_label();
    let mut top = a.create_label();
    let mut ram_op = a.create_label();
    let mut balloon_op = a.create_label();
    let mut window_op = a.create_label();
    let mut do_inflate = a.create_label();
    let mut do_deflate = a.create_label();
    let mut report_op = a.create_label();
    let mut done = a.create_label();

    a.mov(r15, rdi)?;
    a.mov(r13, rsi)?;
    a.mov(r14, rdi)?;
    a.shl(r14, 7)?;
    a.add(r14, c(STATS))?;
    a.mov(r12, CTRL)?;
    a.test(r15, r15)?;
    a.jnz(wait_ready)?;
    a.call(l.device_init)?;
    a.test(eax, eax)?;
    a.jnz(init_failed)?;
    a.mov(qword_ptr(r12 + c(ctrl::READY)), 1)?;
    a.jmp(top)?;

    a.set_label(&mut wait_ready)?;
    a.cmp(qword_ptr(r12 + c(ctrl::INIT_ERR)), 0)?;
    a.jne(init_failed_other)?;
    a.cmp(qword_ptr(r12 + c(ctrl::READY)), 0)?;
    a.jne(top)?;
    a.pause()?;
    a.jmp(wait_ready)?;

    a.set_label(&mut init_failed)?;
    a.mov(qword_ptr(r12 + c(ctrl::INIT_ERR)), rax)?;
    a.set_label(&mut init_failed_other)?;
    a.mov(rbx, qword_ptr(r12 + c(ctrl::INIT_ERR)))?;
    a.mov(qword_ptr(r14 + c(stat::EXITED)), 1)?;
    a.mov(eax, 4)?;
    a.out(DONE_PORT, eax)?;
    a.jmp(init_failed_other)?;

    a.set_label(&mut top)?;
    a.cmp(qword_ptr(r12 + c(ctrl::STOP)), 0)?;
    a.jne(done)?;
    a.inc(qword_ptr(r14 + c(stat::OPS)))?;
    // Epoch before limit: the host publishes the limit first, so seeing
    // the new epoch means seeing the new limit.
    a.mov(rax, qword_ptr(r12 + c(ctrl::EPOCH)))?;
    a.mov(rbp, qword_ptr(r12 + c(ctrl::LIMIT)))?;
    a.mov(qword_ptr(r14 + c(stat::ACK)), rax)?;
    a.call(l.rng)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 7)?;
    a.cmp(ecx, 2)?;
    a.jb(window_op)?;
    a.cmp(ecx, 5)?;
    a.jb(balloon_op)?;
    a.je(report_op)?;

    a.set_label(&mut ram_op)?;
    a.call(l.pick_ram_chunk)?;
    a.call(l.wv_ram)?;
    a.jmp(top)?;

    a.set_label(&mut balloon_op)?;
    a.inc(qword_ptr(r14 + c(stat::BALLOON_OPS)))?;
    a.mov(rcx, layout.balloon_mmio)?;
    a.mov(eax, dword_ptr(rcx + reg::NUM_PAGES))?;
    a.mov(rdx, qword_ptr(r12 + c(ctrl::ACTUAL)))?;
    a.cmp(rdx, rax)?;
    a.jb(do_inflate)?;
    a.ja(do_deflate)?;
    a.jmp(ram_op)?;
    a.set_label(&mut do_inflate)?;
    a.call(l.pick_ram_chunk)?;
    a.call(l.inflate)?;
    a.jmp(top)?;
    a.set_label(&mut do_deflate)?;
    a.call(l.pick_ram_chunk)?;
    a.call(l.deflate)?;
    a.jmp(top)?;

    a.set_label(&mut report_op)?;
    a.call(l.pick_ram_chunk)?;
    a.call(l.report)?;
    a.jmp(top)?;

    a.set_label(&mut window_op)?;
    if layout.window.pages == 0 {
        a.jmp(ram_op)?;
    } else {
        // A chunk wholly below the limit.
        a.mov(rcx, rbp)?;
        a.shr(rcx, 6)?;
        a.test(rcx, rcx)?;
        a.jz(ram_op)?;
        a.call(l.rng)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.mov(rax, rdx)?;
        a.inc(qword_ptr(r14 + c(stat::WINDOW_OPS)))?;
        a.call(l.wv_window)?;
        a.jmp(top)?;
    }

    a.set_label(&mut done)?;
    a.mov(qword_ptr(r14 + c(stat::EXITED)), 1)?;
    a.xor(eax, eax)?;
    a.out(DONE_PORT, eax)?;
    a.jmp(done)?;
    Ok(())
}

/// Emits a loop over the pages vCPU r15 owns in chunk rax of `pool`, with
/// r11 = page address and r9 = its state entry, running `body` for each;
/// `body` gets the label that goes to the next page. Keeps rsi; uses rbx,
/// r10 and whatever `body` uses.
fn for_own_pages(
    a: &mut CodeAssembler,
    layout: &Layout,
    pool: &Pool,
    body: impl FnOnce(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut top = a.create_label();
    let mut next = a.create_label();
    let mut end = a.create_label();
    a.mov(rbx, rax)?;
    a.shl(rbx, 6)?;
    a.lea(r10, rbx + c(CHUNK))?;
    a.mov(rcx, pool.pages)?;
    a.cmp(r10, rcx)?;
    a.cmova(r10, rcx)?;
    a.add(rbx, r15)?;
    a.set_label(&mut top)?;
    a.cmp(rbx, r10)?;
    a.jae(end)?;
    a.mov(r11, rbx)?;
    a.shl(r11, 12)?;
    a.mov(rcx, pool.base)?;
    a.add(r11, rcx)?;
    a.lea(r9, rbx * 4 + c(pool.state))?;
    body(a, next)?;
    a.set_label(&mut next)?;
    a.add(rbx, i32::from(layout.vcpus))?;
    a.jmp(top)?;
    a.set_label(&mut end)?;
    Ok(())
}

/// The generator, stamps, reports, write/verify and chunk choice.
fn helpers(a: &mut CodeAssembler, l: &mut Labels, layout: &Layout) -> Result<(), IcedError> {
    // rng: rax = next xorshift64* output; keeps everything else.
    a.set_label(&mut l.rng)?;
    for (shift, left) in [(12, false), (25, true), (27, false)] {
        a.mov(rax, r13)?;
        if left {
            a.shl(rax, shift)?;
        } else {
            a.shr(rax, shift)?;
        }
        a.xor(r13, rax)?;
    }
    a.mov(rax, 0x2545_f491_4f6c_dd1du64)?;
    a.imul_2(rax, r13)?;
    a.shr(rax, 16)?;
    a.ret()?;

    // stamp: rdx = stamp(r11, r15, r8d); uses rcx.
    a.set_label(&mut l.stamp)?;
    a.mov(rdx, r11)?;
    a.shr(rdx, 12)?;
    a.mov(rcx, r15)?;
    a.shl(rcx, 32)?;
    a.or(rdx, rcx)?;
    a.mov(ecx, r8d)?;
    a.shl(rcx, 40)?;
    a.or(rdx, rcx)?;
    a.ret()?;

    // report_*: count; keep the first (r11 = page, rdx = expected, rcx = found).
    for (label, counter) in [
        (&mut l.report_lost, stat::LOST),
        (&mut l.report_stray, stat::STRAY),
    ] {
        let mut kept = a.create_label();
        a.set_label(label)?;
        a.inc(qword_ptr(r14 + c(counter)))?;
        a.cmp(qword_ptr(r14 + c(stat::BAD_ADDR)), 0)?;
        a.jne(kept)?;
        a.mov(qword_ptr(r14 + c(stat::BAD_ADDR)), r11)?;
        a.mov(qword_ptr(r14 + c(stat::BAD_EXPECTED)), rdx)?;
        a.mov(qword_ptr(r14 + c(stat::BAD_FOUND)), rcx)?;
        a.set_label(&mut kept)?;
        a.ret()?;
    }

    // wv_page: check page r11 against its state at r9, stamp it again.
    // Uses rax, rcx, rdx, r8.
    {
        let mut zero = a.create_label();
        let mut stray = a.create_label();
        let mut fresh = a.create_label();
        let mut lost = a.create_label();
        let mut bump = a.create_label();
        let mut write = a.create_label();
        let mut skip = a.create_label();
        a.set_label(&mut l.wv_page)?;
        a.mov(eax, dword_ptr(r9))?;
        a.cmp(eax, state::TAKING)?;
        a.jae(skip)?;
        a.cmp(eax, state::ZERO)?;
        a.je(zero)?;
        a.test(eax, eax)?;
        a.jz(fresh)?;
        a.mov(r8d, eax)?;
        a.call(l.stamp)?;
        a.mov(rcx, qword_ptr(r11))?;
        a.cmp(rcx, rdx)?;
        a.jne(lost)?;
        a.mov(rcx, qword_ptr(r11 + LAST_WORD))?;
        a.cmp(rcx, rdx)?;
        a.jne(lost)?;
        a.inc(qword_ptr(r14 + c(stat::VERIFIED)))?;
        a.jmp(bump)?;
        a.set_label(&mut lost)?;
        a.call(l.report_lost)?;
        a.set_label(&mut bump)?;
        a.lea(eax, r8 + 1)?;
        a.cmp(eax, state::SEQ_MAX)?;
        a.jbe(write)?;
        a.jmp(fresh)?;

        a.set_label(&mut zero)?;
        a.xor(edx, edx)?;
        a.mov(rcx, qword_ptr(r11))?;
        a.test(rcx, rcx)?;
        a.jnz(stray)?;
        a.mov(rcx, qword_ptr(r11 + LAST_WORD))?;
        a.test(rcx, rcx)?;
        a.jz(fresh)?;
        a.set_label(&mut stray)?;
        a.call(l.report_stray)?;

        a.set_label(&mut fresh)?;
        a.mov(eax, 1)?;
        a.set_label(&mut write)?;
        a.mov(r8d, eax)?;
        a.call(l.stamp)?;
        a.mov(qword_ptr(r11), rdx)?;
        a.mov(qword_ptr(r11 + LAST_WORD), rdx)?;
        a.mov(dword_ptr(r9), r8d)?;
        a.inc(qword_ptr(r14 + c(stat::WRITES)))?;
        a.set_label(&mut skip)?;
        a.ret()?;
    }

    // wv_ram / wv_window: write/verify the own pages of chunk rax.
    for (label, pool) in [
        (&mut l.wv_ram, layout.ram),
        (&mut l.wv_window, layout.window),
    ] {
        a.set_label(label)?;
        let wv_page = l.wv_page;
        for_own_pages(a, layout, &pool, |a, _| a.call(wv_page))?;
        a.ret()?;
    }

    // pick_ram_chunk: rax = (HOT + rng % HOT_SPAN) % chunks. Uses rcx, rdx.
    a.set_label(&mut l.pick_ram_chunk)?;
    a.call(l.rng)?;
    a.xor(edx, edx)?;
    a.mov(ecx, HOT_SPAN as u32)?;
    a.div(rcx)?;
    a.add(rdx, qword_ptr(r12 + c(ctrl::HOT)))?;
    a.mov(rax, rdx)?;
    a.xor(edx, edx)?;
    a.mov(rcx, layout.ram.pages / CHUNK)?;
    a.div(rcx)?;
    a.mov(rax, rdx)?;
    a.ret()?;
    Ok(())
}

/// The queue lock, one request on a queue, and inflate/deflate of a chunk.
fn balloon_ops(a: &mut CodeAssembler, l: &mut Labels, layout: &Layout) -> Result<(), IcedError> {
    assert_eq!(DEFLATE_Q, INFLATE_Q + 0x1_0000);
    assert_eq!(REPORT_Q, INFLATE_Q + 0x2_0000);
    // lock: spin on the control page's lock word. Uses rax.
    {
        let mut got = a.create_label();
        a.set_label(&mut l.lock)?;
        a.mov(eax, 1)?;
        a.xchg(qword_ptr(r12 + c(ctrl::LOCK)), rax)?;
        a.test(rax, rax)?;
        a.jz(got)?;
        a.cmp(qword_ptr(r12 + c(ctrl::STOP)), 2)?;
        a.je(l.abort)?;
        a.pause()?;
        a.jmp(l.lock)?;
        a.set_label(&mut got)?;
        a.ret()?;
        a.set_label(&mut l.unlock)?;
        a.mov(qword_ptr(r12 + c(ctrl::LOCK)), 0)?;
        a.ret()?;
    }

    // submit: rdi = queue (0 inflate, 1 deflate), rsi = PFNs in the buffer:
    // one descriptor for the buffer, then publish. publish: rdi = queue,
    // r8 = its descriptor table; makes descriptor 0 available, notifies and
    // waits for the device. Both use rax, rcx, rdx, r8.
    {
        let mut poll = a.create_label();
        let mut answered = a.create_label();
        a.set_label(&mut l.submit)?;
        a.mov(r8, rdi)?;
        a.shl(r8, 16)?;
        a.add(r8, c(INFLATE_Q))?;
        a.mov(rax, r15)?;
        a.shl(rax, 8)?;
        a.add(rax, c(PFN_BUF))?;
        a.mov(qword_ptr(r8), rax)?;
        a.mov(eax, esi)?;
        a.shl(eax, 2)?;
        a.mov(dword_ptr(r8 + 8), eax)?;
        a.mov(dword_ptr(r8 + 12), 0)?;
        a.set_label(&mut l.publish)?;
        a.mov(rdx, qword_ptr(r12 + rdi * 8 + c(ctrl::SUBMITTED[0])))?;
        a.mov(rax, rdx)?;
        a.and(eax, i32::from(QUEUE_SIZE - 1))?;
        a.mov(word_ptr(r8 + rax * 2 + (AVAIL + 4)), 0)?;
        a.lea(rax, rdx + 1)?;
        a.mov(word_ptr(r8 + (AVAIL + 2)), ax)?;
        a.mov(qword_ptr(r12 + rdi * 8 + c(ctrl::SUBMITTED[0])), rax)?;
        a.mov(rcx, layout.balloon_mmio)?;
        a.mov(dword_ptr(rcx + reg::QUEUE_NOTIFY), edi)?;
        a.set_label(&mut poll)?;
        a.movzx(edx, word_ptr(r8 + (USED + 2)))?;
        a.cmp(dx, ax)?;
        a.je(answered)?;
        a.cmp(qword_ptr(r12 + c(ctrl::STOP)), 2)?;
        a.je(l.abort)?;
        a.pause()?;
        a.jmp(poll)?;
        a.set_label(&mut answered)?;
        a.ret()?;

        a.set_label(&mut l.abort)?;
        a.mov(rbx, rdi)?;
        a.mov(qword_ptr(r14 + c(stat::EXITED)), 1)?;
        a.mov(eax, 5)?;
        a.out(DONE_PORT, eax)?;
        a.jmp(l.abort)?;
    }

    // Publishes the guest's balloon size to the device (`actual`), under the lock.
    let publish_actual = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rax, qword_ptr(r12 + c(ctrl::ACTUAL)))?;
        a.mov(rcx, layout.balloon_mmio)?;
        a.mov(dword_ptr(rcx + reg::ACTUAL), eax)
    };
    // Appends page r11's frame number to this vCPU's PFN buffer (rsi entries).
    let collect = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rax, r11)?;
        a.shr(rax, 12)?;
        a.mov(rcx, r15)?;
        a.shl(rcx, 8)?;
        a.mov(dword_ptr(rcx + rsi * 4 + c(PFN_BUF)), eax)?;
        a.inc(esi)
    };

    // inflate: chunk rax; every own page not in the balloon goes in.
    {
        let mut none = a.create_label();
        a.set_label(&mut l.inflate)?;
        a.push(rax)?;
        a.xor(esi, esi)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::TAKING)?;
            a.jae(next)?;
            collect(a)
        })?;
        a.pop(rax)?;
        a.test(esi, esi)?;
        a.jz(none)?;
        a.push(rax)?;
        a.call(l.lock)?;
        a.xor(edi, edi)?;
        a.call(l.submit)?;
        a.add(qword_ptr(r12 + c(ctrl::ACTUAL)), rsi)?;
        publish_actual(a)?;
        a.call(l.unlock)?;
        a.add(qword_ptr(r14 + c(stat::INFLATED)), rsi)?;
        a.pop(rax)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::TAKING)?;
            a.jae(next)?;
            a.mov(dword_ptr(r9), state::BALLOONED)
        })?;
        a.ret()?;
        a.set_label(&mut none)?;
        a.ret()?;
    }

    // deflate: chunk rax; own ballooned pages come back, read zero, and
    // are stamped (write/verify over the chunk).
    {
        let mut none = a.create_label();
        a.set_label(&mut l.deflate)?;
        a.push(rax)?;
        a.xor(esi, esi)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::BALLOONED)?;
            a.jne(next)?;
            collect(a)?;
            a.mov(dword_ptr(r9), state::TAKING)
        })?;
        a.pop(rax)?;
        a.test(esi, esi)?;
        a.jz(none)?;
        a.push(rax)?;
        a.call(l.lock)?;
        a.mov(edi, 1)?;
        a.call(l.submit)?;
        a.sub(qword_ptr(r12 + c(ctrl::ACTUAL)), rsi)?;
        publish_actual(a)?;
        a.call(l.unlock)?;
        a.add(qword_ptr(r14 + c(stat::DEFLATED)), rsi)?;
        a.pop(rax)?;
        a.push(rax)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::TAKING)?;
            a.jne(next)?;
            a.mov(dword_ptr(r9), state::ZERO)
        })?;
        a.pop(rax)?;
        a.jmp(l.wv_ram)?;
        a.set_label(&mut none)?;
        a.ret()?;
    }

    // report: chunk rax; up to QUEUE_SIZE own pages that are not given
    // back already go to the reporting queue, one device-writable
    // descriptor per page, and are then owed zero.
    {
        let mut none = a.create_label();
        let mut build = a.create_label();
        let mut built = a.create_label();
        let mut last = a.create_label();
        let mut flagged = a.create_label();
        a.set_label(&mut l.report)?;
        a.push(rax)?;
        a.xor(esi, esi)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::ZERO)?;
            a.jae(next)?;
            a.cmp(esi, u32::from(QUEUE_SIZE))?;
            a.jae(next)?;
            collect(a)?;
            a.mov(dword_ptr(r9), state::TAKING)
        })?;
        a.pop(rax)?;
        a.test(esi, esi)?;
        a.jz(none)?;
        a.push(rax)?;
        a.call(l.lock)?;
        // Descriptor k: the page, 4 KiB, WRITE, chained to k + 1.
        a.mov(r8, REPORT_Q)?;
        a.mov(rcx, r15)?;
        a.shl(rcx, 8)?;
        a.add(rcx, c(PFN_BUF))?;
        a.xor(edx, edx)?;
        a.set_label(&mut build)?;
        a.cmp(edx, esi)?;
        a.jae(built)?;
        a.mov(eax, dword_ptr(rcx + rdx * 4))?;
        a.shl(rax, 12)?;
        a.mov(rdi, rdx)?;
        a.shl(rdi, 4)?;
        a.mov(qword_ptr(r8 + rdi), rax)?;
        a.mov(dword_ptr(r8 + rdi + 8), 4096)?;
        a.lea(eax, rdx + 1)?;
        a.mov(word_ptr(r8 + rdi + 14), ax)?;
        a.cmp(eax, esi)?;
        a.je(last)?;
        a.mov(
            word_ptr(r8 + rdi + 12),
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        )?;
        a.jmp(flagged)?;
        a.set_label(&mut last)?;
        a.mov(word_ptr(r8 + rdi + 12), VRING_DESC_F_WRITE)?;
        a.set_label(&mut flagged)?;
        a.inc(edx)?;
        a.jmp(build)?;
        a.set_label(&mut built)?;
        a.mov(edi, 2)?;
        a.call(l.publish)?;
        a.call(l.unlock)?;
        a.add(qword_ptr(r14 + c(stat::REPORTED)), rsi)?;
        a.pop(rax)?;
        for_own_pages(a, layout, &layout.ram, |a, next| {
            a.cmp(dword_ptr(r9), state::TAKING)?;
            a.jne(next)?;
            a.mov(dword_ptr(r9), state::ZERO)
        })?;
        a.ret()?;
        a.set_label(&mut none)?;
        a.ret()?;
    }
    Ok(())
}

/// vCPU 0's device set-up: eax = 0, or the failed step.
fn device_init(a: &mut CodeAssembler, l: &mut Labels, layout: &Layout) -> Result<(), IcedError> {
    let mut fail = a.create_label();
    a.set_label(&mut l.device_init)?;
    a.mov(rcx, layout.balloon_mmio)?;
    let expect = |a: &mut CodeAssembler, off: i32, want: u32, step: u32| {
        a.mov(eax, step)?;
        a.mov(edx, dword_ptr(rcx + off))?;
        a.cmp(edx, want)?;
        a.jne(fail)
    };
    let write = |a: &mut CodeAssembler, off: i32, v: u32| a.mov(dword_ptr(rcx + off), v);
    expect(
        a,
        reg::MAGIC,
        u32::from_le_bytes(*b"virt"),
        init_step::MAGIC,
    )?;
    expect(a, reg::VERSION, 2, init_step::VERSION)?;
    expect(a, reg::DEVICE_ID, VIRTIO_ID_BALLOON, init_step::DEVICE_ID)?;
    write(a, reg::STATUS, 0)?;
    write(a, reg::STATUS, ACKNOWLEDGE)?;
    write(a, reg::STATUS, ACKNOWLEDGE | DRIVER)?;
    write(a, reg::DEVICE_FEATURES_SEL, 1)?;
    a.mov(eax, init_step::NO_VERSION_1)?;
    a.mov(edx, dword_ptr(rcx + reg::DEVICE_FEATURES))?;
    a.test(edx, 1 << (VIRTIO_F_VERSION_1 - 32))?;
    a.jz(fail)?;
    // VERSION_1 and free page reporting; no stats, no deflate-on-OOM.
    a.mov(eax, init_step::NO_REPORTING)?;
    write(a, reg::DEVICE_FEATURES_SEL, 0)?;
    a.mov(edx, dword_ptr(rcx + reg::DEVICE_FEATURES))?;
    a.test(edx, 1 << F_REPORTING)?;
    a.jz(fail)?;
    write(a, reg::DRIVER_FEATURES_SEL, 0)?;
    write(a, reg::DRIVER_FEATURES, 1 << F_REPORTING)?;
    write(a, reg::DRIVER_FEATURES_SEL, 1)?;
    write(a, reg::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32))?;
    write(a, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)?;
    a.mov(eax, init_step::FEATURES_OK)?;
    a.mov(edx, dword_ptr(rcx + reg::STATUS))?;
    a.test(edx, FEATURES_OK)?;
    a.jz(fail)?;
    for (q, base) in [(0u32, INFLATE_Q), (1, DEFLATE_Q), (2, REPORT_Q)] {
        write(a, reg::QUEUE_SEL, q)?;
        a.mov(eax, init_step::QUEUE_TOO_SMALL)?;
        a.mov(edx, dword_ptr(rcx + reg::QUEUE_NUM_MAX))?;
        a.cmp(edx, u32::from(QUEUE_SIZE))?;
        a.jb(fail)?;
        write(a, reg::QUEUE_NUM, u32::from(QUEUE_SIZE))?;
        write(a, reg::QUEUE_DESC_LOW, base as u32)?;
        write(a, reg::QUEUE_DESC_HIGH, 0)?;
        write(a, reg::QUEUE_DRIVER_LOW, (base + AVAIL as u64) as u32)?;
        write(a, reg::QUEUE_DRIVER_HIGH, 0)?;
        write(a, reg::QUEUE_DEVICE_LOW, (base + USED as u64) as u32)?;
        write(a, reg::QUEUE_DEVICE_HIGH, 0)?;
        // Polling driver: no interrupts wanted.
        a.mov(eax, (base + AVAIL as u64) as u32)?;
        a.mov(word_ptr(rax), VRING_AVAIL_F_NO_INTERRUPT)?;
        write(a, reg::QUEUE_READY, 1)?;
    }
    let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    write(a, reg::STATUS, all)?;
    expect(a, reg::STATUS, all, init_step::DRIVER_OK)?;
    a.xor(eax, eax)?;
    a.set_label(&mut fail)?;
    a.ret()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::layout::LOAD;

    #[test]
    fn every_layout_assembles_below_the_control_page() {
        for vcpus in [1u8, 2, 3, 7, 64] {
            for window in [0, 16 << 20] {
                let layout = Layout::new(vcpus, 64 << 20, 4 << 30, window, 0xd000_0000).unwrap();
                let code = stress_payload(&layout, LOAD);
                assert!(LOAD + code.len() as u64 <= CTRL, "{} bytes", code.len());
            }
        }
    }
}
