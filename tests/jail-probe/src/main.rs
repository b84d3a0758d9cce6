//! `bulkhead-jail-probe`: plays a compromised block device process.
//!
//! It starts itself through `bulkhead_sandbox` with the block device's jail
//! (`bulkhead_block::jail`), the jailed copy applies landlock and installs the block device's
//! seccomp filter exactly as `bulkhead-block` does (through `bulkhead-device-runtime`), then does
//! what an attacker would. The parent reports how each
//! attempt ended, one line each:
//!
//! ```text
//! PROBE open-host-file: killed by SIGSYS
//! PROBE mount: failed EPERM
//! ```
//!
//! and exits non-zero if any attack SUCCEEDED or gave no result. `control` does what the device
//! must still be able to do under its jail and filter, and exits non-zero if any of it failed
//! or the filter killed it.
//!
//! Synopsis:
//! ```text
//! bulkhead-jail-probe attack [--without-seccomp] [NAME...]   (default: every attack)
//! bulkhead-jail-probe control [--without-seccomp]            (what the jail must still allow)
//! bulkhead-jail-probe view [--cgroup PARENT_DIR]             (the jailed child seen from outside)
//! bulkhead-jail-probe list
//! ```
//! `--without-seccomp` skips the filter in the child, to show what the layers below it
//! (namespaces, empty root, capabilities, landlock) stop on their own; attacks that only
//! seccomp is meant to stop are not run then.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bulkhead_block::jail::{JailFds, IMAGE_FD, SOCKET_FD};
use bulkhead_device_runtime::startup;
use bulkhead_sandbox::{CgroupLimits, Jail, JailedChild};

/// An attack: its name, whether the layers below seccomp must stop it too, and what it does.
struct Attack {
    name: &'static str,
    below_seccomp: bool,
    run: fn(&[String]) -> Outcome,
}

/// What the attempt did inside the jail.
enum Outcome {
    Failed(i32),
    Succeeded(String),
}

const ATTACKS: &[Attack] = &[
    Attack {
        name: "open-host-file",
        below_seccomp: true,
        run: open_host_file,
    },
    Attack {
        name: "open-proc-self",
        below_seccomp: true,
        run: open_proc_self,
    },
    Attack {
        name: "list-root",
        below_seccomp: true,
        run: list_root,
    },
    Attack {
        name: "socket-inet",
        below_seccomp: true,
        run: socket_inet,
    },
    Attack {
        name: "exec-shell",
        below_seccomp: true,
        run: exec_shell,
    },
    Attack {
        name: "ptrace-traceme",
        below_seccomp: false,
        run: ptrace_traceme,
    },
    Attack {
        name: "ptrace-attach-parent",
        below_seccomp: true,
        run: ptrace_attach_parent,
    },
    Attack {
        name: "kill-parent",
        below_seccomp: true,
        run: kill_parent,
    },
    Attack {
        name: "mount",
        below_seccomp: true,
        run: mount_tmpfs,
    },
    Attack {
        name: "sysrq-trigger",
        below_seccomp: true,
        run: sysrq_trigger,
    },
    Attack {
        name: "unshare-userns",
        below_seccomp: false,
        run: unshare_userns,
    },
    Attack {
        name: "fork",
        below_seccomp: false,
        run: fork,
    },
    Attack {
        name: "exec-memory",
        below_seccomp: false,
        run: exec_memory,
    },
];

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in a literal")
}

fn open_path(path: &str, flags: libc::c_int) -> Outcome {
    let p = c(path);
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Outcome::Failed(errno());
    }
    let mut buf = [0u8; 64];
    // SAFETY: read into a local buffer from the descriptor just opened.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    Outcome::Succeeded(format!("opened {path}, read {n} bytes"))
}

fn open_host_file(_: &[String]) -> Outcome {
    open_path("/etc/passwd", libc::O_RDONLY)
}

fn open_proc_self(_: &[String]) -> Outcome {
    open_path("/proc/self/status", libc::O_RDONLY)
}

fn list_root(_: &[String]) -> Outcome {
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Outcome::Failed(errno());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: getdents64 into a local buffer of the given size.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded(format!("listed / ({n} bytes of entries)"))
}

fn socket_inet(_: &[String]) -> Outcome {
    // SAFETY: socket with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Outcome::Failed(errno());
    }
    // A socket alone reaches nothing: try to connect out (10.0.2.2 is QEMU's user-net host).
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 80u16.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([10, 0, 2, 2]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect with a valid sockaddr_in of the given size.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("connected to 10.0.2.2:80".into())
}

fn exec_shell(_: &[String]) -> Outcome {
    let argv = [
        c"sh".as_ptr(),
        c"-c".as_ptr(),
        c"true".as_ptr(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: execve with NUL-terminated strings and NULL-terminated arrays; returns only on
    // failure.
    unsafe { libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Outcome::Failed(errno())
}

fn ptrace_traceme(_: &[String]) -> Outcome {
    // SAFETY: PTRACE_TRACEME takes no pointers.
    let ret = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
    if ret < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("PTRACE_TRACEME".into())
}

fn parent_pid(args: &[String]) -> libc::pid_t {
    args.first().and_then(|a| a.parse().ok()).unwrap_or(1)
}

fn ptrace_attach_parent(args: &[String]) -> Outcome {
    let pid = parent_pid(args);
    // SAFETY: PTRACE_ATTACH takes a pid and no pointers.
    let ret = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    if ret < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded(format!("attached to pid {pid}"))
}

fn kill_parent(args: &[String]) -> Outcome {
    let pid = parent_pid(args);
    // Signal 0: checks whether the VMM could be signalled, without doing it.
    // SAFETY: kill with integer arguments.
    if unsafe { libc::kill(pid, 0) } < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded(format!("may signal pid {pid}"))
}

fn mount_tmpfs(_: &[String]) -> Outcome {
    // SAFETY: mount with NUL-terminated strings.
    let ret = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("mounted a tmpfs on /".into())
}

fn sysrq_trigger(_: &[String]) -> Outcome {
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/proc/sysrq-trigger".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("opened /proc/sysrq-trigger for writing".into())
}

fn unshare_userns(_: &[String]) -> Outcome {
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("created a user namespace".into())
}

fn fork(_: &[String]) -> Outcome {
    // A raw clone without CLONE_THREAD is a fork.
    // SAFETY: a fork-like clone; the child exits at once.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: the child leaves without running anything else.
        unsafe { libc::_exit(0) };
    }
    if pid < 0 {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded(format!("forked pid {pid}"))
}

fn exec_memory(_: &[String]) -> Outcome {
    // SAFETY: an anonymous mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Outcome::Failed(errno());
    }
    Outcome::Succeeded("mapped writable+executable memory".into())
}

/// What the jail and filter must still allow, the calls the device makes while serving: the
/// image (preadv, pwritev, fdatasync), eventfds and epoll (the queue workers' loops), a thread
/// (a queue worker), anonymous read-write memory, and the socket (the report itself). A call the
/// filter kills ends the child with SIGSYS, which `run_one` counts as a failed control.
fn control() -> Outcome {
    match control_steps() {
        Ok(what) => Outcome::Succeeded(what),
        Err(e) => Outcome::Failed(e),
    }
}

fn control_steps() -> Result<String, i32> {
    let check = |ret: libc::c_long| if ret < 0 { Err(errno()) } else { Ok(ret) };
    // SAFETY: eventfd2 and epoll_create1 take integers and return new descriptors.
    let efd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) }.into())?;
    // SAFETY: as above.
    let epfd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }.into())?;
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 7,
    };
    // SAFETY: epoll_ctl reads one epoll_event from a local.
    let added =
        unsafe { libc::epoll_ctl(epfd as i32, libc::EPOLL_CTL_ADD, efd as i32, &mut event) };
    check(added.into())?;
    let one = 1u64;
    // SAFETY: write 8 bytes from a local to the eventfd.
    check(unsafe { libc::write(efd as i32, (&one as *const u64).cast(), 8) } as libc::c_long)?;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: epoll_wait writes at most 4 events into `events` (epoll_pwait on aarch64).
    let n = check(unsafe { libc::epoll_wait(epfd as i32, events.as_mut_ptr(), 4, 1000) }.into())?;
    if n != 1 {
        return Err(libc::EIO);
    }
    // A thread, as a queue worker is started.
    let worker = std::thread::Builder::new()
        .name("queue0".into())
        .spawn(|| 42)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    if worker.join().map_err(|_| libc::EIO)? != 42 {
        return Err(libc::EIO);
    }
    // Anonymous read-write memory (what allocations and guest memory mappings need).
    let big = vec![1u8; 4 << 20];
    if big.iter().map(|b| u64::from(*b)).sum::<u64>() != 4 << 20 {
        return Err(libc::EIO);
    }
    // SAFETY: closing the descriptors created above.
    unsafe {
        libc::close(efd as i32);
        libc::close(epfd as i32);
    }
    image_io()
}

fn image_io() -> Result<String, i32> {
    let mut buf = [0u8; 512];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: preadv into a local buffer described by one iovec.
    let n = unsafe { libc::preadv(IMAGE_FD, &iov, 1, 0) };
    if n != 512 {
        return Err(errno());
    }
    let wiov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: pwritev from a local buffer described by one iovec.
    let n = unsafe { libc::pwritev(IMAGE_FD, &wiov, 1, 512) };
    if n != 512 {
        return Err(errno());
    }
    // SAFETY: fdatasync on the image descriptor.
    if unsafe { libc::fdatasync(IMAGE_FD) } != 0 {
        return Err(errno());
    }
    Ok(format!(
        "epoll, eventfd, a thread, memory; read, wrote and synced the image (first byte {:#x})",
        buf[0]
    ))
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EACCES => "EACCES",
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EROFS => "EROFS",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Writes one line to the parent over the socket the jail passed (write is in the allowlist).
fn report(line: &str) {
    let msg = format!("{line}\n");
    // SAFETY: write from a live buffer to the jail's socket descriptor.
    unsafe { libc::write(SOCKET_FD, msg.as_ptr().cast(), msg.len()) };
}

/// The jailed side: `child [--without-seccomp] (attack NAME [PPID] | control | wait)`.
fn child(args: &[String]) -> ExitCode {
    let mut args = args;
    let seccomp = if args.first().map(String::as_str) == Some("--without-seccomp") {
        args = &args[1..];
        false
    } else {
        true
    };
    // Exactly what bulkhead-block does before serving (bulkhead-device-runtime's start-up):
    // landlock, then its seccomp filter.
    if let Err(e) = startup::apply_landlock() {
        report(&format!(
            "SETUP-FAILED {}",
            bulkhead_device_runtime::chain(&e)
        ));
        return ExitCode::from(3);
    }
    if seccomp {
        let applied = bulkhead_block::seccomp_filter()
            .map_err(anyhow::Error::from)
            .and_then(|f| bulkhead_sandbox::seccomp::apply(&f).map_err(anyhow::Error::from));
        if let Err(e) = applied {
            report(&format!("SETUP-FAILED {e:#}"));
            return ExitCode::from(3);
        }
    }
    let outcome = match args.first().map(String::as_str) {
        Some("attack") => {
            let name = args.get(1).map(String::as_str).unwrap_or("");
            match ATTACKS.iter().find(|a| a.name == name) {
                Some(a) => (a.run)(args.get(2..).unwrap_or(&[])),
                None => {
                    report("SETUP-FAILED unknown attack");
                    return ExitCode::from(3);
                }
            }
        }
        Some("control") => control(),
        Some("wait") => {
            report("READY");
            let mut b = [0u8; 8];
            // SAFETY: read into a local buffer; returns when the parent writes or closes.
            unsafe { libc::read(SOCKET_FD, b.as_mut_ptr().cast(), b.len()) };
            return ExitCode::SUCCESS;
        }
        _ => {
            report("SETUP-FAILED bad child arguments");
            return ExitCode::from(3);
        }
    };
    match outcome {
        Outcome::Failed(e) => report(&format!("RESULT failed {}", errno_name(e))),
        Outcome::Succeeded(what) => report(&format!("RESULT SUCCEEDED ({what})")),
    }
    ExitCode::SUCCESS
}

/// A jailed copy of this program with the block device's jail, and our end of its socket.
fn spawn_jailed(
    child_args: &[String],
    cgroup: Option<CgroupLimits>,
) -> Result<(JailedChild, UnixStream, PathBuf)> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let image_path =
        std::env::temp_dir().join(format!("bulkhead-jail-probe-{}.img", std::process::id()));
    let image = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image_path)
        .with_context(|| format!("creating {}", image_path.display()))?;
    image.set_len(1 << 20).context("sizing the image")?;
    let log: OwnedFd = std::io::stderr().as_fd_owned().context("dup stderr")?;
    let mut jail: Jail = bulkhead_block::jail::jail(
        JailFds {
            socket: theirs.into(),
            image: image.into(),
            log: Some(log),
        },
        1,
    );
    if let Some(cg) = cgroup {
        jail = jail.cgroup(cg);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut argv = vec!["child".to_string()];
    argv.extend_from_slice(child_args);
    let child = jail
        .spawn(&exe, &argv)
        .map_err(anyhow::Error::from)
        .context("spawning into the block jail")?;
    Ok((child, ours, image_path))
}

trait DupOwned {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd>;
}

impl DupOwned for std::io::Stderr {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = stream.read(&mut b) {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs one jailed child to its end and describes how it ended. `Ok(true)` if it got past the
/// jail (SUCCEEDED) or gave no result.
fn run_one(label: &str, child_args: &[String], expect_success: bool) -> Result<bool> {
    let (mut child, mut ours, image) = spawn_jailed(child_args, None)?;
    let line = read_line(&mut ours);
    let status = child.wait().context("waiting for the jailed child")?;
    let _ = fs::remove_file(image);
    // A control must run to its end: the filter killing an allowed call fails it.
    let (text, bad) = if status.signal() == Some(libc::SIGSYS) {
        ("killed by SIGSYS".to_string(), expect_success)
    } else if let Some(sig) = status.signal() {
        (format!("killed by signal {sig}"), expect_success)
    } else if let Some(rest) = line.strip_prefix("RESULT ") {
        let succeeded = rest.starts_with("SUCCEEDED");
        (rest.to_string(), succeeded != expect_success)
    } else {
        (
            format!("no result (exit status {:?}, said {line:?})", status.code()),
            true,
        )
    };
    println!("PROBE {label}: {text}");
    Ok(bad)
}

fn attack(args: &[String]) -> Result<ExitCode> {
    let mut names: Vec<&str> = Vec::new();
    let mut without = false;
    for a in args {
        if a == "--without-seccomp" {
            without = true;
        } else {
            names.push(a);
        }
    }
    let selected: Vec<&Attack> = ATTACKS
        .iter()
        .filter(|a| names.is_empty() || names.contains(&a.name))
        .filter(|a| !without || a.below_seccomp)
        .collect();
    if selected.is_empty() {
        bail!("no such attack (see `bulkhead-jail-probe list`)");
    }
    let ppid = std::process::id().to_string();
    let mut bad = 0;
    for a in selected {
        let mut child_args = Vec::new();
        if without {
            child_args.push("--without-seccomp".to_string());
        }
        child_args.extend(["attack".to_string(), a.name.to_string(), ppid.clone()]);
        let label = if without {
            format!("{} (without seccomp)", a.name)
        } else {
            a.name.to_string()
        };
        if run_one(&label, &child_args, false)? {
            bad += 1;
        }
    }
    println!("PROBE-SUMMARY {bad} attack(s) got through");
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn control_mode(args: &[String]) -> Result<ExitCode> {
    let mut child_args = Vec::new();
    if args.iter().any(|a| a == "--without-seccomp") {
        child_args.push("--without-seccomp".to_string());
    }
    child_args.push("control".to_string());
    let bad = run_one("control (image and socket still usable)", &child_args, true)?;
    Ok(if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn ns_id(pid: &str, ns: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

fn view(args: &[String]) -> Result<ExitCode> {
    let cgroup = match args {
        [flag, parent] if flag == "--cgroup" => Some(CgroupLimits {
            parent: PathBuf::from(parent),
            name: format!("bulkhead-jail-probe-{}", std::process::id()),
            memory_max: Some(256 << 20),
            pids_max: Some(64),
            cpu_max: Some((50_000, 100_000)),
        }),
        [] => None,
        _ => bail!("usage: bulkhead-jail-probe view [--cgroup PARENT_DIR]"),
    };
    let (mut child, mut ours, image) = spawn_jailed(&["wait".to_string()], cgroup.clone())?;
    let ready = read_line(&mut ours);
    if ready != "READY" {
        let status = child.wait()?;
        bail!("the jailed child did not get ready: said {ready:?}, {status}");
    }
    let pid = child.id().to_string();
    println!("VIEW pid {pid}");
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    println!("VIEW comm {}", comm.trim());
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("reading status")?;
    for line in status.lines() {
        let key = line.split(':').next().unwrap_or("");
        if matches!(
            key,
            "Seccomp"
                | "Seccomp_filters"
                | "NoNewPrivs"
                | "CapInh"
                | "CapPrm"
                | "CapEff"
                | "CapBnd"
                | "CapAmb"
                | "NSpid"
                | "Uid"
        ) {
            println!(
                "VIEW status {}",
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        let ours_ns = ns_id("self", ns);
        let theirs_ns = ns_id(&pid, ns);
        let verdict = if ours_ns == theirs_ns {
            "same"
        } else {
            "differs"
        };
        println!("VIEW ns {ns} {verdict} ({ours_ns} -> {theirs_ns})");
    }
    let mut entries: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))
        .context("listing the child's root")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    entries.sort();
    println!("VIEW root-entries {}", entries.len());
    for e in &entries {
        println!("VIEW root-entry {e}");
    }
    let mountinfo =
        fs::read_to_string(format!("/proc/{pid}/mountinfo")).context("reading mountinfo")?;
    println!("VIEW mounts {}", mountinfo.lines().count());
    for m in mountinfo.lines() {
        let f: Vec<&str> = m.split_whitespace().collect();
        let fstype = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 1))
            .unwrap_or(&"?");
        println!(
            "VIEW mount {} {} {}",
            f.get(4).unwrap_or(&"?"),
            fstype,
            f.get(5).unwrap_or(&"?")
        );
    }
    let mut fds: Vec<(i32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .context("listing the child's descriptors")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().parse().ok()?;
            let target = fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Some((n, target))
        })
        .collect();
    fds.sort();
    println!("VIEW fd-count {}", fds.len());
    for (n, target) in &fds {
        println!("VIEW fd {n} {target}");
    }
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    for line in limits.lines() {
        if [
            "Max open files",
            "Max processes",
            "Max core file size",
            "Max address space",
        ]
        .iter()
        .any(|k| line.starts_with(k))
        {
            println!(
                "VIEW limit {}",
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    println!("VIEW cgroup {}", cg.trim());
    if let Some(cg) = &cgroup {
        let dir = cg.parent.join(&cg.name);
        for f in ["memory.max", "pids.max", "cpu.max"] {
            let v = fs::read_to_string(dir.join(f)).unwrap_or_else(|e| format!("? ({e})"));
            println!("VIEW cgroup-limit {f} {}", v.trim());
        }
    }
    ours.write_all(b"GO").context("releasing the child")?;
    let status = child.wait().context("waiting for the child")?;
    let _ = fs::remove_file(image);
    println!("VIEW exit {status}");
    if let Some(cg) = &cgroup {
        println!("VIEW cgroup-removed {}", !cg.parent.join(&cg.name).exists());
    }
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The syscalls the `bulkhead-block` mode kills on: the block device's first read of a file
/// after its start-up, which is the check that the guest memory table's last byte is backed
/// (`preadv`, when the guest driver activates the device), or else its first disk I/O
/// (io_uring or the synchronous engine). Either comes after the handshake, so the VMM's
/// device monitor is watching when it dies.
const FAULT_SYSCALLS: &[&str] = &["io_uring_enter", "preadv", "pwritev", "pread64"];

/// Run as `bulkhead-block` (a copy of this program under that name, beside a copy of
/// `bulkhead`, whose device manager then spawns it as the block device): the real block
/// device, behind one more seccomp filter of its own that kills the process on its first read
/// or disk I/O after start-up. A device process that really commits a violation, for the nested `device-violation`
/// scenario (the VMM must log it with the syscall's name from the kernel's audit record).
fn violating_block_device() -> ExitCode {
    use bulkhead_sandbox::seccomp::{native_arch, syscall_nr, SeccompAction};
    let arch = native_arch();
    let rules = FAULT_SYSCALLS
        .iter()
        .filter_map(|name| syscall_nr(name, arch))
        .map(|nr| (nr, vec![]))
        .collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch,
    )
    .and_then(seccompiler::BpfProgram::try_from);
    let applied = filter
        .map_err(anyhow::Error::from)
        .and_then(|f| bulkhead_sandbox::seccomp::apply(&f).map_err(anyhow::Error::from));
    if let Err(e) = applied {
        eprintln!("bulkhead-jail-probe as bulkhead-block: cannot install the fault filter: {e:#}");
        return ExitCode::from(1);
    }
    eprintln!(
        "bulkhead-jail-probe as bulkhead-block: the first of {} kills this device",
        FAULT_SYSCALLS.join(", ")
    );
    bulkhead_device_runtime::main::<bulkhead_block::args::Args, bulkhead_block::Config>()
}

fn main() -> Result<ExitCode> {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some("bulkhead-block".as_ref()) {
        return Ok(violating_block_device());
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("child") => {
            bulkhead_sandbox::set_name_from_argv0();
            Ok(child(rest))
        }
        Some("attack") => attack(rest),
        Some("control") => control_mode(rest),
        Some("view") => view(rest),
        Some("list") => {
            for a in ATTACKS {
                println!("{}{}", a.name, if a.below_seccomp { "" } else { " (seccomp only)" });
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("usage: bulkhead-jail-probe (attack [--without-seccomp] [NAME...] | control | view [--cgroup DIR] | list)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_attacks_names_unique() {
        for (i, a) in ATTACKS.iter().enumerate() {
            assert!(
                ATTACKS[..i].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
        }
    }

    #[test]
    fn test_errno_name_known_and_unknown() {
        assert_eq!(errno_name(libc::EACCES), "EACCES");
        assert_eq!(errno_name(4095), "errno 4095");
    }
}
