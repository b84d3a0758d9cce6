//! The `VhostUserBackend` of the virtio-net device: features, config space, the control queue,
//! and one worker thread per queue pair.
//!
//! Queues: rx0, tx0, rx1, tx1, ..., then the control queue (index 2P). The runtime's vhost-user
//! server runs one thread per pair that waits on the pair's kick eventfds (the control queue
//! rides with pair 0); its `handle_event` forwards each kick to the pair's own worker, which
//! epolls the tap queue (edge-triggered), those kick notifications and an exit eventfd (a
//! throttled direction waits in the epoll timeout), and owns the pair's frame path. The control queue is served at once in
//! `handle_event` (drivers wait for its answer).
//!
//! The workers' epolls and eventfds are created with the backend (before the jail's seccomp
//! filter); the threads are started when the frontend sends the first memory table, on the
//! thread that serves the frontend, after landlock and seccomp, so they inherit both.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bulkhead_device_runtime::{queue_error_signal, QueueErrorSignal};
use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ctrl::{process_ctrl, Command};
use crate::datapath::{
    process_rx, process_tx, with_notifications_off, LogLimiter, Negotiated, QueueError, RxState,
    Stop, TxState, BATCH, LEGACY_HDR_LEN, RX_BUF_LEN,
};
use crate::readahead::ReadAhead;
use crate::stats::{add, Stats};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN};
use crate::writebatch::WriteBatch;
use bulkhead_device_runtime::rate::{LimiterConfig, RateLimiter};

/// Most queue pairs (2P + 1 queues must fit the runtime's 64-bit thread masks).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Largest queue size accepted on the command line.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// `struct virtio_net_config` up to and including `mtu`.
pub const CONFIG_SPACE_SIZE: usize = 12;
/// The largest offset + size GET_CONFIG may ask for (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_REQUEST: u64 = 0x1000;

/// The guest offloads (tap → guest), which `TUNSETOFFLOAD` follows.
pub const GUEST_OFFLOADS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO);

const TOKEN_TAP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
const TOKEN_EXIT: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("cannot notify the worker of queue pair {pair}")]
    NotifyWorker {
        pair: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the event loop of queue pair {pair}")]
    CreateWorker {
        pair: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the worker thread of queue pair {pair}")]
    SpawnWorker {
        pair: usize,
        #[source]
        source: io::Error,
    },
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> io::Error {
        io::Error::other(e)
    }
}

/// What the device is, fixed before serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    pub mac: [u8; 6],
    /// Advertised with VIRTIO_NET_F_MTU when set.
    pub mtu: Option<u16>,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub rx_limit: LimiterConfig,
    pub tx_limit: LimiterConfig,
}

/// The features the device offers.
pub fn offered_features(params: &NetParams) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN)
        | (1 << VIRTIO_NET_F_HOST_UFO)
        | GUEST_OFFLOADS
        | (1 << VIRTIO_NET_F_CTRL_VQ)
        | (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if params.mtu.is_some() {
        f |= 1 << VIRTIO_NET_F_MTU;
    }
    if params.queue_pairs > 1 {
        f |= 1 << VIRTIO_NET_F_MQ;
    }
    f
}

/// The `TUNSETOFFLOAD` flags for the guest offloads `features` turns on. The tap takes TSO
/// only with checksum offload, and ECN only with TSO.
pub fn tun_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= TUN_F_UFO;
    }
    flags
}

/// The rx and tx state of one pair, used by its worker (and reset by the frontend's thread).
#[derive(Default)]
struct PairState {
    rx: RxState,
    tx: TxState,
    rx_broken: bool,
    tx_broken: bool,
    /// Tx rounds in a row that used buffers without telling the driver (see `tx_round`).
    tx_unsignalled: u16,
}

/// What a pair's worker shares with the rest of the device.
struct Pair {
    tap: Tap,
    rx_kick: EventFd,
    tx_kick: EventFd,
    exit: EventFd,
    /// rx and tx vrings, learned at the first event of the pair.
    vrings: Mutex<Option<(VringRwLock, VringRwLock)>>,
    /// The vrings' error eventfds (VHOST_USER_SET_VRING_ERR), learned with them: a queue the
    /// guest broke reaches the guest as DEVICE_NEEDS_RESET through the frontend.
    errors: Mutex<Option<QueueErrorSignal>>,
    state: Mutex<PairState>,
    /// The worker's event loop, until its thread takes it.
    event_loop: Mutex<Option<EventLoop>>,
}

/// The worker's own epoll (throttled directions wait on its timeout).
struct EventLoop {
    epoll: Epoll,
}

struct Inner {
    params: NetParams,
    features: u64,
    acked: AtomicU64,
    /// Current `TUNSETOFFLOAD` flags.
    offloads: AtomicU32,
    active_pairs: AtomicU16,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    pairs: Vec<Pair>,
    rx_limiter: Option<Mutex<RateLimiter>>,
    tx_limiter: Option<Mutex<RateLimiter>>,
    stats: Stats,
    workers_started: AtomicBool,
    log: Mutex<LogLimiter>,
}

/// The virtio-net vhost-user backend. Clones share state.
#[derive(Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

impl NetBackend {
    /// A backend on `taps` (one per queue pair, in order). Creates every descriptor the
    /// workers need (eventfds, epolls) now, before the seccomp filter.
    pub fn new(params: NetParams, taps: Vec<Tap>) -> Result<NetBackend, BackendError> {
        let mut pairs = Vec::with_capacity(taps.len());
        for (pair, tap) in taps.into_iter().enumerate() {
            let create = |source: io::Error| BackendError::CreateWorker { pair, source };
            let rx_kick = EventFd::new(EFD_NONBLOCK).map_err(create)?;
            let tx_kick = EventFd::new(EFD_NONBLOCK).map_err(create)?;
            let exit = EventFd::new(EFD_NONBLOCK).map_err(create)?;
            let epoll = Epoll::new().map_err(create)?;
            let add = |fd: i32, events: EventSet, token: u64| {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            };
            add(
                tap.as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                TOKEN_TAP,
            )
            .map_err(create)?;
            add(rx_kick.as_raw_fd(), EventSet::IN, TOKEN_RX_KICK).map_err(create)?;
            add(tx_kick.as_raw_fd(), EventSet::IN, TOKEN_TX_KICK).map_err(create)?;
            add(exit.as_raw_fd(), EventSet::IN, TOKEN_EXIT).map_err(create)?;
            // The rx side reads the tap in batches where io_uring is there (datapath,
            // readahead); its ring is made now, before the seccomp filter.
            let rx = match ReadAhead::new(RX_BUF_LEN, &tap) {
                Ok(ahead) => RxState::with_read_ahead(ahead),
                Err(e) => {
                    info!("queue pair {pair}: io_uring unavailable ({e}); rx reads one frame per read");
                    RxState::default()
                }
            };
            // And the tx side writes them in batches (writebatch), on a ring of its own, where
            // the tap cannot refuse a write for room (its send buffer is unlimited).
            let tx = match tap.send_buffer() {
                Ok(i32::MAX) => match WriteBatch::new(&tap) {
                    Ok(batch) => TxState::with_write_batch(batch),
                    Err(e) => {
                        info!("queue pair {pair}: io_uring unavailable ({e}); tx writes one frame per writev");
                        TxState::default()
                    }
                },
                Ok(limit) => {
                    info!("queue pair {pair}: the tap's send buffer is limited ({limit} bytes); tx writes one frame per writev");
                    TxState::default()
                }
                Err(e) => {
                    info!("queue pair {pair}: cannot read the tap's send buffer ({e}); tx writes one frame per writev");
                    TxState::default()
                }
            };
            pairs.push(Pair {
                tap,
                rx_kick,
                tx_kick,
                exit,
                vrings: Mutex::new(None),
                errors: Mutex::new(None),
                state: Mutex::new(PairState {
                    rx,
                    tx,
                    ..PairState::default()
                }),
                event_loop: Mutex::new(Some(EventLoop { epoll })),
            });
        }
        let limiter = |c: &LimiterConfig| c.is_limit().then(|| Mutex::new(RateLimiter::new(c)));
        let rx_limiter = limiter(&params.rx_limit);
        let tx_limiter = limiter(&params.tx_limit);
        Ok(NetBackend {
            inner: Arc::new(Inner {
                features: offered_features(&params),
                acked: AtomicU64::new(0),
                offloads: AtomicU32::new(0),
                active_pairs: AtomicU16::new(params.queue_pairs),
                mem: RwLock::new(None),
                pairs,
                rx_limiter,
                tx_limiter,
                stats: Stats::default(),
                workers_started: AtomicBool::new(false),
                log: Mutex::new(LogLimiter::default()),
                params,
            }),
        })
    }

    /// What the device served so far.
    pub fn stats_line(&self) -> String {
        format!(
            "{} active_pairs={} offloads={:#x}",
            self.inner.stats,
            self.inner.active_pairs.load(Ordering::Relaxed),
            self.inner.offloads.load(Ordering::Relaxed)
        )
    }

    /// The device configuration space (`struct virtio_net_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let p = &self.inner.params;
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[..6].copy_from_slice(&p.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&p.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&p.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    /// Starts one worker thread per queue pair (once).
    pub fn start_workers(&self) -> Result<(), BackendError> {
        if self.inner.workers_started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for pair in 0..self.inner.pairs.len() {
            let Some(event_loop) = self.inner.pairs.get(pair).and_then(|p| {
                p.event_loop
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
            }) else {
                continue;
            };
            let inner = self.inner.clone();
            bulkhead_sandbox::thread_builder()
                .name(format!("net-pair{pair}"))
                .spawn(move || run_worker(&inner, pair, event_loop))
                .map_err(|source| BackendError::SpawnWorker { pair, source })?;
        }
        Ok(())
    }

    /// Stops the worker threads (they end at their next wake-up).
    pub fn stop_workers(&self) {
        for pair in &self.inner.pairs {
            let _ = pair.exit.write(1);
        }
    }

    /// The pairs on which rx runs (VQ_PAIRS_SET).
    pub fn active_pairs(&self) -> u16 {
        self.inner.active_pairs.load(Ordering::Acquire)
    }

    /// The current `TUNSETOFFLOAD` flags.
    pub fn offloads(&self) -> u32 {
        self.inner.offloads.load(Ordering::Acquire)
    }

    /// Runs one control queue round on `vring` (pair 0's thread).
    fn ctrl_round(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.inner.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return Ok(());
        }
        let inner = &self.inner;
        let result = with_notifications_off(state.get_queue_mut(), &mem, |q| {
            process_ctrl(q, &mem, &inner.stats, |command| inner.execute(command))
        });
        match result {
            Ok(round) => {
                if round.used {
                    notify(&mut state, &mem)?;
                }
                Ok(())
            }
            Err(e) => {
                add(&inner.stats.broken_queues, 1);
                // The frontend shows the guest DEVICE_NEEDS_RESET (this runs on the runtime's
                // worker thread, which knows the connection's error eventfds).
                let queue = 2 * inner.pairs.len();
                if !bulkhead_device_runtime::signal_queue_error(queue) {
                    debug!("queue {queue}: the frontend gave no error eventfd");
                }
                Err(io::Error::other(e))
            }
        }
    }
}

fn notify(
    state: &mut vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
) -> io::Result<()> {
    let needed = state
        .get_queue_mut()
        .needs_notification(mem)
        .map_err(io::Error::other)?;
    if needed {
        state.signal_used_queue()?;
    }
    Ok(())
}

impl Inner {
    fn memory(&self) -> Option<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let slot = self.mem.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|m| m.memory())
    }

    fn negotiated(&self) -> Negotiated {
        let acked = self.acked.load(Ordering::Acquire);
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        Negotiated {
            hdr_len: if has(VIRTIO_F_VERSION_1) || has(VIRTIO_NET_F_MRG_RXBUF) {
                VNET_HDR_LEN
            } else {
                LEGACY_HDR_LEN
            },
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: self.offloads.load(Ordering::Acquire) & TUN_F_CSUM != 0,
        }
    }

    /// Issues `TUNSETOFFLOAD` on every tap queue for the guest offloads in `features`.
    fn set_offloads(&self, features: u64) -> bool {
        let mut flags = tun_offloads(features);
        let mut ok = true;
        for (i, pair) in self.pairs.iter().enumerate() {
            let mut result = pair.tap.set_offload(flags);
            if result.is_err() && flags & TUN_F_UFO != 0 {
                // A kernel that no longer knows UFO refuses the flag.
                flags &= !TUN_F_UFO;
                result = pair.tap.set_offload(flags);
            }
            if let Err(e) = result {
                warn!("tap queue {i}: TUNSETOFFLOAD {flags:#x} failed: {e}");
                ok = false;
            }
        }
        self.offloads.store(flags, Ordering::Release);
        ok
    }

    /// Executes a control command; true for VIRTIO_NET_OK.
    fn execute(&self, command: Option<Command>) -> bool {
        let acked = self.acked.load(Ordering::Acquire);
        match command {
            Some(Command::QueuePairs(n)) => {
                if acked & (1 << VIRTIO_NET_F_MQ) == 0 || n == 0 || n > self.params.queue_pairs {
                    return false;
                }
                let before = self.active_pairs.swap(n, Ordering::AcqRel);
                info!("{n} queue pair(s) active");
                // Pairs that became active look at their tap again.
                for pair in self
                    .pairs
                    .iter()
                    .take(usize::from(n))
                    .skip(usize::from(before))
                {
                    let _ = pair.rx_kick.write(1);
                }
                true
            }
            Some(Command::GuestOffloads(bits)) => {
                if acked & (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) == 0
                    || bits & !(acked & GUEST_OFFLOADS) != 0
                {
                    return false;
                }
                let ok = self.set_offloads(bits);
                debug!(
                    "guest offloads {bits:#x}: tap offloads {:#x}",
                    self.offloads.load(Ordering::Relaxed)
                );
                ok
            }
            // The device does not filter: every receive mode and address table holds.
            Some(Command::RxMode { .. } | Command::MacTable { .. } | Command::MacAddr(_)) => true,
            None => false,
        }
    }

    fn pair(&self, p: usize) -> Option<&Pair> {
        self.pairs.get(p)
    }

    /// Queue `queue` (2p: rx, 2p+1: tx) of pair `p` is stopped until the driver resets it;
    /// the frontend learns it through the vring's error eventfd.
    fn mark_broken(&self, p: usize, queue: usize, e: &QueueError) {
        add(&self.stats.broken_queues, 1);
        let what = if queue & 1 == 0 { "rx" } else { "tx" };
        self.log
            .lock()
            .unwrap_or_else(|x| x.into_inner())
            .warn(format_args!(
                "queue pair {p}: {what} queue stopped until the driver resets it: {e}"
            ));
        let errors = self.pair(p).and_then(|pair| {
            pair.errors
                .lock()
                .unwrap_or_else(|x| x.into_inner())
                .clone()
        });
        if !errors.is_some_and(|errors| errors.signal(queue)) {
            debug!("queue {queue}: the frontend gave no error eventfd");
        }
    }

    /// One tx round of pair `p`; `None` when there is nothing to run.
    fn tx_round(&self, p: usize) -> Option<Stop> {
        let pair = self.pair(p)?;
        let vring = pair
            .vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?
            .1
            .clone();
        let mem = self.memory()?;
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return None;
        }
        let mut ps = pair.state.lock().unwrap_or_else(|e| e.into_inner());
        if ps.tx_broken {
            return None;
        }
        let neg = self.negotiated();
        let limiter = self.tx_limiter.as_ref();
        let tx = &mut ps.tx;
        let result = with_notifications_off(state.get_queue_mut(), &mem, |q| {
            process_tx(q, &mem, &pair.tap, tx, &neg, limiter, &self.stats)
        });
        match result {
            Ok(round) => {
                // While frames keep coming (the round stopped on its budget and the next one
                // follows at once) the driver hears of its sent buffers once per half ring,
                // not every round: each call can be a cross-CPU wake-up of a sleeping vCPU,
                // and half a ring still in the driver's hands keeps it from running dry
                // (telling it only once the whole ring is used leaves both sides waiting in
                // turn). Any other end of a round tells it at once.
                let rounds = (usize::from(state.get_queue().size()) / 2 / BATCH).max(1);
                if round.used || ps.tx_unsignalled > 0 {
                    if matches!(round.stop, Stop::Budget)
                        && usize::from(ps.tx_unsignalled) + 1 < rounds
                    {
                        ps.tx_unsignalled += 1;
                    } else {
                        ps.tx_unsignalled = 0;
                        if let Err(e) = notify(&mut state, &mem) {
                            warn!("queue pair {p}: cannot notify tx: {e}");
                        }
                    }
                }
                Some(round.stop)
            }
            Err(e) => {
                ps.tx_broken = true;
                self.mark_broken(p, 2 * p + 1, &e);
                None
            }
        }
    }

    /// One rx round of pair `p`.
    fn rx_round(&self, p: usize) -> Option<Stop> {
        if p >= usize::from(self.active_pairs.load(Ordering::Acquire)) {
            return None;
        }
        let pair = self.pair(p)?;
        let vring = pair
            .vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?
            .0
            .clone();
        let mem = self.memory()?;
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return None;
        }
        let mut ps = pair.state.lock().unwrap_or_else(|e| e.into_inner());
        if ps.rx_broken {
            return None;
        }
        let neg = self.negotiated();
        let result = process_rx(
            state.get_queue_mut(),
            &mem,
            &pair.tap,
            &mut ps.rx,
            &neg,
            self.rx_limiter.as_ref(),
            &self.stats,
        );
        match result {
            Ok(round) => {
                if round.used {
                    if let Err(e) = notify(&mut state, &mem) {
                        warn!("queue pair {p}: cannot notify rx: {e}");
                    }
                }
                Some(round.stop)
            }
            Err(e) => {
                ps.rx_broken = true;
                self.mark_broken(p, 2 * p, &e);
                None
            }
        }
    }
}

/// A pair's worker: see the module documentation. A throttled direction is retried when its
/// rate limiter says the tokens are there: the epoll wait's timeout, never a busy loop.
fn run_worker(inner: &Inner, p: usize, event_loop: EventLoop) {
    let Some(pair) = inner.pair(p) else {
        return;
    };
    let mut events = vec![EpollEvent::default(); 8];
    let mut rx_until: Option<Instant> = None;
    let mut tx_until: Option<Instant> = None;
    let mut tx_tap_full = false;
    let (mut rx_more, mut tx_more) = (false, false);
    loop {
        let timeout = if rx_more || tx_more {
            0
        } else {
            wait_ms(rx_until.into_iter().chain(tx_until).min())
        };
        let count = match event_loop.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("queue pair {p}: epoll failed: {e}");
                return;
            }
        };
        let (mut do_rx, mut do_tx) = (rx_more, tx_more);
        for event in events.iter().take(count) {
            match event.data() {
                TOKEN_TAP => {
                    let set = event.event_set();
                    if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                        do_rx = true;
                    }
                    if set.contains(EventSet::OUT) && tx_tap_full {
                        tx_tap_full = false;
                        do_tx = true;
                    }
                }
                TOKEN_RX_KICK => {
                    let _ = pair.rx_kick.read();
                    do_rx = true;
                }
                TOKEN_TX_KICK => {
                    let _ = pair.tx_kick.read();
                    do_tx = true;
                }
                TOKEN_EXIT => {
                    debug!("queue pair {p}: worker exiting");
                    return;
                }
                _ => {}
            }
        }
        let now = Instant::now();
        if rx_until.is_some_and(|t| t <= now) {
            rx_until = None;
            do_rx = true;
        }
        if tx_until.is_some_and(|t| t <= now) {
            tx_until = None;
            do_tx = true;
        }
        rx_more = false;
        tx_more = false;
        if do_tx && tx_until.is_none() && !tx_tap_full {
            match inner.tx_round(p) {
                Some(Stop::Budget) => tx_more = true,
                Some(Stop::Throttled(wait)) => tx_until = Some(Instant::now() + wait),
                Some(Stop::TapFull) => tx_tap_full = true,
                _ => {}
            }
        }
        if do_rx && rx_until.is_none() {
            match inner.rx_round(p) {
                Some(Stop::Budget) => rx_more = true,
                Some(Stop::Throttled(wait)) => rx_until = Some(Instant::now() + wait),
                _ => {}
            }
        }
    }
}

/// The epoll timeout until `deadline`, in whole milliseconds rounded up (-1: none). The
/// buckets keep exact time, so rounding up delays a frame but never lowers the rate.
fn wait_ms(deadline: Option<Instant>) -> i32 {
    let Some(deadline) = deadline else {
        return -1;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.inner.params.queue_pairs) + 1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.params.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
        self.inner.set_offloads(features);
        self.inner
            .active_pairs
            .store(self.inner.params.queue_pairs, Ordering::Release);
        info!(
            "features {features:#x}: tap offloads {:#x}",
            self.inner.offloads.load(Ordering::Relaxed)
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues know it (VringRwLock::set_queue_event_idx).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let end = u64::from(offset) + u64::from(size);
        if end > MAX_CONFIG_REQUEST {
            return Vec::new();
        }
        let config = self.config_space();
        (offset..offset + size)
            .map(|i| config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing is writable (the MAC only for legacy drivers, which this device does not
        // serve). Rate-limited: the guest decides how often this comes.
        self.inner
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn(format_args!(
                "ignoring config write of {} bytes at {offset}",
                buf.len()
            ));
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        // The first table: the jail is complete, start the workers under it.
        self.start_workers()?;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let pairs = u32::from(self.inner.params.queue_pairs);
        (0..pairs)
            .map(|p| {
                let mut mask = 0b11u64 << (2 * p);
                if p == 0 {
                    // The control queue rides with pair 0.
                    mask |= 1 << (2 * pairs);
                }
                mask
            })
            .collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let p = (queue_index / 2) as usize;
        if let Some(pair) = self.inner.pair(p) {
            let mut ps = pair.state.lock().unwrap_or_else(|e| e.into_inner());
            if queue_index & 1 == 0 {
                add(&self.inner.stats.rx_dropped, ps.rx.reset() as u64);
                ps.rx_broken = false;
            } else {
                ps.tx_broken = false;
            }
        }
        Ok(())
    }

    fn reset_device(&self) {
        for pair in &self.inner.pairs {
            let mut ps = pair.state.lock().unwrap_or_else(|e| e.into_inner());
            add(&self.inner.stats.rx_dropped, ps.rx.reset() as u64);
            ps.rx_broken = false;
            ps.tx_broken = false;
            ps.tx_unsignalled = 0;
        }
        self.inner
            .active_pairs
            .store(self.inner.params.queue_pairs, Ordering::Release);
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let pair = self
            .inner
            .pair(thread_id)
            .ok_or(BackendError::NoSuchQueue(thread_id))?;
        {
            let mut slot = pair.vrings.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                if let [rx, tx, ..] = vrings {
                    *slot = Some((rx.clone(), tx.clone()));
                }
            }
            let mut errors = pair.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.is_none() {
                *errors = queue_error_signal();
            }
        }
        let notify = |fd: &EventFd| {
            fd.write(1).map_err(|source| BackendError::NotifyWorker {
                pair: thread_id,
                source,
            })
        };
        match device_event {
            0 => notify(&pair.rx_kick)?,
            1 => notify(&pair.tx_kick)?,
            2 if thread_id == 0 => {
                let vring = vrings
                    .get(2)
                    .ok_or(BackendError::NoSuchQueue(2 * self.inner.pairs.len()))?;
                self.ctrl_round(vring)?;
            }
            other => return Err(BackendError::NoSuchQueue(usize::from(other)).into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
