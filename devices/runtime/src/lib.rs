//! `bulkhead-device-runtime`: what every Bulkhead device process shares.
//!
//! A device crate (`bulkhead-block`, later net, console, balloon) supplies a clap `Args` that
//! flattens [`RuntimeArgs`], a `Config` built from it with `TryFrom`, and a [`Device`] impl on
//! that `Config`; its `main` is [`main::<Args, Config>()`](main). The runtime then does, in
//! this order, with no way for the device to skip a step (see `docs/device-runtime.md`):
//!
//! 1. name the process `bulkhead-<kind>` (PR_SET_NAME), whatever it was executed as;
//! 2. parse the arguments (usage errors exit 2);
//! 3. adopt the descriptors it was given, each checked to be open and of the right type
//!    (socket 3: a unix stream socket; control 4: a unix SOCK_SEQPACKET socket; 5 and up: the
//!    device's), and close every other descriptor above 2;
//! 4. let the device build its backend from them ([`Device::open`]), and accept the frontend
//!    when started with `--socket-path`;
//! 5. apply landlock (no path reachable; `--landlock on` fails without landlock);
//! 6. apply the device's seccomp filter;
//! 7. start the control channel thread, then read the first vhost-user message.
//!
//! Exit status: 0 when the frontend disconnects in order, 2 on bad input, 1 on failure.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod args;
pub mod control;
pub mod fault;
pub mod inflight;
pub mod iovec;
pub mod loglimit;
pub mod rate;
pub mod seccomp;
pub mod server;
pub mod startup;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::error::Error as StdError;
use std::fmt::Display;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_sandbox::seccomp::{BpfProgram, SeccompError};
use log::{error, info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock};

pub use args::{ArgsError, RuntimeArgs, RuntimeConfig, SocketSource, Switch};
pub use control::{ControlHandler, MAX_MESSAGE};
pub use server::{
    queue_error_signal, retry_queue_after, serve_stream, signal_queue_error, QueueErrorSignal,
    ServeError, VhostUserConnection,
};

/// A device kind, as its validated configuration.
pub trait Device: Sized {
    /// The kind: the process is named `bulkhead-<KIND>`.
    const KIND: &'static str;
    /// The vhost-user backend the device serves.
    type Backend: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static;

    /// The common options.
    fn runtime(&self) -> &RuntimeConfig;

    /// The kind-specific descriptors the process was handed (block: its image, 5). Each must be
    /// open; [`Device::open`] checks its type.
    fn descriptors(&self) -> Vec<RawFd>;

    /// Builds the backend from the descriptors (or, when started by hand, the paths) in the
    /// configuration. Runs after every other descriptor was closed and before landlock and
    /// seccomp; nothing from the frontend has been read yet.
    fn open(self) -> Result<Opened<Self::Backend>, OpenError>;
}

/// A device ready to serve.
pub struct Opened<B> {
    pub backend: B,
    /// What the device serves, for the log (block: `disk PATH`).
    pub name: String,
    /// The device's seccomp filter, installed unless `--seccomp off`.
    pub seccomp: BpfProgram,
    /// Answers `stats` and device commands on the control channel; its `stats` is also logged
    /// when the frontend disconnects.
    pub control: Arc<dyn ControlHandler>,
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the device")]
pub struct OpenError {
    /// Whether the caller asked for something impossible (exit status 2) rather than a failure
    /// (exit status 1).
    pub bad_input: bool,
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

impl OpenError {
    pub fn bad_input(source: impl StdError + Send + Sync + 'static) -> OpenError {
        OpenError {
            bad_input: true,
            source: Box::new(source),
        }
    }

    pub fn failure(source: impl StdError + Send + Sync + 'static) -> OpenError {
        OpenError {
            bad_input: false,
            source: Box::new(source),
        }
    }
}

/// Errors of the runtime; the chain is printed once, by [`main`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad descriptor options")]
    Descriptors(#[source] ArgsError),
    #[error("descriptor {fd} is not an open unix stream socket")]
    AdoptSocketFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not an open unix SOCK_SEQPACKET socket")]
    AdoptControlFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not open")]
    AdoptDeviceFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("cannot close the descriptors the process was not given")]
    CloseDescriptors(#[source] io::Error),
    #[error(transparent)]
    Open(OpenError),
    #[error("cannot listen on {}", path.display())]
    BindSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to replace {}, which exists and is not a socket", path.display())]
    SocketPathInUse { path: PathBuf },
    #[error("cannot accept a frontend on {}", path.display())]
    AcceptFrontend {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--landlock on, but this kernel offers no landlock (not built in, or not in the `lsm=` list); refusing to serve without it (--landlock off opts out)")]
    LandlockUnavailable,
    #[error("cannot apply landlock; refusing to serve without it")]
    Landlock(#[source] landlock::RulesetError),
    #[error("cannot install the seccomp filter; refusing to serve without it")]
    ApplySeccomp(#[source] SeccompError),
    #[error("cannot start the control channel thread")]
    SpawnControl(#[source] io::Error),
    #[error("cannot serve the frontend")]
    Serve(#[source] ServeError),
    #[error("{0}")]
    Fault(String),
}

impl Error {
    /// Whether the error comes from what the caller asked for (exit status 2) rather than from
    /// a failure (exit status 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Descriptors(_)
            | Error::AdoptSocketFd { .. }
            | Error::AdoptControlFd { .. }
            | Error::AdoptDeviceFd { .. }
            | Error::BindSocket { .. }
            | Error::SocketPathInUse { .. }
            | Error::Fault(_) => true,
            Error::Open(e) => e.bad_input,
            _ => false,
        }
    }
}

/// The whole life of a device process: see the crate documentation. `main.rs` of a device is
/// `fn main() -> ExitCode { bulkhead_device_runtime::main::<Args, Config>() }` next to its
/// `Args` and `TryFrom<Args> for Config`.
pub fn main<A, C>() -> ExitCode
where
    A: clap::Parser,
    C: Device + TryFrom<A>,
    <C as TryFrom<A>>::Error: Display,
{
    startup::set_comm(C::KIND);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Usage errors exit with status 2 here.
    let args = A::parse();
    let config = match C::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    match start_backend(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", chain(&e));
            ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
        }
    }
}

/// `error: cause: cause ...`, the way the error chain is printed once.
pub fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Steps 3 to 7 of the start-up (see the crate documentation), then serves the frontend until
/// it disconnects.
pub fn start_backend<C: Device>(config: C) -> Result<(), Error> {
    let runtime = config.runtime().clone();
    let device_fds = config.descriptors();
    runtime
        .check_distinct(&device_fds)
        .map_err(Error::Descriptors)?;

    // Adopt what the process was given, then close everything else above 2.
    let stream = match runtime.socket {
        SocketSource::Fd(fd) => Some(UnixStream::from(
            startup::adopt_unix_socket(fd, libc::SOCK_STREAM)
                .map_err(|source| Error::AdoptSocketFd { fd, source })?,
        )),
        SocketSource::Path(_) => None,
    };
    let control = runtime
        .control_fd
        .map(|fd| {
            startup::adopt_unix_socket(fd, libc::SOCK_SEQPACKET)
                .map_err(|source| Error::AdoptControlFd { fd, source })
        })
        .transpose()?;
    for fd in &device_fds {
        startup::check_open(*fd).map_err(|source| Error::AdoptDeviceFd { fd: *fd, source })?;
    }
    if let Some(fd) = runtime.inflight_fd {
        startup::check_open(fd).map_err(|source| Error::AdoptDeviceFd { fd, source })?;
    }
    let mut keep = runtime.fds();
    keep.extend_from_slice(&device_fds);
    bulkhead_sandbox::close_other_fds(&keep).map_err(Error::CloseDescriptors)?;

    fault::set_kind(C::KIND);
    if let Some(f) = &runtime.fault {
        fault::arm_at_start(f).map_err(Error::Fault)?;
    }
    if let Some(fd) = runtime.inflight_fd {
        // The region GET_INFLIGHT_FD lays out: the VMM creates it (a device's jail cannot).
        inflight::adopt(fd);
    }
    let opened = config.open().map_err(Error::Open)?;
    let stream = match (stream, &runtime.socket) {
        (Some(stream), _) => stream,
        (None, SocketSource::Path(path)) => startup::accept_one(path)?,
        (None, SocketSource::Fd(fd)) => {
            return Err(Error::AdoptSocketFd {
                fd: *fd,
                source: io::Error::from_raw_os_error(libc::EBADF),
            })
        }
    };

    if runtime.landlock {
        let status = startup::apply_landlock()?;
        info!("landlock applied ({status:?}): no path is reachable");
    } else {
        warn!("LANDLOCK IS OFF (--landlock off): this device process can reach every path its jail has; never run it like this in production");
    }
    if runtime.seccomp {
        // A panic under the filter must abort with its message, not die of SIGSYS while std's
        // default hook resolves a backtrace.
        bulkhead_sandbox::seccomp::install_panic_hook();
        bulkhead_sandbox::seccomp::apply(&opened.seccomp).map_err(Error::ApplySeccomp)?;
        info!(
            "seccomp filter installed ({} instructions)",
            opened.seccomp.len()
        );
    } else {
        warn!("SECCOMP IS OFF (--seccomp off): this device process can make any system call; never run it like this in production");
    }

    if let Some(control) = control {
        let handler = opened.control.clone();
        bulkhead_sandbox::thread_builder()
            .name("control".into())
            .spawn(move || control::serve_control(control, handler))
            .map_err(Error::SpawnControl)?;
    }
    let served = serve_stream(stream, opened.backend).map_err(Error::Serve);
    // Logged under the device crate's name (`bulkhead_block: disk PATH: served reads=..`).
    let target = format!("bulkhead_{}", C::KIND.replace('-', "_"));
    info!(target: &target, "{}: served {}", opened.name, opened.control.stats());
    served
}
