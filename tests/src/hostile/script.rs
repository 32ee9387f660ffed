//! A CPL3 payload that carries out a script of memory and MMIO accesses,
//! so that hostile-guest cases are written in Rust while every access still
//! comes from a vCPU: register writes and reads of any width and alignment
//! exit to the VMM through KVM exactly as a driver's would.
//!
//! A script is an array of 32-byte steps in guest RAM: `op`, `addr`,
//! `value`, `slot`. Reads store what they read in `slot` (the host looks at
//! it afterwards); `Repeat` uses `slot` as its counter.

use iced_x86::code_asm::*;

/// Bytes per step.
pub const STEP: u64 = 32;

/// One step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The end: the payload reports success.
    End,
    /// Writes the low 1, 2, 4 or 8 bytes of `value` at `addr`.
    Write(u8, u64, u64),
    /// Reads 1, 2, 4 or 8 bytes at `addr` into the step's slot.
    Read(u8, u64),
    /// Adds `value` to the 16-bit word at `addr` (an avail index).
    Add16(u64, u16),
    /// Jumps back to step `to` this many more times.
    Repeat {
        /// Step index to jump to.
        to: usize,
        /// Times to jump.
        times: u64,
    },
    /// Fails the payload (code 2) unless the 32-bit word at `addr` is
    /// `value`.
    Expect32(u64, u32),
    /// Waits until the 16-bit word at `addr` is `value` (a used index the
    /// device moves); fails (code 4, rbx = address) after 2^27 polls (seconds).
    Wait16(u64, u16),
}

const OP_END: u64 = 0;
const OP_W1: u64 = 1;
const OP_W2: u64 = 2;
const OP_W4: u64 = 3;
const OP_W8: u64 = 4;
const OP_R1: u64 = 5;
const OP_R2: u64 = 6;
const OP_R4: u64 = 7;
const OP_R8: u64 = 8;
const OP_REPEAT: u64 = 9;
const OP_EXPECT32: u64 = 10;
const OP_ADD16: u64 = 11;
const OP_WAIT16: u64 = 12;

/// Encodes `ops` for a script placed at `base`.
pub fn encode(ops: &[Op], base: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(ops.len() * STEP as usize);
    for op in ops {
        let width = |w: u8, ops: [u64; 4]| match w {
            1 => ops[0],
            2 => ops[1],
            4 => ops[2],
            _ => ops[3],
        };
        let (code, addr, value, slot) = match *op {
            Op::End => (OP_END, 0, 0, 0),
            Op::Write(w, a, v) => (width(w, [OP_W1, OP_W2, OP_W4, OP_W8]), a, v, 0),
            Op::Read(w, a) => (width(w, [OP_R1, OP_R2, OP_R4, OP_R8]), a, 0, 0),
            Op::Add16(a, v) => (OP_ADD16, a, u64::from(v), 0),
            Op::Repeat { to, times } => (OP_REPEAT, base + to as u64 * STEP, 0, times),
            Op::Expect32(a, v) => (OP_EXPECT32, a, u64::from(v), 0),
            Op::Wait16(a, v) => (OP_WAIT16, a, u64::from(v), 0),
        };
        for w in [code, addr, value, slot] {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

/// The interpreter. Entry: rsi = the script's address. Ends with
/// `out 0xe0`: 0 after `End`; 2 when an `Expect32` failed (rbx = address,
/// rcx = expected, rdx = found); 3 on an unknown op (rbx = its address);
/// 4 when a `Wait16` gave up (rbx = address).
pub fn interpreter(load_addr: u64) -> Vec<u8> {
    (|| -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let mut top = a.create_label();
        let mut next = a.create_label();
        let mut store = a.create_label();
        let mut end = a.create_label();
        let mut fail = a.create_label();
        let mut unknown = a.create_label();
        let mut labels: Vec<CodeLabel> = (0..13).map(|_| a.create_label()).collect();

        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(rdi, qword_ptr(rsi + 8))?;
        a.mov(rdx, qword_ptr(rsi + 16))?;
        for (code, label) in labels.iter().enumerate() {
            a.cmp(rax, code as i32)?;
            a.je(*label)?;
        }
        a.jmp(unknown)?;

        a.set_label(&mut labels[OP_END as usize])?;
        a.jmp(end)?;
        a.set_label(&mut labels[OP_W1 as usize])?;
        a.mov(byte_ptr(rdi), dl)?;
        a.jmp(next)?;
        a.set_label(&mut labels[OP_W2 as usize])?;
        a.mov(word_ptr(rdi), dx)?;
        a.jmp(next)?;
        a.set_label(&mut labels[OP_W4 as usize])?;
        a.mov(dword_ptr(rdi), edx)?;
        a.jmp(next)?;
        a.set_label(&mut labels[OP_W8 as usize])?;
        a.mov(qword_ptr(rdi), rdx)?;
        a.jmp(next)?;
        a.set_label(&mut labels[OP_R1 as usize])?;
        a.movzx(eax, byte_ptr(rdi))?;
        a.jmp(store)?;
        a.set_label(&mut labels[OP_R2 as usize])?;
        a.movzx(eax, word_ptr(rdi))?;
        a.jmp(store)?;
        a.set_label(&mut labels[OP_R4 as usize])?;
        a.mov(eax, dword_ptr(rdi))?;
        a.jmp(store)?;
        a.set_label(&mut labels[OP_R8 as usize])?;
        a.mov(rax, qword_ptr(rdi))?;
        a.jmp(store)?;
        a.set_label(&mut labels[OP_REPEAT as usize])?;
        a.mov(rax, qword_ptr(rsi + 24))?;
        a.test(rax, rax)?;
        a.jz(next)?;
        a.dec(rax)?;
        a.mov(qword_ptr(rsi + 24), rax)?;
        a.mov(rsi, rdi)?;
        a.jmp(top)?;
        a.set_label(&mut labels[OP_EXPECT32 as usize])?;
        a.mov(eax, dword_ptr(rdi))?;
        a.cmp(eax, edx)?;
        a.jne(fail)?;
        a.jmp(next)?;
        a.set_label(&mut labels[OP_ADD16 as usize])?;
        a.add(word_ptr(rdi), dx)?;
        a.jmp(next)?;
        let mut poll = a.create_label();
        let mut timeout = a.create_label();
        a.set_label(&mut labels[OP_WAIT16 as usize])?;
        a.mov(rcx, 1u64 << 27)?;
        a.set_label(&mut poll)?;
        a.movzx(eax, word_ptr(rdi))?;
        a.cmp(eax, edx)?;
        a.je(next)?;
        a.pause()?;
        a.dec(rcx)?;
        a.jnz(poll)?;
        a.set_label(&mut timeout)?;
        a.mov(rbx, rdi)?;
        a.mov(eax, 4)?;
        a.out(0xe0, eax)?;
        a.jmp(timeout)?;

        a.set_label(&mut store)?;
        a.mov(qword_ptr(rsi + 24), rax)?;
        a.set_label(&mut next)?;
        a.add(rsi, STEP as i32)?;
        a.jmp(top)?;

        a.set_label(&mut end)?;
        a.xor(eax, eax)?;
        a.out(0xe0, eax)?;
        a.jmp(end)?;

        a.set_label(&mut fail)?;
        a.mov(rbx, rdi)?;
        a.mov(rcx, rdx)?;
        a.mov(rdx, rax)?;
        a.mov(eax, 2)?;
        a.out(0xe0, eax)?;
        a.jmp(fail)?;

        a.set_label(&mut unknown)?;
        a.mov(rbx, rsi)?;
        a.mov(eax, 3)?;
        a.out(0xe0, eax)?;
        a.jmp(unknown)?;

        a.assemble(load_addr)
    })()
    .expect("the script interpreter assembles")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_encode_with_their_slots() {
        let s = encode(
            &[
                Op::Write(4, 0x1000, 7),
                Op::Repeat { to: 0, times: 3 },
                Op::End,
            ],
            0x8000,
        );
        assert_eq!(s.len(), 3 * STEP as usize);
        let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!((word(0), word(1), word(2)), (OP_W4, 0x1000, 7));
        assert_eq!((word(4), word(5), word(7)), (OP_REPEAT, 0x8000, 3));
        assert!(!interpreter(0x10_0000).is_empty());
    }
}
