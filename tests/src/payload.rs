//! Flat 64-bit payloads for KVM tests, assembled with iced-x86. They run at
//! CPL3 with all guest RAM identity-mapped, and end with `out 0xe0, eax`
//! (0 = success; otherwise rbx, rcx, rdx carry the details).

use iced_x86::code_asm::*;

/// The word the pattern payload stores at `addr` on vCPU `id`.
pub fn pattern(addr: u64, id: u64) -> u64 {
    addr ^ (id << 48) ^ 0x5a5a_0000_0000_0000
}

/// Writes `pattern(addr, id)` at the first and last word of every page of
/// `[rsi, rdx)`, then verifies them all. With `rcx != 0` it only verifies.
///
/// Entry registers: rdi = vCPU id, rsi = slice start, rdx = slice end,
/// rcx = verify-only flag. Failure (code 1): rbx = address, rcx = expected,
/// rdx = found.
pub fn pattern_payload(load_addr: u64) -> Vec<u8> {
    (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut write_loop = a.create_label();
        let mut verify = a.create_label();
        let mut verify_loop = a.create_label();
        let mut ok = a.create_label();
        let mut fail = a.create_label();

        // r9 = (id << 48) ^ constant: the per-vCPU tag.
        a.mov(r9, rdi)?;
        a.shl(r9, 48)?;
        a.mov(rax, 0x5a5a_0000_0000_0000u64)?;
        a.xor(r9, rax)?;
        a.test(rcx, rcx)?;
        a.jnz(verify)?;

        a.mov(r10, rsi)?;
        a.set_label(&mut write_loop)?;
        a.cmp(r10, rdx)?;
        a.jae(verify)?;
        a.mov(rax, r10)?;
        a.xor(rax, r9)?;
        a.mov(qword_ptr(r10), rax)?;
        a.mov(qword_ptr(r10 + 0xff8), rax)?;
        a.add(r10, 0x1000)?;
        a.jmp(write_loop)?;

        a.set_label(&mut verify)?;
        a.mov(r10, rsi)?;
        a.set_label(&mut verify_loop)?;
        a.cmp(r10, rdx)?;
        a.jae(ok)?;
        a.mov(rax, r10)?;
        a.xor(rax, r9)?;
        a.mov(r11, qword_ptr(r10))?;
        a.cmp(r11, rax)?;
        a.jne(fail)?;
        a.mov(r11, qword_ptr(r10 + 0xff8))?;
        a.cmp(r11, rax)?;
        a.jne(fail)?;
        a.add(r10, 0x1000)?;
        a.jmp(verify_loop)?;

        a.set_label(&mut ok)?;
        a.xor(eax, eax)?;
        a.out(0xe0, eax)?;
        a.jmp(ok)?;

        a.set_label(&mut fail)?;
        a.mov(rbx, r10)?;
        a.mov(rcx, rax)?;
        a.mov(rdx, r11)?;
        a.mov(eax, 1)?;
        a.out(0xe0, eax)?;
        a.jmp(fail)?;

        a.assemble(load_addr)
    })()
    .expect("the pattern payload assembles")
}

/// Offsets in a vCPU's mailbox (see [`snapshot_payload`]).
pub mod mailbox {
    /// Set to 1 by the guest when its pages are written.
    pub const WRITTEN: u64 = 0;
    /// The number of verify rounds done (from r12).
    pub const ROUNDS: u64 = 8;
    /// Set non-zero by the host: finish after the round in progress.
    pub const FINISH: u64 = 16;
}

/// Writes `pattern(addr, id)` at the first and last word of every page of
/// `[rsi, rdx)`, sets the mailbox at `rcx` to written, then verifies every
/// page again and again, counting rounds in r12 (a register: a restored
/// vCPU that did not get its registers back starts counting from
/// nothing), until the host sets the mailbox's finish word. Success: code
/// 0 with rbx = rounds. Failure (code 1): rbx = address, rcx = expected,
/// rdx = found.
pub fn snapshot_payload(load_addr: u64) -> Vec<u8> {
    (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut write_loop = a.create_label();
        let mut round = a.create_label();
        let mut verify_loop = a.create_label();
        let mut round_done = a.create_label();
        let mut done = a.create_label();
        let mut fail = a.create_label();

        a.mov(r9, rdi)?;
        a.shl(r9, 48)?;
        a.mov(rax, 0x5a5a_0000_0000_0000u64)?;
        a.xor(r9, rax)?;
        a.mov(r8, rcx)?; // the mailbox
        a.xor(r12, r12)?;

        a.mov(r10, rsi)?;
        a.set_label(&mut write_loop)?;
        a.cmp(r10, rdx)?;
        a.jae(round)?;
        a.mov(rax, r10)?;
        a.xor(rax, r9)?;
        a.mov(qword_ptr(r10), rax)?;
        a.mov(qword_ptr(r10 + 0xff8), rax)?;
        a.add(r10, 0x1000)?;
        a.jmp(write_loop)?;

        a.set_label(&mut round)?;
        a.mov(qword_ptr(r8 + mailbox::WRITTEN as i32), 1)?;
        a.mov(r10, rsi)?;
        a.set_label(&mut verify_loop)?;
        a.cmp(r10, rdx)?;
        a.jae(round_done)?;
        a.mov(rax, r10)?;
        a.xor(rax, r9)?;
        a.mov(r11, qword_ptr(r10))?;
        a.cmp(r11, rax)?;
        a.jne(fail)?;
        a.mov(r11, qword_ptr(r10 + 0xff8))?;
        a.cmp(r11, rax)?;
        a.jne(fail)?;
        a.add(r10, 0x1000)?;
        a.jmp(verify_loop)?;

        a.set_label(&mut round_done)?;
        a.inc(r12)?;
        a.mov(qword_ptr(r8 + mailbox::ROUNDS as i32), r12)?;
        a.mov(rax, qword_ptr(r8 + mailbox::FINISH as i32))?;
        a.test(rax, rax)?;
        a.jz(round)?;

        a.set_label(&mut done)?;
        a.mov(rbx, r12)?;
        a.xor(eax, eax)?;
        a.out(0xe0, eax)?;
        a.jmp(done)?;

        a.set_label(&mut fail)?;
        a.mov(rbx, r10)?;
        a.mov(rcx, rax)?;
        a.mov(rdx, r11)?;
        a.mov(eax, 1)?;
        a.out(0xe0, eax)?;
        a.jmp(fail)?;

        a.assemble(load_addr)
    })()
    .expect("the snapshot payload assembles")
}

/// Checks the words at 0, 0x800 and 0xff8 of every page of `[rsi, rdx)`
/// against the memory file's [`file_word`](crate::uffd_peer::file_word)
/// (`file offset = address + rcx`, wrapping). With `r8 != 0` a page
/// whose first word is zero must be zero at all three (a page given back)
/// and is counted apart.
///
/// Success (code 0): rbx = pages holding the file's words, rcx = zero
/// pages. Failure: code 1 (a wrong word) or 2 (a page zero only in part),
/// rbx = page, rcx = expected, rdx = found.
pub fn file_check_payload(load_addr: u64) -> Vec<u8> {
    (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut next_page = a.create_label();
        let mut strict = a.create_label();
        let mut next = a.create_label();
        let mut done = a.create_label();
        let mut fail = a.create_label();
        let mut fail_zero = a.create_label();

        a.mov(r9, 0xf11e_0000_0000_0000u64)?;
        a.mov(r10, rsi)?;
        a.xor(r12, r12)?;
        a.xor(r13, r13)?;
        a.set_label(&mut next_page)?;
        a.cmp(r10, rdx)?;
        a.jae(done)?;
        a.mov(r11, qword_ptr(r10))?;
        a.test(r8, r8)?;
        a.jz(strict)?;
        a.test(r11, r11)?;
        a.jnz(strict)?;
        for off in [0x800, 0xff8] {
            a.mov(r11, qword_ptr(r10 + off))?;
            a.test(r11, r11)?;
            a.jnz(fail_zero)?;
        }
        a.inc(r12)?;
        a.jmp(next)?;

        a.set_label(&mut strict)?;
        for off in [0, 0x800, 0xff8] {
            a.lea(rax, qword_ptr(r10 + off))?;
            a.add(rax, rcx)?;
            a.xor(rax, r9)?;
            a.mov(r11, qword_ptr(r10 + off))?;
            a.cmp(r11, rax)?;
            a.jne(fail)?;
        }
        a.inc(r13)?;
        a.set_label(&mut next)?;
        a.add(r10, 0x1000)?;
        a.jmp(next_page)?;

        a.set_label(&mut done)?;
        a.mov(rbx, r13)?;
        a.mov(rcx, r12)?;
        a.xor(eax, eax)?;
        a.out(0xe0, eax)?;
        a.jmp(done)?;

        a.set_label(&mut fail)?;
        a.mov(rbx, r10)?;
        a.mov(rcx, rax)?;
        a.mov(rdx, r11)?;
        a.mov(eax, 1)?;
        a.out(0xe0, eax)?;
        a.jmp(fail)?;

        a.set_label(&mut fail_zero)?;
        a.mov(rbx, r10)?;
        a.xor(ecx, ecx)?;
        a.mov(rdx, r11)?;
        a.mov(eax, 2)?;
        a.out(0xe0, eax)?;
        a.jmp(fail_zero)?;

        a.assemble(load_addr)
    })()
    .expect("the file-check payload assembles")
}
