//! `bulkhead-block`: Bulkhead's virtio-blk device process.
//!
//! A vhost-user backend serving one raw disk image to one frontend (the Bulkhead VMM, or any
//! vhost-user-blk frontend such as QEMU). The image and the socket are opened before serving;
//! afterwards the process touches the file system no more and works only on descriptors: the
//! image, the socket, the guest memory and the kick/call eventfds the frontend sends.

pub mod backend;
pub mod disk;
pub mod engine;
pub mod jail;
pub mod queue;
pub mod request;
pub mod seccomp;
pub mod vhost_user;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use log::{info, warn};

pub use backend::{BlockBackend, BlockDeviceConfig};
pub use disk::{DiskImage, OpenMode};
pub use jail::{jail, JailFds};
pub use queue::Serial;
pub use seccomp::seccomp_filter;

/// Where the vhost-user connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Listen on this path and serve the first frontend that connects.
    Path(PathBuf),
    /// An already connected unix stream socket inherited as this descriptor.
    Fd(RawFd),
}

/// Where the disk image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Open this path.
    Path(PathBuf),
    /// An image opened by the VMM and inherited as this descriptor; `name` names it in logs.
    Fd { fd: RawFd, name: PathBuf },
}

impl ImageSource {
    /// How the image is named in logs.
    pub fn name(&self) -> &std::path::Path {
        match self {
            ImageSource::Path(p) | ImageSource::Fd { name: p, .. } => p,
        }
    }
}

/// A validated configuration of the device process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub socket: SocketSource,
    pub image: ImageSource,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Serial,
    pub direct: bool,
    /// Install the seccomp filter before serving (off only for debugging, loudly logged).
    pub seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the disk image")]
    OpenDisk(#[source] disk::DiskError),
    #[error("descriptor {0} is not an open disk image")]
    AdoptImageFd(RawFd),
    #[error("cannot build the seccomp filter")]
    BuildSeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
    #[error("cannot install the seccomp filter; refusing to serve without it")]
    ApplySeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
    #[error("descriptor {fd} is not an open unix stream socket")]
    AdoptSocketFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
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
    #[error("cannot serve the frontend")]
    Serve(#[source] vhost_user::ServeError),
}

impl Error {
    /// Whether the error comes from what the caller asked for (exit status 2) rather than from
    /// a failure while serving (exit status 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::OpenDisk(_)
                | Error::AdoptImageFd(_)
                | Error::AdoptSocketFd { .. }
                | Error::BindSocket { .. }
                | Error::SocketPathInUse { .. }
        )
    }
}

/// Opens the image, obtains the frontend connection, installs the seccomp filter and serves
/// the frontend until it disconnects. Nothing the frontend sends is read before the filter is
/// in place.
pub fn start_backend(config: Config) -> Result<(), Error> {
    let mode = OpenMode {
        read_only: config.read_only,
        direct: config.direct,
    };
    let name = config.image.name().to_path_buf();
    let disk = match &config.image {
        ImageSource::Path(path) => DiskImage::open(path, mode),
        ImageSource::Fd { fd, name } => {
            if *fd < 0 {
                return Err(Error::AdoptImageFd(*fd));
            }
            // SAFETY: the parent handed this descriptor to the process as its image (checked
            // to be open with the right access mode by `from_fd`); nothing else in the process
            // uses or closes it, so the OwnedFd becomes its only owner.
            let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
            DiskImage::from_fd(owned, name, mode)
        }
    }
    .map_err(Error::OpenDisk)?;
    info!(
        "disk {}: {} sectors{}{}, {} queue(s) of {}",
        name.display(),
        disk.capacity_sectors(),
        if config.read_only { ", read-only" } else { "" },
        if config.direct { ", O_DIRECT" } else { "" },
        config.num_queues,
        config.queue_size
    );
    let backend = BlockBackend::new(BlockDeviceConfig {
        disk,
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        serial: config.serial,
    });

    let stream = match &config.socket {
        SocketSource::Fd(fd) => adopt_socket_fd(*fd)?,
        SocketSource::Path(path) => accept_one(path)?,
    };
    if config.seccomp {
        let filter = seccomp_filter().map_err(Error::BuildSeccomp)?;
        bulkhead_sandbox::seccomp::apply(&filter).map_err(Error::ApplySeccomp)?;
        info!("seccomp filter installed ({} instructions)", filter.len());
    } else {
        warn!("SECCOMP IS OFF (--seccomp off): this device process can make any system call; never run it like this in production");
    }
    let disk = backend.disk();
    let served = vhost_user::serve_stream(stream, backend).map_err(Error::Serve);
    info!("disk {}: served {}", name.display(), disk.stats);
    served
}

/// Takes ownership of inherited descriptor `fd` after checking it is a unix stream socket.
fn adopt_socket_fd(fd: RawFd) -> Result<UnixStream, Error> {
    let fail = |source| Error::AdoptSocketFd { fd, source };
    if fd < 0 {
        return Err(fail(io::Error::from_raw_os_error(libc::EBADF)));
    }
    let mut domain: libc::c_int = 0;
    let mut kind: libc::c_int = 0;
    for (option, value) in [(libc::SO_DOMAIN, &mut domain), (libc::SO_TYPE, &mut kind)] {
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, a valid c_int; an fd that
        // is not open or not a socket only makes it fail.
        let ret = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
    }
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an AF_UNIX SOCK_STREAM socket",
        )));
    }
    // Do not leak the connection into anything we might exec.
    // SAFETY: F_SETFD on an open descriptor (checked above) changes only its flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is an open unix stream socket (checked above) that the parent handed to this
    // process for exactly this purpose; nothing else in the process uses or closes it, so the
    // UnixStream becomes its only owner.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// Listens on `path`, accepts one frontend and removes the socket file again.
fn accept_one(path: &PathBuf) -> Result<UnixStream, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A stale socket from an earlier run.
            std::fs::remove_file(path).map_err(|source| Error::BindSocket {
                path: path.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(Error::SocketPathInUse { path: path.clone() }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::BindSocket {
        path: path.clone(),
        source,
    })?;
    info!("waiting for a frontend on {}", path.display());
    let accepted = loop {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    // Only one frontend is served: no one else may connect.
    let _ = std::fs::remove_file(path);
    let (stream, _) = accepted.map_err(|source| Error::AcceptFrontend {
        path: path.clone(),
        source,
    })?;
    info!("frontend connected");
    Ok(stream)
}
