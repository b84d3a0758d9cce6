//! `bulkhead-console`: Bulkhead's virtio-console device process.
//!
//! A vhost-user backend that serves one console port (`hvc0` in a Linux guest) to one frontend
//! (the Bulkhead VMM, or any vhost-user frontend) over a host end the VMM opened and handed in:
//! a file for output, its own standard streams, a pty master (with its slave), or a listening
//! unix socket on which the process accepts one client at a time. The process opens nothing
//! by path and creates no socket; `accept4` on the socket it was given is the only way it gets
//! a new descriptor from outside.
//!
//! The process's life (descriptors, landlock, seccomp, the vhost-user server, the control
//! channel) is `bulkhead-device-runtime`'s; this crate is the device: its [`Config`], the
//! [`Device`] impl that takes the host end, and the [`ConsoleBackend`].
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod backend;
pub mod jail;
pub mod queue;
pub mod seccomp;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use bulkhead_device_runtime::{ControlHandler, Device, OpenError, Opened, RuntimeConfig};
use log::info;

pub use backend::{ConsoleBackend, ConsoleParams, HostEnd};
pub use seccomp::seccomp_filter;

/// Which descriptors the host end is, by number (as the VMM handed them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostFds {
    /// `--output-fd N`: output only (a file opened for append).
    Output(RawFd),
    /// `--input-fd N --output-fd M`: the VMM's standard streams.
    Streams { input: RawFd, output: RawFd },
    /// `--pty-fd N [--pty-slave-fd M]`: a pty master, and its slave kept open.
    Pty { master: RawFd, slave: Option<RawFd> },
    /// `--listen-fd N`: a listening unix stream socket.
    Listener(RawFd),
}

impl HostFds {
    /// Every descriptor, in order.
    pub fn fds(&self) -> Vec<RawFd> {
        match *self {
            HostFds::Output(fd) | HostFds::Listener(fd) => vec![fd],
            HostFds::Streams { input, output } => vec![input, output],
            HostFds::Pty { master, slave } => std::iter::once(master).chain(slave).collect(),
        }
    }
}

/// A validated configuration of the device process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The options every device process takes (socket, control channel, seccomp, landlock).
    pub runtime: RuntimeConfig,
    pub host: HostFds,
    pub params: ConsoleParams,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("descriptor {fd} ({what}) is not {expected}")]
    HostFd {
        fd: RawFd,
        what: &'static str,
        expected: &'static str,
    },
    #[error("cannot inspect descriptor {fd}")]
    Inspect {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the console")]
    Backend(#[source] backend::BackendError),
    #[error("cannot build the seccomp filter")]
    BuildSeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
}

/// Answers the control channel: `stats`, and `resize COLS ROWS` (VIRTIO_CONSOLE_F_SIZE; the
/// VMM then re-reads the configuration space and interrupts the guest).
struct ConsoleControl {
    backend: ConsoleBackend,
}

/// Parses `COLS ROWS` (each 0 to 65535).
pub fn parse_size(args: &str) -> Result<(u16, u16), String> {
    let mut it = args.split_whitespace();
    let (Some(c), Some(r), None) = (it.next(), it.next(), it.next()) else {
        return Err("usage: resize COLS ROWS".into());
    };
    let n = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("{s:?} is not a size from 0 to 65535"))
    };
    Ok((n(c)?, n(r)?))
}

impl ControlHandler for ConsoleControl {
    fn stats(&self) -> String {
        self.backend.stats_line()
    }

    fn command(&self, name: &str, args: &str) -> Option<Result<String, String>> {
        match name {
            "resize" => Some(parse_size(args).map(|(cols, rows)| {
                self.backend.resize(cols, rows);
                format!("cols={cols} rows={rows}")
            })),
            _ => None,
        }
    }
}

/// The file type bits (`S_IFMT`) of `fd`.
fn file_type(fd: RawFd) -> Result<libc::mode_t, Error> {
    // SAFETY: stat is plain data, written by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(Error::Inspect {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.st_mode & libc::S_IFMT)
}

/// Whether `fd` is a listening unix stream socket.
fn is_listening_unix_socket(fd: RawFd) -> bool {
    let get = |opt: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes an int into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    get(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && get(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && get(libc::SO_ACCEPTCONN) == Some(1)
}

/// Sets O_NONBLOCK on `fd` (a descriptor this process was handed as its own).
fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: F_GETFL and F_SETFL on an open descriptor.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Takes ownership of `fd`, checking its type.
fn take(
    fd: RawFd,
    what: &'static str,
    check: fn(RawFd) -> Result<bool, Error>,
    expected: &'static str,
) -> Result<OwnedFd, Error> {
    if !check(fd)? {
        return Err(Error::HostFd { fd, what, expected });
    }
    // SAFETY: the runtime checked that each descriptor the parent handed the process is open
    // and named once, and nothing else in the process uses or closes it: the OwnedFd becomes
    // its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_stream(fd: RawFd) -> Result<bool, Error> {
    let t = file_type(fd)?;
    Ok(t != libc::S_IFDIR && t != libc::S_IFBLK)
}

fn is_char_device(fd: RawFd) -> Result<bool, Error> {
    Ok(file_type(fd)? == libc::S_IFCHR)
}

fn is_listener(fd: RawFd) -> Result<bool, Error> {
    Ok(is_listening_unix_socket(fd))
}

impl Config {
    /// The host end, from the descriptors (checked: a listening socket, a character device
    /// for a pty, no directory or block device for the rest). Pty masters, sockets, and
    /// outputs and inputs that are terminals or pipes (which the VMM opened or reopened for the
    /// process, so their file status flags are its own) are made non-blocking; files and
    /// duplicated sockets stay as they are.
    pub fn host_end(&self) -> Result<HostEnd, Error> {
        const ANY: &str = "a file, pipe, terminal or socket";
        let stream = |fd: RawFd, what: &'static str| -> Result<OwnedFd, Error> {
            let owned = take(fd, what, is_stream, ANY)?;
            if matches!(file_type(fd)?, libc::S_IFCHR | libc::S_IFIFO) {
                set_nonblocking(&owned);
            }
            Ok(owned)
        };
        Ok(match self.host {
            HostFds::Output(fd) => HostEnd::Output(stream(fd, "output")?),
            HostFds::Streams { input, output } => HostEnd::Streams {
                input: stream(input, "input")?,
                output: stream(output, "output")?,
            },
            HostFds::Pty { master, slave } => {
                let master = take(master, "pty master", is_char_device, "a character device")?;
                set_nonblocking(&master);
                let slave = slave
                    .map(|s| take(s, "pty slave", is_char_device, "a character device"))
                    .transpose()?;
                HostEnd::Pty { master, slave }
            }
            HostFds::Listener(fd) => {
                let l = take(
                    fd,
                    "listening socket",
                    is_listener,
                    "a listening unix stream socket",
                )?;
                set_nonblocking(&l);
                HostEnd::Listener(l)
            }
        })
    }
}

impl Device for Config {
    const KIND: &'static str = "console";
    type Backend = ConsoleBackend;

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }

    fn descriptors(&self) -> Vec<RawFd> {
        self.host.fds()
    }

    fn open(self) -> Result<Opened<ConsoleBackend>, OpenError> {
        let host = self.host_end().map_err(OpenError::bad_input)?;
        let name = match &self.host {
            HostFds::Output(fd) => format!("console output fd {fd}"),
            HostFds::Streams { input, output } => format!("console fds {input},{output}"),
            HostFds::Pty { master, .. } => format!("console pty fd {master}"),
            HostFds::Listener(fd) => format!("console socket fd {fd}"),
        };
        info!(
            "{name}: {}x{}, queue size {}",
            self.params.cols, self.params.rows, self.params.queue_size
        );
        let backend = ConsoleBackend::new(self.params, host)
            .map_err(|e| OpenError::failure(Error::Backend(e)))?;
        let seccomp = seccomp_filter().map_err(|e| OpenError::failure(Error::BuildSeccomp(e)))?;
        let control = Arc::new(ConsoleControl {
            backend: backend.clone(),
        });
        Ok(Opened {
            backend,
            name,
            seccomp,
            control,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_accepts_two_numbers_only() {
        assert_eq!(parse_size("80 24"), Ok((80, 24)));
        assert_eq!(parse_size(" 132   50 "), Ok((132, 50)));
        assert_eq!(parse_size("0 0"), Ok((0, 0)));
        for bad in ["", "80", "80 24 1", "80x24", "-1 24", "65536 1", "a b"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_control_resize_changes_config_space() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let backend = ConsoleBackend::new(
            ConsoleParams {
                cols: 80,
                rows: 24,
                queue_size: 64,
            },
            HostEnd::Output(a.into()),
        )
        .expect("backend");
        let control = ConsoleControl {
            backend: backend.clone(),
        };
        let reply = bulkhead_device_runtime::control::reply(&control, b"resize 100 40");
        assert_eq!(reply, "ok cols=100 rows=40");
        assert_eq!(&backend.config_space()[..4], &[100, 0, 40, 0]);
        let reply = bulkhead_device_runtime::control::reply(&control, b"resize 100");
        assert!(reply.starts_with("err usage"), "{reply}");
        let stats = bulkhead_device_runtime::control::reply(&control, b"stats");
        assert!(
            stats.contains("resizes=1") && stats.contains("cols=100 rows=40"),
            "{stats}"
        );
    }

    #[test]
    fn test_host_end_checks_descriptor_types() {
        let dir = std::env::temp_dir();
        let d = std::fs::File::open(&dir).expect("dir");
        let cfg = |host| Config {
            runtime: RuntimeConfig {
                socket: bulkhead_device_runtime::SocketSource::Fd(3),
                control_fd: None,
                inflight_fd: None,
                fault: None,
                seccomp: false,
                landlock: false,
            },
            host,
            params: ConsoleParams {
                cols: 80,
                rows: 24,
                queue_size: 64,
            },
        };
        use std::os::fd::IntoRawFd;
        let fd = d.into_raw_fd();
        assert!(matches!(
            cfg(HostFds::Output(fd)).host_end(),
            Err(Error::HostFd { .. })
        ));
        let (s, _peer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let sfd = s.as_raw_fd();
        assert!(
            matches!(
                cfg(HostFds::Listener(sfd)).host_end(),
                Err(Error::HostFd { .. })
            ),
            "a connected socket is not a listener"
        );
        let path = dir.join(format!("bulkhead-console-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let _ = std::fs::remove_file(&path);
        let lfd = l.into_raw_fd();
        assert!(matches!(
            cfg(HostFds::Listener(lfd)).host_end(),
            Ok(HostEnd::Listener(_))
        ));
        assert!(
            matches!(
                cfg(HostFds::Pty {
                    master: sfd,
                    slave: None
                })
                .host_end(),
                Err(Error::HostFd { .. })
            ),
            "a socket is not a pty"
        );
        // SAFETY: fd is the directory's descriptor, closed once here.
        unsafe { libc::close(fd) };
    }
}
