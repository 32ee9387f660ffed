//! The synchronisation primitives the protocol is written against.
//!
//! `generation.rs` names only these, so the model check can compile that same
//! file against the model checker's atomics and locks instead.

pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
pub(crate) use std::sync::{RwLock, RwLockReadGuard};
