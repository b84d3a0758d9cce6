//! `bulkhead-balloon`: Bulkhead's virtio-balloon device process.
//!
//! A vhost-user backend that takes guest memory back from the guest: the pages the guest puts
//! in the balloon (inflate) and, with FREE_PAGE_REPORTING, the free runs it reports are
//! released by punching holes in the guest-RAM files the frontend sent in its memory table
//! (`fallocate(PUNCH_HOLE|KEEP_SIZE)`), so the memory leaves the host for the VMM and every
//! device process at once. The target comes from the VMM on the control channel; STATS_VQ
//! gives the guest's memory statistics, DEFLATE_ON_OOM lets the guest take pages back when it
//! runs out. The process is handed nothing but its sockets: it opens nothing, and its only
//! `fallocate` is the hole punch (see `docs/balloon.md`).
//!
//! The process's life (descriptors, landlock, seccomp, the vhost-user server, the control
//! channel) is `bulkhead-device-runtime`'s; this crate is the device: its [`Config`], the
//! [`Device`] impl, the [`BalloonBackend`], the queues ([`queue`]) and the hole punching
//! ([`ram`]).
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod args;
pub mod backend;
pub mod jail;
pub mod queue;
pub mod ram;
pub mod seccomp;

use std::os::fd::RawFd;
use std::sync::Arc;

use bulkhead_device_runtime::{ControlHandler, Device, OpenError, Opened, RuntimeConfig};
use log::info;

pub use backend::{BalloonBackend, BalloonParams};
pub use seccomp::seccomp_filter;

/// A validated configuration of the device process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The options every device process takes (socket, control channel, seccomp, landlock).
    pub runtime: RuntimeConfig,
    pub params: BalloonParams,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up the balloon")]
    Backend(#[source] backend::BackendError),
    #[error("cannot build the seccomp filter")]
    BuildSeccomp(#[source] bulkhead_sandbox::seccomp::SeccompError),
}

/// Answers the control channel: `stats` (what the device did), `resize BYTES` (the new
/// target; the VMM then raises the configuration interrupt), `statistics` (the guest's
/// figures, Firecracker's names) and `poll-stats` (ask the guest for fresh figures now).
pub struct BalloonControl {
    pub backend: BalloonBackend,
}

impl ControlHandler for BalloonControl {
    fn stats(&self) -> String {
        self.backend.stats_line()
    }

    fn command(&self, name: &str, args: &str) -> Option<Result<String, String>> {
        match name {
            "resize" => Some(
                args.trim()
                    .parse::<u64>()
                    .map_err(|_| backend::TargetError::NotANumber(args.to_string()))
                    .and_then(|bytes| self.backend.set_target(bytes))
                    .map(|pages| format!("target_pages={pages}"))
                    .map_err(|e| e.to_string()),
            ),
            "statistics" => Some(Ok(self.backend.statistics_line())),
            "poll-stats" => {
                self.backend.poll_stats();
                Some(Ok(String::new()))
            }
            _ => None,
        }
    }
}

impl Device for Config {
    const KIND: &'static str = "balloon";
    type Backend = BalloonBackend;

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }

    fn descriptors(&self) -> Vec<RawFd> {
        // Guest RAM comes in the memory table; nothing else is handed in.
        Vec::new()
    }

    fn open(self) -> Result<Opened<BalloonBackend>, OpenError> {
        let p = &self.params;
        let name = format!("balloon {} MiB", p.size >> 20);
        info!(
            "{name}: deflate_on_oom={} free_page_reporting={} stats_polling_interval_s={} queue size {}",
            p.deflate_on_oom, p.free_page_reporting, p.stats_interval_s, p.queue_size
        );
        let backend =
            BalloonBackend::new(self.params).map_err(|e| OpenError::failure(Error::Backend(e)))?;
        let seccomp = seccomp_filter().map_err(|e| OpenError::failure(Error::BuildSeccomp(e)))?;
        let control = Arc::new(BalloonControl {
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
