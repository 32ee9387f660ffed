//! Test-only helpers (feature `test-switches`).

use std::path::{Path, PathBuf};

/// A tmpfs mounted with `huge=advise` in a new directory, unmounted (and
/// the directory removed) on drop: files there get huge pages when a
/// mapping asks, whatever the host's `shmem_enabled` says.
#[derive(Debug)]
pub struct HugeTmpfs(PathBuf);

impl HugeTmpfs {
    /// Mounts one (`size` bytes at most) under the temporary directory;
    /// `None`, with the reason printed, where mounting is not allowed
    /// (not root).
    pub fn mount(name: &str, size: u64) -> Option<HugeTmpfs> {
        let dir = std::env::temp_dir().join(format!("huge-tmpfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let c = |s: &str| std::ffi::CString::new(s).ok();
        let (src, target, opts) = (
            c("tmpfs")?,
            c(dir.to_str()?)?,
            c(&format!("size={size},huge=advise"))?,
        );
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!(
                "skipped: mounting a tmpfs with huge=advise: {}",
                std::io::Error::last_os_error()
            );
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(HugeTmpfs(dir))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        if let Some(target) = self.0.to_str().and_then(|s| std::ffi::CString::new(s).ok()) {
            // SAFETY: a NUL-terminated path we mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
