//! The host end of the virtio console (`--console`), which the VMM opens and hands to the
//! `bulkhead-console` process (docs/console.md): its own terminal (stdin and stdout, reopened so
//! the device's non-blocking use does not touch the VMM's), a new pty (master and slave, the
//! slave in raw mode), a file opened for append, or a Unix socket bound and listening. The
//! device process opens nothing; with a socket it accepts the clients itself.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::info;

/// The pty the console is on, for `vm.info` (one console per VM).
static PTY_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The path of the console's pty, if `--console pty`.
pub fn pty_path() -> Option<PathBuf> {
    PTY_PATH.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Where the console's host end is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleHost {
    /// The VMM's stdin and stdout.
    Tty,
    /// A new pty.
    Pty,
    /// A file, appended to.
    File(PathBuf),
    /// A Unix socket to bind and listen on.
    Socket(PathBuf),
}

impl ConsoleHost {
    /// The `bulkhead-console` options naming the descriptors [`open`] returns, in order, from
    /// `first` on.
    pub fn args(&self, first: RawFd) -> Vec<String> {
        let n = |i: RawFd| (first + i).to_string();
        let pairs: Vec<(&str, String)> = match self {
            ConsoleHost::Tty => vec![("--input-fd", n(0)), ("--output-fd", n(1))],
            ConsoleHost::Pty => vec![("--pty-fd", n(0)), ("--pty-slave-fd", n(1))],
            ConsoleHost::File(_) => vec![("--output-fd", n(0))],
            ConsoleHost::Socket(_) => vec![("--listen-fd", n(0))],
        };
        pairs
            .into_iter()
            .flat_map(|(o, v)| [o.to_string(), v])
            .collect()
    }
}

/// Why the host end could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot reopen the VMM's {0} for the console")]
    Stdio(&'static str, #[source] std::io::Error),
    #[error("cannot create a pty ({0})")]
    Pty(&'static str, #[source] std::io::Error),
    #[error("cannot open {} for the console's output", .0.display())]
    File(PathBuf, #[source] std::io::Error),
    #[error("{}: another process is listening on it", .0.display())]
    SocketInUse(PathBuf),
    #[error("refusing to replace {}, which exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
}

/// The terminal size (columns, rows) of the VMM's stdout or stdin, if either is a terminal.
pub fn terminal_size() -> Option<(u16, u16)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        // SAFETY: winsize is plain data, written by the ioctl.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A descriptor of this process's `fd` for the console, with an open file description of its
/// own where it can have one (a terminal or a pipe is reopened through /proc, so the device's
/// O_NONBLOCK stays off the VMM's stdin and stdout and the shell's terminal); otherwise (a file,
/// a socket) a duplicate.
fn own_copy(fd: RawFd, flags: libc::c_int, what: &'static str) -> Result<File, ConsoleError> {
    // SAFETY: stat is plain data, written by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(ConsoleError::Stdio(what, last_error()));
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFCHR || kind == libc::S_IFIFO {
        let path = format!("/proc/self/fd/{fd}\0");
        // SAFETY: a NUL-terminated path; the result is checked.
        let new = unsafe {
            libc::open(
                path.as_ptr().cast(),
                flags | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if new >= 0 {
            // SAFETY: a new descriptor owned by nobody else.
            return Ok(unsafe { File::from_raw_fd(new) });
        }
    }
    // SAFETY: F_DUPFD_CLOEXEC takes integers; the result is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(ConsoleError::Stdio(what, last_error()));
    }
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { File::from_raw_fd(dup) })
}

/// A new pty: (master, slave, the slave's path), the slave in raw mode (bytes pass unchanged
/// until a client sets its own mode).
fn open_pty() -> Result<(File, File, PathBuf), ConsoleError> {
    // SAFETY: posix_openpt with flags; the result is checked.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(ConsoleError::Pty("posix_openpt", last_error()));
    }
    // SAFETY: a new descriptor owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt and unlockpt on our pty master.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 {
        return Err(ConsoleError::Pty("grantpt", last_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(ConsoleError::Pty("unlockpt", last_error()));
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name into the buffer of the given length.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(ConsoleError::Pty(
            "ptsname_r",
            std::io::Error::from_raw_os_error(r),
        ));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    // SAFETY: a NUL-terminated path; the result is checked.
    let slave = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(ConsoleError::Pty("open the slave", last_error()));
    }
    // SAFETY: a new descriptor owned by nobody else.
    let slave = unsafe { File::from_raw_fd(slave) };
    // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw edits it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok((File::from(master), slave, path))
}

/// Binds and listens on `path`, replacing a stale socket nobody listens on.
fn listen(path: &Path) -> Result<File, ConsoleError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ConsoleError::NotASocket(path.into()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ConsoleError::SocketInUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| ConsoleError::Bind(path.into(), e))?;
    Ok(File::from(OwnedFd::from(listener)))
}

/// Opens the host end, in the order [`ConsoleHost::args`] names them.
pub fn open(host: &ConsoleHost, id: &str) -> Result<Vec<File>, ConsoleError> {
    match host {
        ConsoleHost::Tty => Ok(vec![
            own_copy(libc::STDIN_FILENO, libc::O_RDONLY, "stdin")?,
            own_copy(libc::STDOUT_FILENO, libc::O_WRONLY, "stdout")?,
        ]),
        ConsoleHost::Pty => {
            let (master, slave, path) = open_pty()?;
            let msg = format!("{id}: virtio console on pty {}", path.display());
            if log::log_enabled!(log::Level::Info) {
                info!("{msg}");
            } else {
                eprintln!("bulkhead: {msg}");
            }
            *PTY_PATH.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
            Ok(vec![master, slave])
        }
        ConsoleHost::File(path) => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map(|f| vec![f])
            .map_err(|e| ConsoleError::File(path.clone(), e)),
        ConsoleHost::Socket(path) => {
            let l = listen(path)?;
            info!("{id}: virtio console on socket {}", path.display());
            Ok(vec![l])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_args_name_descriptors_from_five() {
        assert_eq!(
            ConsoleHost::Tty.args(5).join(" "),
            "--input-fd 5 --output-fd 6"
        );
        assert_eq!(
            ConsoleHost::Pty.args(5).join(" "),
            "--pty-fd 5 --pty-slave-fd 6"
        );
        assert_eq!(
            ConsoleHost::File("/x".into()).args(5).join(" "),
            "--output-fd 5"
        );
        assert_eq!(
            ConsoleHost::Socket("/s".into()).args(5).join(" "),
            "--listen-fd 5"
        );
    }

    #[test]
    fn test_open_pty_gives_master_slave_and_path() {
        let files = match open(&ConsoleHost::Pty, "console") {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: no ptys here: {e}");
                return;
            }
        };
        assert_eq!(files.len(), 2);
        let path = pty_path().expect("path recorded");
        assert!(path.starts_with("/dev/pts"), "{}", path.display());
        // What the device writes to the master comes out of the slave unchanged.
        use std::io::{Read, Write};
        let (mut master, mut slave) = (&files[0], &files[1]);
        master.write_all(b"a\nb").expect("write");
        let mut buf = [0u8; 3];
        slave.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"a\nb", "raw mode: no translation");
    }

    #[test]
    fn test_open_socket_listens_and_refuses_live_or_non_socket_paths() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("bulkhead-console-vmm-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let files = open(&ConsoleHost::Socket(path.clone()), "console").expect("listen");
        assert!(UnixStream::connect(&path).is_ok());
        assert!(matches!(
            open(&ConsoleHost::Socket(path.clone()), "console"),
            Err(ConsoleError::SocketInUse(_))
        ));
        drop(files);
        // A stale socket (nobody listening) is replaced.
        let files = open(&ConsoleHost::Socket(path.clone()), "console").expect("stale replaced");
        drop(files);
        let _ = std::fs::remove_file(&path);
        let plain = dir.join(format!("bulkhead-console-vmm-{}.txt", std::process::id()));
        std::fs::write(&plain, b"x").expect("file");
        assert!(matches!(
            open(&ConsoleHost::Socket(plain.clone()), "console"),
            Err(ConsoleError::NotASocket(_))
        ));
        let files = open(&ConsoleHost::File(plain.clone()), "console").expect("file");
        use std::io::Write;
        (&files[0]).write_all(b"y").expect("append");
        assert_eq!(std::fs::read(&plain).expect("read"), b"xy");
        let _ = std::fs::remove_file(&plain);
    }
}
