//! Landlock, through its three system calls rather than the `landlock` crate: the ruleset is
//! built in the child between `clone` and `execveat`, where only async-signal-safe code may run
//! (the parent, the VMM, has other threads, so the child must not allocate). See
//! `docs/jail-landlock.md`.

use std::io;
use std::os::fd::RawFd;

/// `LANDLOCK_CREATE_RULESET_VERSION`: ask for the highest ABI version instead of a ruleset.
const CREATE_RULESET_VERSION: u32 = 1 << 0;
/// `LANDLOCK_RULE_PATH_BENEATH`.
const RULE_PATH_BENEATH: libc::c_int = 1;

/// Filesystem access rights (`LANDLOCK_ACCESS_FS_*`).
pub mod fs {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    pub const REMOVE_DIR: u64 = 1 << 4;
    pub const REMOVE_FILE: u64 = 1 << 5;
    pub const MAKE_CHAR: u64 = 1 << 6;
    pub const MAKE_DIR: u64 = 1 << 7;
    pub const MAKE_REG: u64 = 1 << 8;
    pub const MAKE_SOCK: u64 = 1 << 9;
    pub const MAKE_FIFO: u64 = 1 << 10;
    pub const MAKE_BLOCK: u64 = 1 << 11;
    pub const MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub const REFER: u64 = 1 << 13;
    /// ABI 3.
    pub const TRUNCATE: u64 = 1 << 14;
    /// ABI 5.
    pub const IOCTL_DEV: u64 = 1 << 15;
    /// Rights that apply to a regular file (the rest only to directories).
    pub const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;
}

/// Network rights (`LANDLOCK_ACCESS_NET_*`, ABI 4).
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
/// IPC scopes (`LANDLOCK_SCOPE_*`, ABI 6).
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// `struct landlock_ruleset_attr` as of ABI 6; older kernels get a shorter prefix of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The highest landlock ABI the running kernel offers, or `None` when landlock is not built in
/// or not enabled in the LSM list.
pub fn abi_version() -> Option<u32> {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION the attribute pointer must be NULL and the
    // size 0; the call only returns a number.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(ret).ok().filter(|v| *v > 0)
}

/// Every filesystem right the given ABI knows: all of them are handled, so whatever no rule
/// allows is denied.
pub fn handled_fs(abi: u32) -> u64 {
    let mut rights = (fs::MAKE_SYM << 1) - 1;
    if abi >= 2 {
        rights |= fs::REFER;
    }
    if abi >= 3 {
        rights |= fs::TRUNCATE;
    }
    if abi >= 5 {
        rights |= fs::IOCTL_DEV;
    }
    rights
}

/// The ruleset a jail applies for a kernel with landlock ABI `abi`: every filesystem right,
/// TCP bind/connect (ABI 4) and abstract unix sockets and signals outside the domain (ABI 6)
/// handled, so denied unless a rule allows them.
pub(crate) fn ruleset_for(abi: u32) -> (RulesetAttr, usize) {
    let attr = RulesetAttr {
        handled_access_fs: handled_fs(abi),
        handled_access_net: if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        },
    };
    let size = match abi {
        0..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    (attr, size)
}

/// Creates a ruleset. Async-signal-safe.
pub(crate) fn create_ruleset(attr: &RulesetAttr, size: usize) -> Result<RawFd, i32> {
    // SAFETY: `attr` is a valid RulesetAttr of at least `size` bytes (`size` is one of the
    // prefixes the kernel's ABI versions define); the kernel only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        RawFd::try_from(ret).map_err(|_| libc::EBADF)
    }
}

/// Allows `access` on the file or directory tree `parent_fd` refers to. Async-signal-safe.
pub(crate) fn add_path_beneath(ruleset: RawFd, parent_fd: RawFd, access: u64) -> Result<(), i32> {
    let rule = PathBeneathAttr {
        allowed_access: access,
        parent_fd,
    };
    // SAFETY: `rule` is a valid landlock_path_beneath_attr the kernel only reads.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0u32,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Enforces `ruleset` on the calling thread (and what it executes). Needs no_new_privs.
/// Async-signal-safe.
pub(crate) fn restrict_self(ruleset: RawFd) -> Result<(), i32> {
    // SAFETY: the call takes a descriptor and flags only.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_handled_fs_abi1_thirteen_rights() {
        assert_eq!(handled_fs(1).count_ones(), 13);
        assert_eq!(handled_fs(1) & fs::REFER, 0);
    }

    #[test]
    fn test_handled_fs_abi5_all_rights() {
        let all = handled_fs(5);
        assert_eq!(all.count_ones(), 16);
        assert_ne!(all & fs::TRUNCATE, 0);
        assert_ne!(all & fs::IOCTL_DEV, 0);
        assert_eq!(handled_fs(7), all);
    }

    #[test]
    fn test_ruleset_for_size_matches_abi() {
        assert_eq!(ruleset_for(1).1, 8);
        let (attr, size) = ruleset_for(4);
        assert_eq!(size, 16);
        assert_eq!(attr.handled_access_net, NET_BIND_TCP | NET_CONNECT_TCP);
        assert_eq!(attr.scoped, 0);
        let (attr, size) = ruleset_for(6);
        assert_eq!(size, 24);
        assert_eq!(attr.scoped, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL);
    }

    #[test]
    fn test_path_beneath_attr_is_packed() {
        assert_eq!(std::mem::size_of::<PathBeneathAttr>(), 12);
    }
}
