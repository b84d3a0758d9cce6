//! Virtio devices as the guest sees them: the PCI transport, fronting device processes that
//! speak vhost-user.
//!
//! Nothing here waits on a device process while the guest waits: the device's configuration
//! space is cached (refreshed when the backend says it changed), activation and reset run on a
//! per-device worker thread, and every vhost-user request has a deadline
//! ([`vhost_user::REQUEST_TIMEOUT`]) after which the device is failed (see [`FailureHandle`]).

pub(crate) mod fake_backend;
#[doc(hidden)]
pub mod fuzzing;
pub mod pci;
pub mod vhost_user;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub use pci::RestartHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::ratelimit::RateLimiter;

/// What the transport, the device's worker thread, its backend-request thread and the device
/// manager share about one device. Only atomics and short-held locks: no thread blocks on
/// another here.
pub(crate) struct DeviceShared {
    pub(crate) name: String,
    failed: AtomicBool,
    /// The VMM let go of the device (its transport was dropped): its end is expected.
    disconnected: AtomicBool,
    needs_reset: AtomicBool,
    /// Resets handed to the worker and not yet done: the status register reads non-zero
    /// until they are (the driver polls it after writing 0).
    resets_pending: AtomicU32,
    /// The device configuration space as last read from the backend.
    config: Mutex<Vec<u8>>,
    /// `config_generation` as the driver reads it.
    generation: AtomicU8,
    /// Signalled on a configuration change or a failure; bound to the configuration vector.
    pub(crate) config_irq: Arc<EventFd>,
    /// A duplicate of the vhost-user socket, for shutting it down from any thread without
    /// taking the frontend's lock (which a stuck request holds); replaced at each restart.
    socket: Mutex<Option<OwnedFd>>,
    /// The device process ended (or was killed for missing a deadline) and a restart may
    /// come: no request is sent, the guest's jobs are only recorded (see device::restart).
    down: AtomicBool,
    /// Set for a device that may be restarted: kills its current process. A device process
    /// that breaks the protocol or misses a deadline is then killed and restarted instead of
    /// failing the device.
    kill_hook: Mutex<Option<KillHook>>,
    /// A duplicate of the VMM's end of the backend-request channel (`SET_BACKEND_REQ_FD`),
    /// shut down with the device: its thread reads it, and the frontend-request handler keeps
    /// the other end open itself, so the device's end alone never ends that read.
    backend_req: Mutex<Option<OwnedFd>>,
    /// One error eventfd per queue, handed to the backend with VHOST_USER_SET_VRING_ERR at
    /// each activation: the backend signals one when the driver broke that queue (the device
    /// stopped it until reset); the device monitor watches them ([`QueueErrorWatch`]).
    pub(crate) queue_errors: Vec<EventFd>,
    /// Rate limit of the device's guest-triggered log lines.
    pub(crate) log_limit: RateLimiter,
}

impl DeviceShared {
    pub(crate) fn new(name: String, config_irq: Arc<EventFd>, socket: Option<OwnedFd>) -> Self {
        Self {
            name,
            failed: AtomicBool::new(false),
            disconnected: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
            resets_pending: AtomicU32::new(0),
            config: Mutex::new(Vec::new()),
            generation: AtomicU8::new(0),
            config_irq,
            socket: Mutex::new(socket),
            down: AtomicBool::new(false),
            kill_hook: Mutex::new(None),
            backend_req: Mutex::new(None),
            queue_errors: Vec::new(),
            log_limit: RateLimiter::per_device(),
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the device process is gone and a restart may come.
    pub(crate) fn down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Shuts the current vhost-user socket down: every request in flight or to come fails.
    fn shut_socket(&self) {
        if let Some(s) = &*self.socket.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: shutdown(2) on a descriptor this struct owns; no memory is passed.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// The device process misbehaved (missed a deadline, broke the protocol, its socket
    /// broke): a restartable device is marked down and its process killed (the monitor then
    /// restarts it, or gives up); any other device fails.
    pub(crate) fn process_failed(&self, reason: &str) {
        let hook = self
            .kill_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match hook {
            Some(kill) if !self.disconnected.load(Ordering::Acquire) && !self.failed() => {
                if !self.down.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "{}: device process lost: {reason}; killing it for a restart",
                        self.name
                    );
                    self.shut_socket();
                }
                kill();
            }
            _ => self.fail(reason),
        }
    }

    /// The device process ended and the monitor may restart it: no request is sent until
    /// [`Self::replace_socket`].
    pub(crate) fn lost(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            self.shut_socket();
        }
    }

    /// A new device process is connected on `socket` (a duplicate of the worker's stream).
    pub(crate) fn replace_socket(&self, socket: OwnedFd) {
        *self.socket.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket);
        self.down.store(false, Ordering::Release);
        if self.failed() || self.disconnected.load(Ordering::Acquire) {
            self.shut_socket();
        }
    }

    /// Makes the device restartable: `hook` kills its current process.
    pub(crate) fn set_kill_hook(&self, hook: KillHook) {
        *self.kill_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Whether the VMM let go of the device (its end is expected, never restarted).
    pub(crate) fn is_disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Acquire)
    }

    /// No more restarts: the device fails for good.
    pub(crate) fn give_up(&self, reason: &str) {
        *self.kill_hook.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.fail(reason);
    }

    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire) || self.failed()
    }

    /// The driver reset the device: NEEDS_RESET is answered (a failed device stays failed).
    pub(crate) fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::Release);
    }

    /// Sets DEVICE_NEEDS_RESET and raises the configuration interrupt.
    pub(crate) fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.config_irq.write(1);
    }

    /// Declares the device failed: its socket is shut down (every request in flight or to
    /// come fails at once), the guest sees DEVICE_NEEDS_RESET and a configuration interrupt.
    pub(crate) fn fail(&self, reason: &str) {
        // NEEDS_RESET and the interrupt first: whoever sees the device failed sees them too.
        self.set_needs_reset();
        if !self.failed.swap(true, Ordering::AcqRel) {
            if self.disconnected.load(Ordering::Acquire) {
                log::debug!("{}: after disconnect: {reason}", self.name);
            } else {
                log::error!("{}: device failed: {reason}", self.name);
            }
            self.shut_socket();
            self.shut_backend_req();
        }
    }

    /// Hands over the backend-request channel's socket; shut down at once if the device has
    /// already failed or been let go.
    pub(crate) fn set_backend_req(&self, socket: OwnedFd) {
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket);
        if self.failed() || self.disconnected.load(Ordering::Acquire) {
            self.shut_backend_req();
        }
    }

    /// Ends the backend-request thread's read: it sees end of file and returns.
    fn shut_backend_req(&self) {
        if let Some(s) = &*self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: shutdown(2) on a descriptor this struct owns; no memory is passed.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// The VMM lets go of the device: its socket is shut down, so the device process sees the
    /// frontend leave, finishes, reports what it served and exits. Its end is not a failure.
    pub(crate) fn disconnect(&self) {
        self.disconnected.store(true, Ordering::Release);
        self.shut_socket();
        self.shut_backend_req();
    }

    pub(crate) fn reset_started(&self) {
        self.resets_pending.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn reset_done(&self) {
        let _ = self
            .resets_pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub(crate) fn resetting(&self) -> bool {
        self.resets_pending.load(Ordering::Acquire) > 0
    }

    pub(crate) fn generation(&self) -> u8 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the cached configuration space; bytes past it read as zero.
    pub(crate) fn read_config(&self, offset: usize, data: &mut [u8]) {
        let cache = self.config.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| cache.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes into the cache what the driver wrote (the backend gets it too).
    pub(crate) fn write_config_cache(&self, offset: usize, data: &[u8]) {
        let mut cache = self.config.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = offset.checked_add(i).and_then(|o| cache.get_mut(o)) {
                *slot = *b;
            }
        }
    }

    /// Replaces the cache with what the backend reported; with `announce`, the generation
    /// moves on and the configuration interrupt fires.
    pub(crate) fn set_config(&self, config: Vec<u8>, announce: bool) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
        if announce {
            self.generation.fetch_add(1, Ordering::AcqRel);
            let _ = self.config_irq.write(1);
        }
    }
}

/// Kills a restartable device's current process (see [`DeviceShared::process_failed`]).
pub type KillHook = Arc<dyn Fn() + Send + Sync>;

/// Fails one device from anywhere (the device manager, when its process dies): the socket is
/// shut down, the guest sees DEVICE_NEEDS_RESET and a configuration interrupt, and the device
/// takes no new activation until it is replaced. Threads calling it need `shutdown` in their
/// seccomp filter.
#[derive(Clone)]
pub struct FailureHandle(pub(crate) Arc<DeviceShared>);

impl FailureHandle {
    /// Declares the device failed for `reason` (logged once).
    pub fn fail(&self, reason: &str) {
        self.0.fail(reason)
    }

    /// Whether the device has failed.
    pub fn is_failed(&self) -> bool {
        self.0.failed()
    }

    /// The backend stopped a queue the driver broke: the guest sees DEVICE_NEEDS_RESET and a
    /// configuration interrupt, and resetting the device starts it afresh. Not a failure.
    pub fn queue_broken(&self, queue: usize) {
        crate::log_limited!(
            self.0.log_limit,
            log::Level::Warn,
            "{}: the device stopped queue {queue}, which the driver broke; DEVICE_NEEDS_RESET",
            self.0.name
        );
        self.0.set_needs_reset();
    }
}

/// What the device monitor watches for a device's broken queues: duplicates of its queues'
/// error eventfds (index = queue) and the handle that tells the guest.
#[derive(Debug)]
pub struct QueueErrorWatch {
    /// The error eventfds, one per queue.
    pub fds: Vec<OwnedFd>,
    /// Calls [`FailureHandle::queue_broken`].
    pub handle: FailureHandle,
}

impl std::fmt::Debug for FailureHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureHandle")
            .field("device", &self.0.name)
            .field("failed", &self.0.failed())
            .finish()
    }
}
