//! `bulkhead-block`: Bulkhead's virtio-blk device process.
//!
//! A vhost-user backend serving one raw disk image to one frontend (the Bulkhead VMM, or any
//! vhost-user-blk frontend such as QEMU). The image and the socket are opened before serving;
//! afterwards the process touches the file system no more and works only on descriptors: the
//! image, the socket, the guest memory and the kick/call eventfds the frontend sends.
//!
//! The process's life (descriptors, landlock, seccomp, the vhost-user server, the control
//! channel) is `bulkhead-device-runtime`'s; this crate is the device: its [`Config`], the
//! [`Device`] impl that opens the image, and the [`BlockBackend`].
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod args;
pub mod backend;
pub mod disk;
pub mod engine;
pub mod inflight;
pub mod jail;
pub mod mapped;
pub mod queue;
pub mod request;
pub mod seccomp;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use bulkhead_device_runtime::rate::LimiterConfig;
use bulkhead_device_runtime::{ControlHandler, Device, OpenError, Opened, RuntimeConfig};
use log::info;

pub use backend::{BlockBackend, BlockDeviceConfig};
pub use disk::{DiskImage, OpenMode};
pub use queue::Serial;
pub use seccomp::seccomp_filter;

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
    /// The options every device process takes (socket, control channel, seccomp, landlock).
    pub runtime: RuntimeConfig,
    pub image: ImageSource,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Serial,
    pub direct: bool,
    /// The device's rate limit (one limiter shared by its queues, as Firecracker's per device).
    pub rate_limit: LimiterConfig,
    /// `--poll-us`: microseconds a queue worker polls its ring before sleeping (0: off).
    pub poll_us: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the disk image")]
    OpenDisk(#[source] disk::DiskError),
    #[error("cannot build the seccomp filter")]
    BuildSeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
}

/// Answers the control channel: `stats` gives what the disk served so far.
struct BlockControl {
    disk: Arc<DiskImage>,
}

impl ControlHandler for BlockControl {
    fn stats(&self) -> String {
        self.disk.stats.to_string()
    }
}

impl Device for Config {
    const KIND: &'static str = "block";
    type Backend = BlockBackend;

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }

    fn descriptors(&self) -> Vec<RawFd> {
        match self.image {
            ImageSource::Fd { fd, .. } => vec![fd],
            ImageSource::Path(_) => Vec::new(),
        }
    }

    fn open(self) -> Result<Opened<BlockBackend>, OpenError> {
        let mode = OpenMode {
            read_only: self.read_only,
            direct: self.direct,
        };
        let name = self.image.name().to_path_buf();
        let disk = match &self.image {
            ImageSource::Path(path) => DiskImage::open(path, mode),
            ImageSource::Fd { fd, name } => {
                // SAFETY: the runtime checked that the descriptor the parent handed the process
                // as its image is open, and no one else in the process uses or closes it, so
                // the OwnedFd becomes its only owner (`from_fd` checks its access mode).
                let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                DiskImage::from_fd(owned, name, mode)
            }
        }
        .map_err(|e| OpenError::bad_input(Error::OpenDisk(e)))?;
        info!(
            "disk {}: {} sectors{}{}, {} queue(s) of {}{}",
            name.display(),
            disk.capacity_sectors(),
            if self.read_only { ", read-only" } else { "" },
            if self.direct { ", O_DIRECT" } else { "" },
            self.num_queues,
            self.queue_size,
            if self.poll_us > 0 {
                format!(", polling {} us", self.poll_us)
            } else {
                String::new()
            }
        );
        let backend = BlockBackend::new(BlockDeviceConfig {
            disk,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            serial: self.serial,
            rate_limit: self.rate_limit,
            poll: std::time::Duration::from_micros(u64::from(self.poll_us)),
        });
        let seccomp = seccomp_filter().map_err(|e| OpenError::failure(Error::BuildSeccomp(e)))?;
        let control = Arc::new(BlockControl {
            disk: backend.disk(),
        });
        Ok(Opened {
            backend,
            name: format!("disk {}", name.display()),
            seccomp,
            control,
        })
    }
}
