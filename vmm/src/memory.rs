//! Guest RAM: a shared file (device processes map it too) that gets huge pages on a host
//! nobody has tuned, mapped 2 MiB aligned so that the host and KVM's stage 2 can use block
//! mappings.
//!
//! Mechanisms, in the order `thp=on` (the default) tries them (docs/memory.md):
//! 1. **tmpfs**: a short-lived child process makes a mount namespace of its own (and a user
//!    namespace when the VMM is unprivileged), mounts a detached tmpfs with
//!    `huge=within_size` and `size=` the RAM size (`fsopen`/`fsmount`: no mount point, nothing
//!    visible anywhere), creates and unlinks one file there and passes its descriptor back.
//!    The open file keeps the tmpfs alive; the VMM's own namespaces are untouched. Works
//!    whatever `/sys/kernel/mm/transparent_hugepage/shmem_enabled` says, except `deny`.
//!    A tmpfs file cannot be sealed: no device filter allows `ftruncate`, `fallocate` cannot
//!    shrink a file, and the mount's `size=` bounds what it can ever hold (docs/memory.md).
//! 2. **madvise**: a sealed memfd with `MADV_HUGEPAGE`, when `shmem_enabled` is `advise` (or a
//!    memfd simply, when it is `always` or `within_size`).
//! 3. **collapse**: a sealed memfd whose whole range is collapsed into huge pages with
//!    `MADV_COLLAPSE` (Linux 6.1+, independent of the sysfs setting, but it allocates all of
//!    guest RAM up front).
//! 4. small pages: a sealed memfd.
//!
//! `hugepages=on` takes a sealed `MFD_HUGETLB` memfd from the host's reserved pool instead;
//! `thp=off` a sealed memfd with no advice.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use log::{debug, info};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// PMD-sized transparent huge pages on a 4 KiB-page host; also the alignment of the mapping.
const THP_ALIGN: u64 = 2 << 20;
/// `MADV_COLLAPSE` (Linux 6.1), not in every libc.
const MADV_COLLAPSE: i32 = 25;
/// `MFD_HUGE_SHIFT`: log2 of the huge page size goes in the memfd flags from this bit.
const MFD_HUGE_SHIFT: u32 = 26;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
/// The name guest RAM has in /proc/PID/maps and smaps (memfd or unlinked tmpfs file).
pub const RAM_NAME: &str = "bulkhead-guest-ram";
const THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";
const HUGETLB_SYSFS: &str = "/sys/kernel/mm/hugepages";

/// What `--memory` asks for the backing of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBacking {
    /// Transparent huge pages by the first mechanism that works (`thp=on`, the default).
    Thp,
    /// One mechanism only, failing when it does not work (`thp=tmpfs|madvise|collapse`).
    Only(Mechanism),
    /// Small pages (`thp=off`).
    Off,
    /// `hugepages=on`: the host's hugetlbfs pool, pages of this many bytes.
    HugeTlb(u64),
}

/// How guest RAM got (or did not get) huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// A private tmpfs mounted with `huge=within_size`.
    Tmpfs,
    /// A memfd with `MADV_HUGEPAGE`.
    Madvise,
    /// A memfd collapsed with `MADV_COLLAPSE`.
    Collapse,
    /// A hugetlbfs memfd.
    HugeTlb,
    /// A memfd with small pages (unless the host's `shmem_enabled` gives huge ones anyway).
    Small,
}

impl Mechanism {
    /// The `thp=` value that selects it alone.
    pub fn from_option(s: &str) -> Option<Self> {
        match s {
            "tmpfs" => Some(Self::Tmpfs),
            "madvise" => Some(Self::Madvise),
            "collapse" => Some(Self::Collapse),
            _ => None,
        }
    }
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memfd could not be created, sized or sealed.
    #[error("creating the guest RAM memfd")]
    Memfd(#[source] io::Error),
    /// The hugetlbfs pool is too small.
    #[error("the host's pool of {page_kib} KiB huge pages has {free} free, the VM needs {needed}: raise /sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages, or drop hugepages=on")]
    PoolShort {
        /// Huge page size in KiB.
        page_kib: u64,
        /// Free (unreserved) pages.
        free: u64,
        /// Pages the VM needs.
        needed: u64,
    },
    /// A hugetlbfs memfd could not be created or mapped.
    #[error("creating guest RAM from the {0} KiB huge page pool")]
    HugeTlb(u64, #[source] io::Error),
    /// The one mechanism asked for with `thp=` did not work.
    #[error("thp={0}: {1}")]
    Unavailable(&'static str, String),
    /// Guest RAM could not be mapped.
    #[error("mapping guest RAM")]
    Map(#[source] io::Error),
    /// The mapping could not be made into guest memory.
    #[error("describing guest RAM to vm-memory")]
    Region(String),
}

/// Guest RAM, mapped, and how it got its pages.
pub struct GuestRam {
    /// The mapping, with the file (for device processes) in its region.
    pub memory: GuestMemoryMmap,
    /// What backs it.
    pub mechanism: Mechanism,
}

/// The first line of a sysfs file, or "".
fn sysfs(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The selected word of a sysfs THP setting (`always [madvise] never` -> `madvise`), or "".
fn thp_setting(name: &str) -> String {
    let s = sysfs(&format!("{THP_SYSFS}/{name}"));
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or(&s)
        .to_string()
}

/// The huge page sizes (bytes) this host's hugetlbfs offers, smallest first.
pub fn hugetlb_sizes() -> Vec<u64> {
    let mut sizes: Vec<u64> = std::fs::read_dir(HUGETLB_SYSFS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kib: u64 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            kib.checked_mul(1024)
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

/// The host's default huge page size (`Hugepagesize` in /proc/meminfo), if it has one.
pub fn default_hugetlb_size() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn memfd(flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"bulkhead-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Seals a memfd against resizing, so that processes it is shared with cannot be made to
/// fault by a shrink.
fn seal(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A sealed memfd of `size` bytes with small (or, as the host decides, transparent) pages.
fn sealed_memfd(size: u64) -> io::Result<File> {
    let file = memfd(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)?;
    file.set_len(size)?;
    seal(&file)?;
    Ok(file)
}

/// A sealed hugetlbfs memfd of `size` bytes in pages of `page` bytes, after checking the pool.
fn hugetlb_memfd(size: u64, page: u64) -> Result<File, MemoryError> {
    let page_kib = page >> 10;
    let dir = format!("{HUGETLB_SYSFS}/hugepages-{page_kib}kB");
    let count = |f: &str| sysfs(&format!("{dir}/{f}")).parse::<u64>().unwrap_or(0);
    let free = count("free_hugepages").saturating_sub(count("resv_hugepages"));
    let needed = size / page;
    if free < needed {
        return Err(MemoryError::PoolShort {
            page_kib,
            free,
            needed,
        });
    }
    let flags = libc::MFD_CLOEXEC
        | libc::MFD_ALLOW_SEALING
        | libc::MFD_HUGETLB
        | (page.trailing_zeros() << MFD_HUGE_SHIFT);
    let file = memfd(flags).map_err(|e| MemoryError::HugeTlb(page_kib, e))?;
    file.set_len(size)
        .and_then(|()| seal(&file))
        .map_err(|e| MemoryError::HugeTlb(page_kib, e))?;
    Ok(file)
}

/// What the tmpfs child needs, prepared before fork so the child allocates nothing.
struct TmpfsPlan {
    privileged: bool,
    uid_map: String,
    gid_map: String,
    size: std::ffi::CString,
}

/// Steps of the tmpfs child, reported with errno when one fails.
const TMPFS_STEPS: [&str; 8] = [
    "unshare",
    "uid/gid map",
    "fsopen tmpfs",
    "fsconfig huge=within_size",
    "fsconfig size",
    "fsconfig create",
    "fsmount",
    "create the file",
];

fn write_all_raw(path: &std::ffi::CStr, data: &[u8]) -> bool {
    // SAFETY: a valid path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `data` is valid for its length.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    n == data.len() as isize
}

/// The tmpfs child's work; returns the file descriptor or (step, errno). Only system calls:
/// it runs in a forked copy of the VMM.
fn tmpfs_child(plan: &TmpfsPlan) -> Result<RawFd, (u8, i32)> {
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let fail = |step: u8| Err((step, errno()));
    let flags = if plan.privileged {
        libc::CLONE_NEWNS
    } else {
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS
    };
    // SAFETY: unshare takes no pointers; the result is checked.
    if unsafe { libc::unshare(flags) } != 0 {
        return fail(0);
    }
    let mapped = plan.privileged
        || (write_all_raw(c"/proc/self/setgroups", b"deny")
            && write_all_raw(c"/proc/self/uid_map", plan.uid_map.as_bytes())
            && write_all_raw(c"/proc/self/gid_map", plan.gid_map.as_bytes()));
    if !mapped {
        return fail(1);
    }
    // SAFETY: a NUL-terminated file system name; the result is checked.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return fail(2);
    }
    let fs = fs as libc::c_int;
    // SAFETY: NUL-terminated key and value on the fs context made above.
    let set = |key: &std::ffi::CStr, value: &std::ffi::CStr| unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    if set(c"huge", c"within_size") != 0 {
        return fail(3);
    }
    if set(c"size", &plan.size) != 0 {
        return fail(4);
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no pointers.
    let created = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
            0,
        )
    };
    if created != 0 {
        return fail(5);
    }
    // SAFETY: fsmount on the fs context made above; the result is checked.
    let mnt = unsafe { libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, 0) };
    if mnt < 0 {
        return fail(6);
    }
    let mnt = mnt as libc::c_int;
    // SAFETY: a NUL-terminated name relative to the mount made above.
    let fd = unsafe {
        libc::openat(
            mnt,
            c"bulkhead-guest-ram".as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return fail(7);
    }
    // SAFETY: as for openat.
    if unsafe { libc::unlinkat(mnt, c"bulkhead-guest-ram".as_ptr(), 0) } != 0 {
        return fail(7);
    }
    Ok(fd)
}

/// Sends `fd` (or, failing, the step and errno) over `sock`.
fn tmpfs_child_reply(sock: RawFd, result: Result<RawFd, (u8, i32)>) {
    let (mut data, fd) = match result {
        Ok(fd) => ([0u8; 5], Some(fd)),
        Err((step, errno)) => {
            let mut d = [0u8; 5];
            d[0] = step + 1;
            d[1..].copy_from_slice(&errno.to_ne_bytes());
            (d, None)
        }
    };
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one descriptor, 8-byte aligned.
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
        // SAFETY: the control buffer is large enough for one cmsg with one descriptor.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at live buffers.
    unsafe { libc::sendmsg(sock, &msg, 0) };
}

/// Receives the tmpfs child's reply.
fn tmpfs_receive(sock: RawFd) -> Result<File, String> {
    let mut data = [0u8; 5];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
    // SAFETY: `msg` points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != data.len() as isize {
        return Err(format!(
            "no answer from the helper process ({})",
            io::Error::last_os_error()
        ));
    }
    if data[0] != 0 {
        let step = TMPFS_STEPS
            .get(usize::from(data[0] - 1))
            .copied()
            .unwrap_or("?");
        let errno = i32::from_ne_bytes([data[1], data[2], data[3], data[4]]);
        return Err(format!(
            "{step} failed: {}",
            io::Error::from_raw_os_error(errno)
        ));
    }
    // SAFETY: the kernel filled the control buffer; CMSG_* walk it within msg_controllen.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err("the helper process sent no descriptor".into());
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(File::from_raw_fd(fd))
    }
}

/// A file of `size` bytes on a private tmpfs mounted with `huge=within_size`, made by a
/// forked child in namespaces of its own.
fn tmpfs_huge_file(size: u64) -> Result<File, String> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // Rounded up to whole huge pages; the mount's size stops a device from growing the file.
    let mount_size = size.next_multiple_of(THP_ALIGN);
    let plan = TmpfsPlan {
        privileged: uid == 0,
        uid_map: format!("{uid} {uid} 1"),
        gid_map: format!("{gid} {gid} 1"),
        size: std::ffi::CString::new(mount_size.to_string()).expect("digits have no NUL"),
    };
    let mut socks = [0; 2];
    // SAFETY: `socks` has room for two descriptors; the result is checked.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            socks.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just made and are owned here.
    let (ours, theirs) = unsafe {
        (
            OwnedFd::from_raw_fd(socks[0]),
            OwnedFd::from_raw_fd(socks[1]),
        )
    };
    // SAFETY: the child only makes system calls (tmpfs_child, tmpfs_child_reply) and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let result = tmpfs_child(&plan);
        tmpfs_child_reply(theirs.as_raw_fd(), result);
        // SAFETY: ends the child without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(theirs);
    let file = tmpfs_receive(ours.as_raw_fd());
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let file = file?;
    file.set_len(size)
        .map_err(|e| format!("sizing the file: {e}"))?;
    Ok(file)
}

/// Maps `file` shared at a 2 MiB aligned address (so that file offset and address agree
/// modulo a PMD, which both the host's huge mappings and KVM's block mappings need), or at
/// the alignment of `align` when larger. The mapping lives as long as the process.
fn map_aligned(file: File, size: u64, align: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let align = align.max(THP_ALIGN) as usize;
    let size = size as usize;
    let len = size + align;
    // SAFETY: a fresh reservation; nothing else is mapped there.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MemoryError::Map(io::Error::last_os_error()));
    }
    let start = (base as usize).next_multiple_of(align);
    // SAFETY: [start, start+size) lies within the reservation made above; MAP_FIXED replaces it.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: the reservation is ours.
        unsafe { libc::munmap(base, len) };
        return Err(MemoryError::Map(e));
    }
    // Return the slack on both sides.
    let head = start - base as usize;
    let tail = len - head - size;
    // SAFETY: both ranges are parts of our reservation outside the file mapping.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: [addr, addr+size) is the live shared mapping made above, never unmapped.
    let region = unsafe {
        MmapRegionBuilder::new(size)
            .with_raw_mmap_pointer(addr.cast())
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
    }
    .map_err(|e| MemoryError::Region(e.to_string()))?;
    let region =
        GuestRegionMmap::new(region, GuestAddress(bulkhead_firmware::layout::RAM_START))
            .ok_or_else(|| MemoryError::Region("guest RAM overflows the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Region(e.to_string()))
}

fn madvise(memory: &GuestMemoryMmap, size: u64, advice: i32) -> io::Result<()> {
    use vm_memory::GuestMemoryBackend;
    let addr = memory
        .get_host_address(GuestAddress(bulkhead_firmware::layout::RAM_START))
        .map_err(|_| io::Error::from(io::ErrorKind::NotFound))?;
    // SAFETY: advice on our own guest RAM mapping, which is `size` bytes long.
    if unsafe { libc::madvise(addr.cast(), size as usize, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates and maps `size` bytes of guest RAM as `backing` asks, and logs which mechanism it
/// got and why.
pub fn create(size: u64, backing: RamBacking) -> Result<GuestRam, MemoryError> {
    let mib = size >> 20;
    let shmem = thp_setting("shmem_enabled");
    let done = |memory, mechanism, why: String| {
        info!("guest RAM: {mib} MiB, {why}");
        Ok(GuestRam { memory, mechanism })
    };
    let only = |m: Mechanism| backing == RamBacking::Only(m);
    match backing {
        RamBacking::HugeTlb(page) => {
            let file = hugetlb_memfd(size, page)?;
            let memory = map_aligned(file, size, page)
                .map_err(|e| MemoryError::HugeTlb(page >> 10, io::Error::other(e)))?;
            return done(
                memory,
                Mechanism::HugeTlb,
                format!(
                    "hugetlbfs pages of {} KiB from the host's pool (hugepages=on)",
                    page >> 10
                ),
            );
        }
        RamBacking::Off => {
            let file = sealed_memfd(size).map_err(MemoryError::Memfd)?;
            let memory = map_aligned(file, size, THP_ALIGN)?;
            return done(memory, Mechanism::Small, "small pages (thp=off)".into());
        }
        _ => {}
    }
    let mut why_not = Vec::new();
    if !std::path::Path::new(THP_SYSFS).exists() {
        why_not.push("this kernel has no transparent huge pages".to_string());
    } else if shmem == "deny" {
        why_not.push("the host's shmem_enabled is deny".to_string());
    } else {
        if backing == RamBacking::Thp || only(Mechanism::Tmpfs) {
            match tmpfs_huge_file(size) {
                Ok(file) => {
                    let memory = map_aligned(file, size, THP_ALIGN)?;
                    return done(
                        memory,
                        Mechanism::Tmpfs,
                        format!(
                            "transparent huge pages from a private tmpfs (huge=within_size); \
                             the host's shmem_enabled is {shmem}"
                        ),
                    );
                }
                Err(e) if only(Mechanism::Tmpfs) => {
                    return Err(MemoryError::Unavailable("tmpfs", e))
                }
                Err(e) => why_not.push(format!("no private tmpfs ({e})")),
            }
        }
        if backing == RamBacking::Thp || only(Mechanism::Madvise) {
            if matches!(
                shmem.as_str(),
                "advise" | "always" | "within_size" | "force"
            ) {
                let file = sealed_memfd(size).map_err(MemoryError::Memfd)?;
                let memory = map_aligned(file, size, THP_ALIGN)?;
                match madvise(&memory, size, libc::MADV_HUGEPAGE) {
                    Ok(()) => {
                        return done(
                            memory,
                            Mechanism::Madvise,
                            format!(
                                "transparent huge pages from a memfd with MADV_HUGEPAGE; \
                                 the host's shmem_enabled is {shmem}"
                            ),
                        )
                    }
                    Err(e) if only(Mechanism::Madvise) => {
                        return Err(MemoryError::Unavailable("madvise", e.to_string()))
                    }
                    Err(e) => why_not.push(format!("MADV_HUGEPAGE failed ({e})")),
                }
            } else if only(Mechanism::Madvise) {
                return Err(MemoryError::Unavailable(
                    "madvise",
                    format!("the host's shmem_enabled is {shmem}, MADV_HUGEPAGE has no effect"),
                ));
            } else {
                why_not.push(format!("shmem_enabled {shmem} ignores MADV_HUGEPAGE"));
            }
        }
        if backing == RamBacking::Thp || only(Mechanism::Collapse) {
            let file = sealed_memfd(size).map_err(MemoryError::Memfd)?;
            let memory = map_aligned(file, size, THP_ALIGN)?;
            // Some kernels (Debian's 6.1) refuse to collapse a range with no pages at all
            // (EINVAL): one touched page per 2 MiB gives each huge page something to collapse.
            let collapsed = madvise(&memory, size, MADV_COLLAPSE).or_else(|e| {
                debug!("MADV_COLLAPSE on untouched RAM: {e}; touching one page per 2 MiB");
                for offset in (0..size).step_by(THP_ALIGN as usize) {
                    let addr = GuestAddress(bulkhead_firmware::layout::RAM_START + offset);
                    vm_memory::Bytes::write_obj(&memory, 0u8, addr)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                }
                madvise(&memory, size, MADV_COLLAPSE)
            });
            match collapsed {
                Ok(()) => {
                    return done(
                        memory,
                        Mechanism::Collapse,
                        format!(
                            "huge pages allocated up front with MADV_COLLAPSE; the host's \
                             shmem_enabled is {shmem} ({})",
                            why_not.join("; ")
                        ),
                    )
                }
                Err(e) if only(Mechanism::Collapse) => {
                    return Err(MemoryError::Unavailable("collapse", e.to_string()))
                }
                Err(e) => why_not.push(format!("MADV_COLLAPSE failed ({e})")),
            }
        }
    }
    debug!("no huge pages: {why_not:?}");
    let file = sealed_memfd(size).map_err(MemoryError::Memfd)?;
    let memory = map_aligned(file, size, THP_ALIGN)?;
    done(
        memory,
        Mechanism::Small,
        format!("small pages: {}", why_not.join("; ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn check(ram: &GuestRam, size: u64) {
        let start = GuestAddress(bulkhead_firmware::layout::RAM_START);
        let host = ram.memory.get_host_address(start).expect("mapped");
        assert_eq!(host as u64 % THP_ALIGN, 0, "2 MiB aligned");
        ram.memory
            .write_obj(0x1234_5678u32, start.unchecked_add(size - 4))
            .expect("write");
        let region = ram.memory.iter().next().expect("one region");
        assert_eq!(region.len(), size);
        let fo = region.file_offset().expect("shared file");
        assert_eq!(fo.file().metadata().expect("stat").len(), size);
    }

    #[test]
    fn test_create_thp_off_is_sealed_memfd() {
        let ram = create(4 << 20, RamBacking::Off).expect("ram");
        assert_eq!(ram.mechanism, Mechanism::Small);
        check(&ram, 4 << 20);
        let region = ram.memory.iter().next().expect("region");
        let fd = region.file_offset().expect("file").file().as_raw_fd();
        // SAFETY: F_GET_SEALS on our memfd.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
    }

    #[test]
    fn test_create_thp_default_gets_some_mechanism() {
        let ram = create(8 << 20, RamBacking::Thp).expect("ram");
        check(&ram, 8 << 20);
    }

    #[test]
    fn test_tmpfs_huge_file_where_namespaces_allow() {
        match tmpfs_huge_file(4 << 20) {
            Ok(f) => {
                assert_eq!(f.metadata().expect("stat").len(), 4 << 20);
                // SAFETY: statfs is plain data; fstatfs fills it for our descriptor.
                let mut st: libc::statfs = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
                assert_eq!(u64::try_from(st.f_type).ok(), Some(0x0102_1994), "tmpfs");
                // The mount's size= bounds the pages it can ever hold to guest RAM's size.
                assert!(
                    // SAFETY: fallocate on our own descriptor.
                    unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8 << 20) } != 0,
                    "allocating more than the mount's size must fail"
                );
            }
            Err(e) => eprintln!("no private tmpfs here: {e}"),
        }
    }

    #[test]
    fn test_hugetlb_pool_short_is_clear_error() {
        let Some(&page) = hugetlb_sizes().first() else {
            return;
        };
        // More pages than any test machine reserves.
        match create(page * 100_000, RamBacking::HugeTlb(page)) {
            Err(MemoryError::PoolShort { needed, .. }) => assert_eq!(needed, 100_000),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a pool of 100000 huge pages?"),
        }
    }

    #[test]
    fn test_thp_setting_parses_selected_word() {
        // The parser on its own, independent of the host.
        let s = "always [madvise] never";
        let w = s
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
        assert_eq!(w, Some("madvise"));
    }
}
