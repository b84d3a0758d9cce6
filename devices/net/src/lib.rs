//! `bulkhead-net`: Bulkhead's virtio-net device process.
//!
//! A vhost-user backend that moves frames between one frontend's virtqueues (the Bulkhead VMM,
//! or any vhost-user-net frontend such as QEMU) and a tap device, one tap queue per queue pair.
//! The VMM opens and configures the tap queues and hands them in as descriptors 5 and up; the
//! process opens nothing, creates no socket, and its only ioctl is `TUNSETOFFLOAD`.
//!
//! The process's life (descriptors, landlock, seccomp, the vhost-user server, the control
//! channel) is `bulkhead-device-runtime`'s; this crate is the device: its [`Config`], the
//! [`Device`] impl that takes the tap queues, and the [`NetBackend`].
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod backend;
pub mod ctrl;
pub mod datapath;
pub mod jail;
pub mod readahead;
pub mod seccomp;
pub mod stats;
pub mod tap;
pub mod uring;
pub mod writebatch;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use bulkhead_device_runtime::{ControlHandler, Device, OpenError, Opened, RuntimeConfig};
use log::info;

pub use backend::{NetBackend, NetParams};
pub use bulkhead_device_runtime::rate::{BucketConfig, LimiterConfig};
pub use seccomp::seccomp_filter;
pub use tap::Tap;

/// Where the tap queues come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// Descriptors the VMM opened and configured, one per queue pair, in order.
    Fds(Vec<RawFd>),
    /// A tap opened by name (hand runs; before the jail).
    Name(String),
}

/// A validated configuration of the device process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The options every device process takes (socket, control channel, seccomp, landlock).
    pub runtime: RuntimeConfig,
    pub taps: TapSource,
    pub params: NetParams,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad tap queue")]
    Tap(#[source] tap::TapError),
    #[error("cannot set up the queue pairs")]
    Backend(#[source] backend::BackendError),
    #[error("cannot build the seccomp filter")]
    BuildSeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
}

/// Answers the control channel: `stats` gives what the device moved so far.
struct NetControl {
    backend: NetBackend,
}

impl ControlHandler for NetControl {
    fn stats(&self) -> String {
        self.backend.stats_line()
    }
}

/// `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Device for Config {
    const KIND: &'static str = "net";
    type Backend = NetBackend;

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }

    fn descriptors(&self) -> Vec<RawFd> {
        match &self.taps {
            TapSource::Fds(fds) => fds.clone(),
            TapSource::Name(_) => Vec::new(),
        }
    }

    fn open(self) -> Result<Opened<NetBackend>, OpenError> {
        let (taps, name) = match &self.taps {
            TapSource::Fds(fds) => {
                let mut taps = Vec::with_capacity(fds.len());
                for fd in fds {
                    // SAFETY: the runtime checked that each descriptor the parent handed the
                    // process as a tap queue is open and named once, and nothing else in the
                    // process uses or closes it: the OwnedFd becomes its only owner.
                    let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                    taps.push(Tap::check(owned).map_err(|e| OpenError::bad_input(Error::Tap(e)))?);
                }
                let names: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
                (taps, format!("tap fd {}", names.join(",")))
            }
            TapSource::Name(name) => (
                Tap::open_named(name, usize::from(self.params.queue_pairs))
                    .map_err(|e| OpenError::bad_input(Error::Tap(e)))?,
                format!("tap {name}"),
            ),
        };
        info!(
            "{name}: mac {}, {} queue pair(s) of {}{}",
            format_mac(&self.params.mac),
            self.params.queue_pairs,
            self.params.queue_size,
            self.params
                .mtu
                .map(|m| format!(", mtu {m}"))
                .unwrap_or_default()
        );
        let backend = NetBackend::new(self.params, taps)
            .map_err(|e| OpenError::failure(Error::Backend(e)))?;
        let seccomp = seccomp_filter().map_err(|e| OpenError::failure(Error::BuildSeccomp(e)))?;
        let control = Arc::new(NetControl {
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
