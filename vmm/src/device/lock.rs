//! Image locks: open file description locks (F_OFD_SETLK), as QEMU takes them. A writable image
//! gets a write lock over the whole file, a read-only one a read lock, so two VMs never write
//! the same image and readers never share it with a writer; readers share with each other.
//! The lock belongs to the open file description, which the VMM and the device process both
//! hold (the device gets a copy of the descriptor), so it lasts as long as either.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Opens `path` (read-write unless `readonly`) and locks it; `Err(None)` means another
/// process holds a conflicting lock.
pub fn open_locked(path: &Path, readonly: bool) -> Result<File, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(LockError::Open)?;
    lock(&file, !readonly)?;
    Ok(file)
}

/// Errors opening and locking an image.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The image could not be opened.
    #[error("cannot open it")]
    Open(#[source] std::io::Error),
    /// Another process holds a conflicting lock.
    #[error("it is in use: another process holds a {} lock on it (another VM?)", if *.0 { "write" } else { "read" })]
    InUse(bool),
    /// The lock call failed otherwise.
    #[error("cannot lock it")]
    Lock(#[source] std::io::Error),
}

fn lock(file: &File, write: bool) -> Result<(), LockError> {
    // SAFETY: a zeroed flock is a valid value; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: F_OFD_SETLK with a local flock on our descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        // Find out who holds what.
        fl.l_type = libc::F_WRLCK as _;
        fl.l_pid = 0;
        // SAFETY: as above, F_OFD_GETLK.
        let held_write = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } == 0
            && i32::from(fl.l_type) == libc::F_WRLCK;
        return Err(LockError::InUse(held_write));
    }
    Err(LockError::Lock(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lock_writer_excludes_writer_and_reader_readers_share() {
        let path = std::env::temp_dir().join(format!("bulkhead-lock-test-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).expect("image");
        let w = open_locked(&path, false).expect("first writer");
        assert!(matches!(
            open_locked(&path, false),
            Err(LockError::InUse(true))
        ));
        assert!(matches!(
            open_locked(&path, true),
            Err(LockError::InUse(true))
        ));
        drop(w);
        let r1 = open_locked(&path, true).expect("reader");
        let r2 = open_locked(&path, true).expect("second reader");
        assert!(matches!(
            open_locked(&path, false),
            Err(LockError::InUse(false))
        ));
        drop((r1, r2));
        open_locked(&path, false).expect("writer after readers");
        let _ = std::fs::remove_file(&path);
    }
}
