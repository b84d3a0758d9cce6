//! The jail description and the spawner (the parent's side). See `docs/jail-namespaces.md`.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitStatus;

use log::warn;

use crate::child::{self, Plan, PlannedBind};

/// Most descriptors a jail passes.
pub const MAX_FDS: usize = 32;

/// Where the new root's tmpfs is mounted (in the child's own mount namespace) before
/// `pivot_root`: a directory every Linux host has, since the spawner needs `/proc` anyway.
const STAGE: &CStr = c"/proc";

/// `ST_RELATIME` (not in the libc crate's musl bindings).
const ST_RELATIME: libc::c_ulong = 0x1000;

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The namespaces every jail gets: user, mount, pid, network (empty), ipc, uts, cgroup.
const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

/// A step of entering the jail, as reported when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    SetParentDeathSignal = 1,
    WaitForParent,
    MakeMountsPrivate,
    MountRoot,
    BindMount,
    PivotRoot,
    DetachOldRoot,
    RemountRootReadOnly,
    MoveDescriptors,
    CloseDescriptors,
    SetRlimit,
    ResetSignals,
    DropCapabilities,
    SetNoNewPrivs,
    Exec,
    SetIds,
}

impl Step {
    const ALL: [Step; 16] = [
        Step::SetParentDeathSignal,
        Step::WaitForParent,
        Step::MakeMountsPrivate,
        Step::MountRoot,
        Step::BindMount,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::RemountRootReadOnly,
        Step::MoveDescriptors,
        Step::CloseDescriptors,
        Step::SetRlimit,
        Step::ResetSignals,
        Step::DropCapabilities,
        Step::SetNoNewPrivs,
        Step::Exec,
        Step::SetIds,
    ];

    fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u32 == v)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::SetParentDeathSignal => "set PR_SET_PDEATHSIG",
            Step::WaitForParent => "wait for the parent's user namespace mapping",
            Step::MakeMountsPrivate => "make the mounts private",
            Step::MountRoot => "mount the tmpfs root",
            Step::BindMount => "bind mount a listed path",
            Step::PivotRoot => "pivot_root into the tmpfs",
            Step::DetachOldRoot => "detach the old root",
            Step::RemountRootReadOnly => "remount the root read-only",
            Step::MoveDescriptors => "move the listed descriptors",
            Step::CloseDescriptors => "close the other descriptors",
            Step::SetRlimit => "set the rlimits",
            Step::ResetSignals => "reset the signal mask",
            Step::DropCapabilities => "drop the capabilities",
            Step::SetNoNewPrivs => "set no_new_privs",
            Step::Exec => "execute the program",
            Step::SetIds => "become uid and gid 0 of the user namespace (the mapped host ids)",
        })
    }
}

/// Errors starting a jailed program. A jail that could not be applied never runs the program.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open the program {}", path.display())]
    OpenProgram {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("too many descriptors for one jail ({0}, at most {MAX_FDS})")]
    TooManyFds(usize),
    #[error("descriptor number {0} is listed twice or is negative")]
    BadTargetFd(RawFd),
    #[error("bind mount target {} must be an absolute path without `..`", .0.display())]
    BadBindTarget(PathBuf),
    #[error("cannot inspect bind mount source {}", path.display())]
    BindSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a path or argument contains a NUL byte")]
    Nul(#[source] std::ffi::NulError),
    #[error("cannot open /dev/null")]
    OpenDevNull(#[source] io::Error),
    #[error("cannot create a pipe to the child")]
    Pipe(#[source] io::Error),
    #[error("cannot set up cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot clone the child into its namespaces")]
    Clone(#[source] io::Error),
    #[error("cannot write {} for the child's user namespace", path.display())]
    UserNamespaceMap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot release the child")]
    Release(#[source] io::Error),
    #[error("cannot read the child's status")]
    ReadStatus(#[source] io::Error),
    #[error("the jailed child failed to {step}")]
    Child {
        step: Step,
        #[source]
        source: io::Error,
    },
    #[error("the jailed child sent an unknown step {0}")]
    UnknownStep(u32),
}

/// Resource limits of the jailed process (soft = hard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimits {
    /// RLIMIT_NOFILE: one more than the highest descriptor number the process may have.
    pub nofile: u64,
    /// RLIMIT_NPROC: processes and threads of the user (not enforced for uid 0 of the host;
    /// use a cgroup's pids.max there).
    pub nproc: u64,
    /// RLIMIT_AS, if set: the virtual address space (guest memory mappings count).
    pub address_space: Option<u64>,
    /// RLIMIT_FSIZE, if set: the largest file the process may write to.
    pub file_size: Option<u64>,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: 64,
            nproc: 64,
            address_space: None,
            file_size: None,
        }
    }
}

/// A cgroup v2 leaf the child starts in (CLONE_INTO_CGROUP), created by the spawner under
/// `parent` (which must be in the unified hierarchy and not have processes of its own) and
/// removed when the child is reaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    pub parent: PathBuf,
    pub name: String,
    /// memory.max in bytes.
    pub memory_max: Option<u64>,
    /// pids.max.
    pub pids_max: Option<u64>,
    /// cpu.max as (quota, period) in microseconds.
    pub cpu_max: Option<(u64, u64)>,
}

/// A path of the host made visible inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the jail.
    pub target: PathBuf,
    pub writable: bool,
}

/// A jail: what the jailed program gets. Everything not listed is absent.
#[derive(Debug, Default)]
pub struct Jail {
    fds: Vec<(OwnedFd, RawFd)>,
    binds: Vec<BindMount>,
    rlimits: Rlimits,
    cgroup: Option<CgroupLimits>,
    /// RLIMIT_DATA, if set (private writable memory; shared mappings do not count).
    data_limit: Option<u64>,
    /// The host uid and gid that uid and gid 0 of the jail map to (default: the caller's).
    host_ids: Option<(u32, u32)>,
    /// /proc/PID/oom_score_adj of the process, if set.
    oom_score_adj: Option<i32>,
}

impl Jail {
    /// An empty jail: no descriptors (stdin, stdout and stderr are /dev/null), no paths,
    /// default rlimits. (Landlock is the program's own first step: see docs/jail-landlock.md.)
    pub fn new() -> Jail {
        Jail::default()
    }

    /// Passes `fd` as descriptor number `target`. Numbers 0-2 not passed are /dev/null.
    pub fn pass_fd(mut self, fd: OwnedFd, target: RawFd) -> Jail {
        self.fds.push((fd, target));
        self
    }

    /// Makes host path `source` visible at `target` inside (read-only unless `writable`).
    pub fn bind_mount(
        mut self,
        source: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
        writable: bool,
    ) -> Jail {
        self.binds.push(BindMount {
            source: source.into(),
            target: target.into(),
            writable,
        });
        self
    }

    pub fn rlimits(mut self, rlimits: Rlimits) -> Jail {
        self.rlimits = rlimits;
        self
    }

    pub fn cgroup(mut self, cgroup: CgroupLimits) -> Jail {
        self.cgroup = Some(cgroup);
        self
    }

    /// RLIMIT_DATA: bounds the process's private writable memory (heap, anonymous mappings,
    /// thread stacks); shared mappings (guest RAM) do not count.
    pub fn data_limit(mut self, bytes: u64) -> Jail {
        self.data_limit = Some(bytes);
        self
    }

    /// Runs the program as host uid `uid` and gid `gid` (uid and gid 0 of its user namespace
    /// map to them). Needs CAP_SETUID and CAP_SETGID in the caller's user namespace unless
    /// they are the caller's own.
    pub fn host_ids(mut self, uid: u32, gid: u32) -> Jail {
        self.host_ids = Some((uid, gid));
        self
    }

    /// Sets the process's oom_score_adj (-1000 to 1000) before it runs; raising it needs no
    /// privilege. A failure is logged, not fatal.
    pub fn oom_score_adj(mut self, value: i32) -> Jail {
        self.oom_score_adj = Some(value);
        self
    }

    /// The descriptor numbers the program gets (besides /dev/null on unlisted 0-2).
    pub fn fd_numbers(&self) -> Vec<RawFd> {
        self.fds.iter().map(|&(_, t)| t).collect()
    }

    pub fn bind_mounts(&self) -> &[BindMount] {
        &self.binds
    }

    pub fn rlimit_values(&self) -> Rlimits {
        self.rlimits
    }

    /// Starts `program` with `args` (argv[0] is the program's file name) inside the jail. It
    /// is PID 1 of its own pid namespace and is killed when the calling thread exits
    /// (PR_SET_PDEATHSIG). Returns once the program has been executed, or with the step that
    /// failed. The passed descriptors are closed in the caller.
    pub fn spawn<S: AsRef<OsStr>>(
        self,
        program: &Path,
        args: &[S],
    ) -> Result<JailedChild, SpawnError> {
        spawn(self, program, args)
    }
}

/// A jailed process. Dropping it neither kills nor reaps the process.
#[derive(Debug)]
pub struct JailedChild {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    cgroup: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl JailedChild {
    /// The process id (in the caller's pid namespace).
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// A pidfd of the process (pollable: readable once it exited), when the kernel gave one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Sends SIGKILL (through the pidfd, so never to a recycled pid). A process already reaped
    /// is left alone.
    pub fn kill(&self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let ret = match &self.pidfd {
            // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                )
            },
            // SAFETY: kill with our child's pid, which is not reaped yet (status is None).
            None => unsafe { libc::kill(self.pid, libc::SIGKILL) }.into(),
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the process to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.reap(0)? {
                return Ok(status);
            }
        }
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: waitpid on our own child with a local status word.
        let ret = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                // `wait` calls again; `try_wait` reports "not yet".
                return Ok(None);
            }
            return Err(err);
        }
        if ret == 0 {
            return Ok(None);
        }
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        self.pidfd = None;
        if let Some(dir) = self.cgroup.take() {
            if let Err(e) = fs::remove_dir(&dir) {
                warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
        Ok(Some(status))
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(SpawnError::Nul)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SpawnError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_raw(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: open with a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The mkdir list, mount point and in-root path of bind target `target`.
fn plan_bind(bind: &BindMount) -> Result<PlannedBind, SpawnError> {
    let bad = || SpawnError::BadBindTarget(bind.target.clone());
    if !bind.target.is_absolute() {
        return Err(bad());
    }
    let mut parts = Vec::new();
    for c in bind.target.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => parts.push(p.as_bytes().to_vec()),
            _ => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    let meta = fs::metadata(&bind.source).map_err(|source| SpawnError::BindSource {
        path: bind.source.clone(),
        source,
    })?;
    let is_dir = meta.is_dir();
    let mut staged = STAGE.to_bytes().to_vec();
    let mut mkdirs = Vec::new();
    let n_dirs = if is_dir { parts.len() } else { parts.len() - 1 };
    for (i, p) in parts.iter().enumerate() {
        staged.push(b'/');
        staged.extend_from_slice(p);
        if i < n_dirs {
            mkdirs.push(cstring(&staged)?);
        }
    }
    // The remount keeps the source mount's locked flags (a user namespace may add flags but
    // not clear those its owner set) and adds nosuid, nodev, noexec and, unless writable, ro.
    let source = cstring(bind.source.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills a zeroed local struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(source.as_ptr(), &mut st) } != 0 {
        return Err(SpawnError::BindSource {
            path: bind.source.clone(),
            source: io::Error::last_os_error(),
        });
    }
    let mut flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    if !bind.writable {
        flags |= libc::MS_RDONLY;
    }
    Ok(PlannedBind {
        source,
        mkdirs,
        staged: cstring(&staged)?,
        is_dir,
        remount_flags: flags,
    })
}

/// Creates the cgroup leaf `limits` describes and writes its limits, for a process started
/// without a jail (which then joins it itself); returns the leaf's path.
pub fn create_cgroup(limits: &CgroupLimits) -> Result<PathBuf, SpawnError> {
    setup_cgroup(limits).map(|(dir, _fd)| dir)
}

/// Creates the cgroup leaf and writes its limits; returns its path and a descriptor of it.
fn setup_cgroup(limits: &CgroupLimits) -> Result<(PathBuf, OwnedFd), SpawnError> {
    let dir = limits.parent.join(&limits.name);
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SpawnError::Cgroup { path, source }
    };
    let mut controllers = Vec::new();
    if limits.memory_max.is_some() {
        controllers.push("memory");
    }
    if limits.pids_max.is_some() {
        controllers.push("pids");
    }
    if limits.cpu_max.is_some() {
        controllers.push("cpu");
    }
    let subtree = limits.parent.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree).map_err(fail(&subtree))?;
    for c in &controllers {
        if !enabled.split_whitespace().any(|e| e == *c) {
            fs::write(&subtree, format!("+{c}")).map_err(fail(&subtree))?;
        }
    }
    if dir.exists() {
        // A leaf left behind by an earlier process of the same name.
        let _ = fs::remove_dir(&dir);
    }
    fs::create_dir(&dir).map_err(fail(&dir))?;
    let write_limits = || -> Result<OwnedFd, SpawnError> {
        let mut files = Vec::new();
        if let Some(m) = limits.memory_max {
            files.push(("memory.max", m.to_string()));
            // Swap would let the process exceed memory.max; ignored where there is no swap.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        if let Some(p) = limits.pids_max {
            files.push(("pids.max", p.to_string()));
        }
        if let Some((quota, period)) = limits.cpu_max {
            files.push(("cpu.max", format!("{quota} {period}")));
        }
        for (name, value) in files {
            let path = dir.join(name);
            fs::write(&path, value).map_err(fail(&path))?;
        }
        let c = cstring(dir.as_os_str().as_bytes())?;
        open_raw(&c, libc::O_RDONLY | libc::O_DIRECTORY).map_err(fail(&dir))
    };
    match write_limits() {
        Ok(fd) => Ok((dir, fd)),
        Err(e) => {
            let _ = fs::remove_dir(&dir);
            Err(e)
        }
    }
}

/// An RLIMIT_* constant as u32 (its type is u32 in glibc's bindings, c_int in musl's).
#[allow(clippy::unnecessary_cast)]
fn resource(r: impl TryInto<u32>) -> u32 {
    r.try_into().unwrap_or(u32::MAX)
}

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn spawn<S: AsRef<OsStr>>(
    jail: Jail,
    program: &Path,
    args: &[S],
) -> Result<JailedChild, SpawnError> {
    if jail.fds.len() > MAX_FDS {
        return Err(SpawnError::TooManyFds(jail.fds.len()));
    }
    for (i, &(_, t)) in jail.fds.iter().enumerate() {
        if !(0..=1024).contains(&t) || jail.fds[..i].iter().any(|&(_, u)| u == t) {
            return Err(SpawnError::BadTargetFd(t));
        }
    }
    // Opened before pivot_root: the only way the child reaches its program afterwards.
    let program_c = cstring(program.as_os_str().as_bytes())?;
    let program_fd =
        open_raw(&program_c, libc::O_PATH).map_err(|source| SpawnError::OpenProgram {
            path: program.to_path_buf(),
            source,
        })?;
    let dev_null = open_raw(c"/dev/null", libc::O_RDWR).map_err(SpawnError::OpenDevNull)?;
    let binds = jail
        .binds
        .iter()
        .map(plan_bind)
        .collect::<Result<Vec<_>, _>>()?;

    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut argv_c = vec![cstring(name.as_bytes())?];
    for a in args {
        argv_c.push(cstring(a.as_ref().as_bytes())?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // The environment is empty, except for the test-only seccomp rule usage trace, which the
    // device's filter reads (crate::seccomp::TRACE_ENV; it weakens nothing).
    let trace_env = std::env::var(crate::seccomp::TRACE_ENV)
        .ok()
        .map(|v| cstring(format!("{}={v}", crate::seccomp::TRACE_ENV).as_bytes()))
        .transpose()?;
    let mut envp: Vec<*const libc::c_char> = trace_env.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());

    let mut rlimits = vec![
        (resource(libc::RLIMIT_NOFILE), jail.rlimits.nofile),
        (resource(libc::RLIMIT_NPROC), jail.rlimits.nproc),
        (resource(libc::RLIMIT_CORE), 0),
    ];
    if let Some(v) = jail.rlimits.address_space {
        rlimits.push((resource(libc::RLIMIT_AS), v));
    }
    if let Some(v) = jail.rlimits.file_size {
        rlimits.push((resource(libc::RLIMIT_FSIZE), v));
    }
    if let Some(v) = jail.data_limit {
        rlimits.push((resource(libc::RLIMIT_DATA), v));
    }
    let fds: Vec<(RawFd, RawFd)> = jail
        .fds
        .iter()
        .map(|(fd, t)| (fd.as_raw_fd(), *t))
        .collect();
    let tmpfs_options = c"mode=0755,size=64k,nr_inodes=256";

    let (sync_read, sync_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let cgroup = jail.cgroup.as_ref().map(setup_cgroup).transpose()?;

    let plan = Plan {
        sync_read: sync_read.as_raw_fd(),
        sync_write: sync_write.as_raw_fd(),
        err_read: err_read.as_raw_fd(),
        err_write: err_write.as_raw_fd(),
        program: program_fd.as_raw_fd(),
        dev_null: dev_null.as_raw_fd(),
        fds: &fds,
        stage: STAGE,
        tmpfs_options,
        binds: &binds,
        rlimits: &rlimits,
        argv: &argv,
        envp: &envp,
    };

    let mut pidfd: RawFd = -1;
    let mut args3 = CloneArgs {
        flags: NAMESPACES as u64 | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some((_, fd)) = &cgroup {
        args3.flags |= CLONE_INTO_CGROUP;
        args3.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: clone3 with a valid clone_args of the size passed and no stack: like fork, the
    // child continues here on a copy of this thread's stack. The child only runs
    // `child::run`, which makes system calls on data prepared above and never returns.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args3 as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
        && cgroup.is_none()
    {
        // Kernels before 5.3 (or a seccomp filter around us hiding clone3): clone, with the
        // pidfd stored at the parent_tid argument (third on both architectures).
        // SAFETY: as above: a fork-like clone (no stack, no CLONE_VM).
        pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (NAMESPACES | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                &mut pidfd as *mut RawFd,
                0usize,
                0usize,
            )
        };
    }
    if pid == 0 {
        // SAFETY: this is the child of the fork-like clone above; `plan` is its copy.
        unsafe { child::run(&plan) }
    }
    let cgroup_dir = cgroup.map(|(dir, _fd)| dir);
    if pid < 0 {
        let err = io::Error::last_os_error();
        if let Some(dir) = &cgroup_dir {
            let _ = fs::remove_dir(dir);
        }
        return Err(SpawnError::Clone(err));
    }
    let mut child = JailedChild {
        pid: pid as libc::pid_t,
        // SAFETY: the kernel stored a fresh pidfd owned by nobody else (or -1, then None).
        pidfd: (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) }),
        cgroup: cgroup_dir,
        status: None,
    };
    drop(sync_read);
    drop(err_write);
    let released = release_child(&child, sync_write, jail.host_ids, jail.oom_score_adj);
    let outcome = released.and_then(|()| read_child_status(err_read));
    if let Err(e) = outcome {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // The passed descriptors and the program's are closed here when `jail` and `program_fd`
    // drop: the child has its own copies.
    drop(jail);
    Ok(child)
}

/// Maps uid and gid 0 inside the child's user namespace to the caller's (or `host_ids`), sets
/// its oom_score_adj, then lets it go on.
fn release_child(
    child: &JailedChild,
    sync_write: OwnedFd,
    host_ids: Option<(u32, u32)>,
    oom_score_adj: Option<i32>,
) -> Result<(), SpawnError> {
    let proc_dir = PathBuf::from(format!("/proc/{}", child.pid));
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = host_ids.unwrap_or_else(|| unsafe { (libc::geteuid(), libc::getegid()) });
    if let Some(adj) = oom_score_adj {
        let path = proc_dir.join("oom_score_adj");
        if let Err(e) = fs::write(&path, adj.to_string()) {
            warn!("cannot write {}: {e}", path.display());
        }
    }
    for (file, content) in [
        ("setgroups", "deny".to_string()),
        ("uid_map", format!("0 {uid} 1")),
        ("gid_map", format!("0 {gid} 1")),
    ] {
        let path = proc_dir.join(file);
        fs::write(&path, content)
            .map_err(|source| SpawnError::UserNamespaceMap { path, source })?;
    }
    let go = [b'g'];
    // SAFETY: writes one byte from a local buffer to our pipe.
    if unsafe { libc::write(sync_write.as_raw_fd(), go.as_ptr().cast(), 1) } != 1 {
        return Err(SpawnError::Release(io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads the child's report: EOF means its exec succeeded, 8 bytes are a failed step and errno.
fn read_child_status(err_read: OwnedFd) -> Result<(), SpawnError> {
    let mut file = fs::File::from(err_read);
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match io::Read::read(&mut file, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SpawnError::ReadStatus(e)),
        }
    }
    match got {
        0 => Ok(()),
        8 => {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let step = Step::from_u32(step).ok_or(SpawnError::UnknownStep(step))?;
            Err(SpawnError::Child {
                step,
                source: io::Error::from_raw_os_error(errno),
            })
        }
        _ => Err(SpawnError::ReadStatus(io::Error::from(
            io::ErrorKind::UnexpectedEof,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_step_roundtrip_all_steps() {
        for s in Step::ALL {
            assert_eq!(Step::from_u32(s as u32), Some(s));
        }
        assert_eq!(Step::from_u32(0), None);
    }

    #[test]
    fn test_plan_bind_relative_target_rejected() {
        let b = BindMount {
            source: "/".into(),
            target: "dev".into(),
            writable: false,
        };
        assert!(matches!(plan_bind(&b), Err(SpawnError::BadBindTarget(_))));
        let b = BindMount {
            source: "/".into(),
            target: "/a/../b".into(),
            writable: false,
        };
        assert!(matches!(plan_bind(&b), Err(SpawnError::BadBindTarget(_))));
    }

    #[test]
    fn test_plan_bind_file_readonly_remounted_readonly() {
        let b = BindMount {
            source: "/dev/null".into(),
            target: "/dev/null".into(),
            writable: false,
        };
        let p = plan_bind(&b).expect("plan");
        assert!(!p.is_dir);
        assert_eq!(p.mkdirs, vec![CString::new("/proc/dev").expect("c")]);
        assert_eq!(p.staged.as_bytes(), b"/proc/dev/null");
        assert_ne!(p.remount_flags & libc::MS_RDONLY, 0);
    }

    #[test]
    fn test_spawn_missing_program_fails_in_parent() {
        let err = Jail::new()
            .spawn(Path::new("/nonexistent/program"), &[] as &[&str])
            .expect_err("missing program");
        assert!(matches!(err, SpawnError::OpenProgram { .. }), "{err:?}");
    }

    /// Whether this machine lets us create the jail's namespaces (not in every container).
    fn namespaces_available() -> bool {
        // SAFETY: a fork-like clone whose child exits at once.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (NAMESPACES | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            // SAFETY: leave the child without running anything else.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        true
    }

    /// A dynamically linked program cannot run in the empty root (its loader is not there):
    /// the failure comes back from the child as the exec step with ENOENT.
    #[test]
    fn test_spawn_dynamic_program_reports_exec_step() {
        let sh = Path::new("/bin/sh");
        if !namespaces_available() || !sh.exists() {
            eprintln!("skipped: no user namespaces here");
            return;
        }
        let err = Jail::new()
            .spawn(sh, &["-c", "true"])
            .expect_err("a dynamic program has no loader in the jail");
        match err {
            SpawnError::Child { step, source } => {
                assert_eq!(step, Step::Exec);
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A bind mount whose source vanished between planning and mounting is reported as the
    /// bind mount step; here the source is a directory that is not there at all.
    #[test]
    fn test_spawn_missing_bind_source_fails_in_parent() {
        let err = Jail::new()
            .bind_mount("/nonexistent/dir", "/data", false)
            .spawn(Path::new("/bin/sh"), &[] as &[&str])
            .expect_err("missing source");
        assert!(matches!(err, SpawnError::BindSource { .. }), "{err:?}");
    }

    #[test]
    fn test_spawn_duplicate_target_rejected() {
        let a = open_raw(c"/dev/null", libc::O_RDONLY).expect("open");
        let b = open_raw(c"/dev/null", libc::O_RDONLY).expect("open");
        let jail = Jail::new().pass_fd(a, 3).pass_fd(b, 3);
        let err = jail
            .spawn(Path::new("/bin/true"), &[] as &[&str])
            .expect_err("dup");
        assert!(matches!(err, SpawnError::BadTargetFd(3)));
    }
}
