//! The `VhostUserBackend` of the virtio-console device: features, configuration space,
//! emergency writes, and the worker thread that moves bytes between the two queues and the host
//! end the VMM handed in.
//!
//! Queues: receiveq0 (0) and transmitq0 (1); no MULTIPORT, so no control queues. The runtime's
//! vhost-user server runs one thread for both; its `handle_event` forwards each kick to the
//! device's own worker (`console-io`), which epolls the kick eventfds, the host end's
//! descriptors (level-triggered, with the interest following the buffers: input only while the
//! input buffer has room, output only while there is output) and an exit eventfd.
//!
//! The worker's epoll and eventfds are created with the backend (before the seccomp filter);
//! its thread starts at the first memory table, after landlock and seccomp, so it runs under
//! both.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bulkhead_device_runtime::{queue_error_signal, QueueErrorSignal};
use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::queue::{drain_tx, fill_rx, QueueError};

/// VIRTIO_CONSOLE_F_SIZE: the configuration space holds the console's columns and rows.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// VIRTIO_CONSOLE_F_MULTIPORT (not offered: one port, no control queues).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// VIRTIO_CONSOLE_F_EMERG_WRITE: the driver may write a character to `emerg_wr` at any time.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// `struct virtio_console_config`: cols (le16), rows (le16), max_nr_ports (le32), emerg_wr
/// (le32).
pub const CONFIG_SPACE_SIZE: usize = 12;
/// Offset of `emerg_wr` in the configuration space.
pub const EMERG_WR_OFFSET: u32 = 8;
/// The largest offset + size GET_CONFIG may ask for (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_REQUEST: u64 = 0x1000;

/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
/// Largest queue size.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Output (guest to host) held while the host end is slow or absent; beyond it the guest waits.
pub const OUTPUT_BUFFER: usize = 64 << 10;
/// Input (host to guest) read ahead while the guest has no buffers; beyond it the host end is
/// not read (a socket or pty writer is then held up by its own buffers).
pub const INPUT_BUFFER: usize = 16 << 10;
/// Emergency-write characters held beside the output buffer (a configuration write cannot be
/// made to wait); beyond it they are counted as dropped.
pub const EMERG_BUFFER: usize = 4 << 10;

const TOKEN_RX_KICK: u64 = u64::MAX;
const TOKEN_TX_KICK: u64 = u64::MAX - 1;
const TOKEN_EXIT: u64 = u64::MAX - 2;

/// The host end of the console, as the VMM handed it (the process opens nothing).
#[derive(Debug)]
pub enum HostEnd {
    /// Output only (`--console file=PATH`): a file the VMM opened for append.
    Output(OwnedFd),
    /// The VMM's terminal or standard streams (`--console tty`): input and output.
    Streams { input: OwnedFd, output: OwnedFd },
    /// A pty master (`--console pty`), with its slave kept open (so the master never reads a
    /// hang-up while nobody has the slave open).
    Pty {
        master: OwnedFd,
        slave: Option<OwnedFd>,
    },
    /// A listening unix socket (`--console socket=PATH`): one client at a time.
    Listener(OwnedFd),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("cannot notify the console worker")]
    NotifyWorker(#[source] io::Error),
    #[error("cannot create the console worker's event loop")]
    CreateWorker(#[source] io::Error),
    #[error("cannot start the console worker thread")]
    SpawnWorker(#[source] io::Error),
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> io::Error {
        io::Error::other(e)
    }
}

/// What the device moved so far.
#[derive(Default)]
pub struct Stats {
    /// Bytes the guest transmitted (taken from transmitq0).
    pub tx_bytes: AtomicU64,
    /// Bytes written to the host end.
    pub out_bytes: AtomicU64,
    /// Bytes read from the host end.
    pub in_bytes: AtomicU64,
    /// Bytes given to the guest (receiveq0).
    pub rx_bytes: AtomicU64,
    /// Emergency-write characters.
    pub emerg_bytes: AtomicU64,
    /// Times the guest was held up because the output buffer was full.
    pub throttled: AtomicU64,
    /// Socket clients accepted.
    pub clients: AtomicU64,
    /// Bytes lost: emergency writes beyond their buffer, output the host end refused for good.
    pub dropped: AtomicU64,
    /// Queues stopped because the driver broke them.
    pub broken_queues: AtomicU64,
    /// Resizes.
    pub resizes: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "tx_bytes={} out_bytes={} in_bytes={} rx_bytes={} emerg_bytes={} throttled={} \
             clients={} dropped={} broken_queues={} resizes={}",
            g(&self.tx_bytes),
            g(&self.out_bytes),
            g(&self.in_bytes),
            g(&self.rx_bytes),
            g(&self.emerg_bytes),
            g(&self.throttled),
            g(&self.clients),
            g(&self.dropped),
            g(&self.broken_queues),
            g(&self.resizes),
        )
    }
}

/// What the device is, fixed before serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleParams {
    pub cols: u16,
    pub rows: u16,
    pub queue_size: u16,
}

/// The features the device offers.
pub fn offered_features() -> u64 {
    (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_CONSOLE_F_SIZE)
        | (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The configuration space for a console of `cols` x `rows`.
pub fn config_space(cols: u16, rows: u16) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    c[0..2].copy_from_slice(&cols.to_le_bytes());
    c[2..4].copy_from_slice(&rows.to_le_bytes());
    // max_nr_ports: only meaningful with MULTIPORT; one port.
    c[4..8].copy_from_slice(&1u32.to_le_bytes());
    c
}

struct Inner {
    params: ConsoleParams,
    /// cols << 16 | rows.
    size: AtomicU32,
    acked: AtomicU64,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// receiveq0 and transmitq0, learned at the first kick.
    vrings: Mutex<Option<(VringRwLock, VringRwLock)>>,
    errors: Mutex<Option<QueueErrorSignal>>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    exit: EventFd,
    /// Emergency-write characters, for the worker to put in the output.
    emerg: Mutex<VecDeque<u8>>,
    /// The host end and the worker's epoll, until the worker thread takes them.
    worker: Mutex<Option<(HostEnd, Epoll)>>,
    started: AtomicBool,
    rx_broken: AtomicBool,
    tx_broken: AtomicBool,
    config_write_warned: AtomicBool,
    stats: Stats,
}

/// The virtio-console vhost-user backend. Clones share state.
#[derive(Clone)]
pub struct ConsoleBackend {
    inner: Arc<Inner>,
}

impl ConsoleBackend {
    /// A backend on `host`. Creates every descriptor the worker needs now, before the seccomp
    /// filter.
    pub fn new(params: ConsoleParams, host: HostEnd) -> Result<ConsoleBackend, BackendError> {
        let create = BackendError::CreateWorker;
        let rx_kick = EventFd::new(EFD_NONBLOCK).map_err(create)?;
        let tx_kick = EventFd::new(EFD_NONBLOCK).map_err(create)?;
        let exit = EventFd::new(EFD_NONBLOCK).map_err(create)?;
        let epoll = Epoll::new().map_err(create)?;
        for (fd, token) in [
            (rx_kick.as_raw_fd(), TOKEN_RX_KICK),
            (tx_kick.as_raw_fd(), TOKEN_TX_KICK),
            (exit.as_raw_fd(), TOKEN_EXIT),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(create)?;
        }
        Ok(ConsoleBackend {
            inner: Arc::new(Inner {
                size: AtomicU32::new(pack(params.cols, params.rows)),
                params,
                acked: AtomicU64::new(0),
                mem: RwLock::new(None),
                vrings: Mutex::new(None),
                errors: Mutex::new(None),
                rx_kick,
                tx_kick,
                exit,
                emerg: Mutex::new(VecDeque::new()),
                worker: Mutex::new(Some((host, epoll))),
                started: AtomicBool::new(false),
                rx_broken: AtomicBool::new(false),
                tx_broken: AtomicBool::new(false),
                config_write_warned: AtomicBool::new(false),
                stats: Stats::default(),
            }),
        })
    }

    /// What the device served so far, and its size.
    pub fn stats_line(&self) -> String {
        let (cols, rows) = self.size();
        format!("{} cols={cols} rows={rows}", self.inner.stats)
    }

    /// The console's size (columns, rows).
    pub fn size(&self) -> (u16, u16) {
        unpack(self.inner.size.load(Ordering::Acquire))
    }

    /// Sets the console's size. The frontend (the VMM, which asked for it on the control
    /// channel) re-reads the configuration space and raises the configuration interrupt.
    pub fn resize(&self, cols: u16, rows: u16) {
        self.inner.size.store(pack(cols, rows), Ordering::Release);
        add(&self.inner.stats.resizes, 1);
        info!("console size {cols}x{rows}");
    }

    /// The configuration space now.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let (cols, rows) = self.size();
        config_space(cols, rows)
    }

    /// An emergency write of `c` (the driver wrote `emerg_wr`).
    pub fn emergency_write(&self, c: u8) {
        let mut emerg = self.inner.emerg.lock().unwrap_or_else(|e| e.into_inner());
        if emerg.len() >= EMERG_BUFFER {
            add(&self.inner.stats.dropped, 1);
            return;
        }
        emerg.push_back(c);
        add(&self.inner.stats.emerg_bytes, 1);
        drop(emerg);
        let _ = self.inner.tx_kick.write(1);
    }

    /// Starts the worker thread (once).
    pub fn start_worker(&self) -> Result<(), BackendError> {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some((host, epoll)) = self
            .inner
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let inner = self.inner.clone();
        bulkhead_sandbox::thread_builder()
            .name("console-io".into())
            .spawn(move || Worker::new(inner, host, epoll).run())
            .map_err(BackendError::SpawnWorker)?;
        Ok(())
    }

    /// Stops the worker thread (it ends at its next wake-up).
    pub fn stop_worker(&self) {
        let _ = self.inner.exit.write(1);
    }
}

fn pack(cols: u16, rows: u16) -> u32 {
    u32::from(cols) << 16 | u32::from(rows)
}

fn unpack(v: u32) -> (u16, u16) {
    ((v >> 16) as u16, v as u16)
}

impl Inner {
    fn memory(&self) -> Option<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let slot = self.mem.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|m| m.memory())
    }

    fn vring(&self, queue: usize) -> Option<VringRwLock> {
        let slot = self.vrings.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .map(|(rx, tx)| if queue == RX_QUEUE { rx } else { tx }.clone())
    }

    /// The driver broke `queue`: it stops until the driver resets it, and the frontend shows
    /// the guest DEVICE_NEEDS_RESET.
    fn mark_broken(&self, queue: usize, e: &QueueError) {
        let flag = if queue == RX_QUEUE {
            &self.rx_broken
        } else {
            &self.tx_broken
        };
        if flag.swap(true, Ordering::AcqRel) {
            return;
        }
        add(&self.stats.broken_queues, 1);
        warn!("queue {queue} stopped until the driver resets it: {e}");
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|x| x.into_inner())
            .clone();
        if !errors.is_some_and(|errors| errors.signal(queue)) {
            debug!("queue {queue}: the frontend gave no error eventfd");
        }
    }

    /// Moves transmitq0 into `out`; true if any byte moved.
    fn tx_round(&self, out: &mut VecDeque<u8>, taken: &mut u64) -> bool {
        if self.tx_broken.load(Ordering::Acquire) {
            return false;
        }
        let (Some(vring), Some(mem)) = (self.vring(TX_QUEUE), self.memory()) else {
            return false;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        match drain_tx(state.get_queue_mut(), &mem, out, OUTPUT_BUFFER, taken) {
            Ok(round) => {
                add(&self.stats.tx_bytes, round.bytes as u64);
                if round.full {
                    add(&self.stats.throttled, 1);
                }
                if round.used {
                    notify(&mut state, &mem, TX_QUEUE);
                }
                round.bytes > 0 || round.used
            }
            Err(e) => {
                self.mark_broken(TX_QUEUE, &e);
                false
            }
        }
    }

    /// Gives receiveq0 what waits in `input`.
    fn rx_round(&self, input: &mut VecDeque<u8>) {
        if input.is_empty() || self.rx_broken.load(Ordering::Acquire) {
            return;
        }
        let (Some(vring), Some(mem)) = (self.vring(RX_QUEUE), self.memory()) else {
            return;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        match fill_rx(state.get_queue_mut(), &mem, input) {
            Ok(round) => {
                add(&self.stats.rx_bytes, round.bytes as u64);
                if round.used {
                    notify(&mut state, &mem, RX_QUEUE);
                }
            }
            Err(e) => self.mark_broken(RX_QUEUE, &e),
        }
    }
}

fn notify(
    state: &mut vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
    queue: usize,
) {
    let needed = state
        .get_queue_mut()
        .needs_notification(mem)
        .unwrap_or(true);
    if needed {
        if let Err(e) = state.signal_used_queue() {
            warn!("queue {queue}: cannot notify the guest: {e}");
        }
    }
}

/// The result of a non-blocking read or write on the host end.
enum Io {
    /// Bytes moved.
    Moved(usize),
    /// Nothing now (EAGAIN).
    Later,
    /// The peer is gone (end of file, EPIPE, ECONNRESET, EIO on a pty or terminal).
    Gone,
    /// Another error.
    Failed(io::Error),
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> Io {
    // SAFETY: read into a valid, writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    io_result(n)
}

fn write_fd(fd: RawFd, buf: &[u8]) -> Io {
    // SAFETY: write from a valid buffer of buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    io_result(n)
}

fn io_result(n: isize) -> Io {
    match n {
        0 => Io::Gone,
        n if n > 0 => Io::Moved(n as usize),
        _ => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Io::Later,
                Some(libc::EPIPE | libc::ECONNRESET | libc::EIO | libc::ENOTCONN) => Io::Gone,
                _ => Io::Failed(e),
            }
        }
    }
}

/// Accepts one client on `listener` (non-blocking, close-on-exec).
fn accept(listener: RawFd) -> io::Result<Option<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 with no address buffers; the result is checked.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: accept4 returned a new descriptor owned by nobody else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The `console-io` thread's state.
struct Worker {
    inner: Arc<Inner>,
    epoll: Epoll,
    /// Host descriptors registered with the epoll, and the events asked for.
    registered: BTreeMap<RawFd, EventSet>,
    /// Host descriptors epoll refuses (regular files): always ready.
    unpollable: Vec<RawFd>,
    /// Where input comes from and output goes (for a socket: the client).
    input: Option<OwnedFd>,
    output: Option<OwnedFd>,
    /// Input and output are one descriptor (a pty master, a socket client).
    duplex: bool,
    listener: Option<OwnedFd>,
    /// Kept open, never used (a pty's slave).
    _keep: Option<OwnedFd>,
    out: VecDeque<u8>,
    input_buf: VecDeque<u8>,
    /// Bytes of the chain at the head of transmitq0 already in `out`.
    taken: u64,
    output_failed: bool,
}

impl Worker {
    fn new(inner: Arc<Inner>, host: HostEnd, epoll: Epoll) -> Worker {
        let mut w = Worker {
            inner,
            epoll,
            registered: BTreeMap::new(),
            unpollable: Vec::new(),
            input: None,
            output: None,
            duplex: false,
            listener: None,
            _keep: None,
            out: VecDeque::new(),
            input_buf: VecDeque::new(),
            taken: 0,
            output_failed: false,
        };
        match host {
            HostEnd::Output(fd) => w.output = Some(fd),
            HostEnd::Streams { input, output } => {
                w.input = Some(input);
                w.output = Some(output);
            }
            HostEnd::Pty { master, slave } => {
                w.input = Some(master);
                w.duplex = true;
                w._keep = slave;
            }
            HostEnd::Listener(l) => w.listener = Some(l),
        }
        w
    }

    fn reader(&self) -> Option<RawFd> {
        self.input.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn writer(&self) -> Option<RawFd> {
        if self.duplex {
            self.reader()
        } else {
            self.output.as_ref().map(AsRawFd::as_raw_fd)
        }
    }

    /// The events each host descriptor should be watched for now.
    fn wanted(&self) -> BTreeMap<RawFd, EventSet> {
        let mut want: BTreeMap<RawFd, EventSet> = BTreeMap::new();
        if let Some(r) = self.reader() {
            let e = want.entry(r).or_insert(EventSet::empty());
            if self.input_buf.len() < INPUT_BUFFER {
                *e |= EventSet::IN;
            }
        }
        if let Some(w) = self.writer() {
            let e = want.entry(w).or_insert(EventSet::empty());
            if !self.out.is_empty() {
                *e |= EventSet::OUT;
            }
        }
        if let Some(l) = &self.listener {
            if self.input.is_none() {
                want.insert(l.as_raw_fd(), EventSet::IN);
            }
        }
        // A descriptor with nothing to wait for is not watched at all: epoll reports a hang-up
        // whatever the events asked for, and one that cannot be acted on (the input buffer
        // full, nothing to write) would wake the worker in a loop. It is seen once there is
        // room or output again.
        want.retain(|_, events| !events.is_empty());
        want
    }

    /// Brings the epoll's interest in line with [`Worker::wanted`].
    fn sync_interest(&mut self) {
        let want = self.wanted();
        let gone: Vec<RawFd> = self
            .registered
            .keys()
            .filter(|fd| !want.contains_key(fd))
            .copied()
            .collect();
        for fd in gone {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.registered.remove(&fd);
        }
        for (fd, events) in want {
            if self.unpollable.contains(&fd) {
                continue;
            }
            let op = match self.registered.get(&fd) {
                Some(e) if *e == events => continue,
                Some(_) => ControlOperation::Modify,
                None => ControlOperation::Add,
            };
            match self.epoll.ctl(op, fd, EpollEvent::new(events, fd as u64)) {
                Ok(()) => {
                    self.registered.insert(fd, events);
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    // A regular file: always ready, never waited for.
                    self.unpollable.push(fd);
                }
                Err(e) => error!("cannot watch descriptor {fd}: {e}"),
            }
        }
    }

    /// Whether something unpollable has work now (then the wait does not block).
    fn ready_without_events(&self) -> bool {
        let r = self
            .reader()
            .is_some_and(|r| self.unpollable.contains(&r) && self.input_buf.len() < INPUT_BUFFER);
        let w = self
            .writer()
            .is_some_and(|w| self.unpollable.contains(&w) && !self.out.is_empty());
        r || w
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            self.sync_interest();
            let timeout = if self.ready_without_events() { 0 } else { -1 };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("console worker: epoll failed: {e}");
                    return;
                }
            };
            let mut readable = false;
            let mut writable = false;
            for event in events.iter().take(count) {
                match event.data() {
                    TOKEN_RX_KICK => {
                        let _ = self.inner.rx_kick.read();
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.inner.tx_kick.read();
                    }
                    TOKEN_EXIT => {
                        debug!("console worker exiting");
                        return;
                    }
                    fd => {
                        let fd = fd as RawFd;
                        let set = event.event_set();
                        if self.listener.as_ref().is_some_and(|l| l.as_raw_fd() == fd) {
                            self.accept_client();
                            continue;
                        }
                        if Some(fd) == self.reader()
                            && set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                        {
                            readable = true;
                        }
                        if Some(fd) == self.writer()
                            && set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP)
                        {
                            writable = true;
                        }
                    }
                }
            }
            if self.reader().is_some_and(|r| self.unpollable.contains(&r)) {
                readable = true;
            }
            if self.writer().is_some_and(|w| self.unpollable.contains(&w)) {
                writable = true;
            }
            if readable {
                self.read_input();
            }
            self.pump_output(writable);
            self.inner.rx_round(&mut self.input_buf);
        }
    }

    fn accept_client(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        if self.input.is_some() {
            return;
        }
        match accept(listener.as_raw_fd()) {
            Ok(Some(client)) => {
                add(&self.inner.stats.clients, 1);
                info!(
                    "console client connected ({} bytes of output waiting)",
                    self.out.len()
                );
                self.input = Some(client);
                self.duplex = true;
            }
            Ok(None) => {}
            Err(e) => warn!("cannot accept a console client: {e}"),
        }
    }

    /// The host end hung up: a socket client is dropped (the next one gets the console),
    /// other ends stop giving input.
    fn host_gone(&mut self) {
        if self.listener.is_some() {
            if let Some(fd) = self.input.take() {
                let raw = fd.as_raw_fd();
                if self.registered.remove(&raw).is_some() {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, raw, EpollEvent::default());
                }
                info!("console client disconnected; waiting for the next one");
            }
        } else if let Some(fd) = self.input.take() {
            let raw = fd.as_raw_fd();
            if self.registered.remove(&raw).is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, raw, EpollEvent::default());
            }
            info!("console input ended");
            if self.duplex {
                // A pty master: output went the same way. Keep the descriptor for output.
                self.output = Some(fd);
                self.duplex = false;
            }
        }
    }

    fn read_input(&mut self) {
        let Some(r) = self.reader() else {
            return;
        };
        let mut buf = [0u8; 4096];
        while self.input_buf.len() < INPUT_BUFFER {
            let room = (INPUT_BUFFER - self.input_buf.len()).min(buf.len());
            match read_fd(r, &mut buf[..room]) {
                Io::Moved(n) => {
                    add(&self.inner.stats.in_bytes, n as u64);
                    self.input_buf.extend(&buf[..n]);
                }
                Io::Later => return,
                Io::Gone => {
                    self.host_gone();
                    return;
                }
                Io::Failed(e) => {
                    warn!("console input failed: {e}; no more input");
                    self.host_gone();
                    return;
                }
            }
        }
    }

    /// Takes the guest's output and writes it to the host end, as long as either moves.
    fn pump_output(&mut self, mut writable: bool) {
        loop {
            let mut moved = false;
            {
                let mut emerg = self.inner.emerg.lock().unwrap_or_else(|e| e.into_inner());
                if !emerg.is_empty() {
                    self.out.extend(emerg.drain(..));
                    moved = true;
                }
            }
            moved |= self.inner.tx_round(&mut self.out, &mut self.taken);
            if writable || moved {
                let (wrote, more) = self.flush();
                writable = more;
                moved |= wrote;
            }
            if !moved {
                return;
            }
        }
    }

    /// Writes what is buffered; (bytes written, the host end takes more).
    fn flush(&mut self) -> (bool, bool) {
        let Some(w) = self.writer() else {
            return (false, false);
        };
        let mut wrote = false;
        while !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            match write_fd(w, front) {
                Io::Moved(n) => {
                    add(&self.inner.stats.out_bytes, n as u64);
                    self.out.drain(..n);
                    wrote = true;
                }
                Io::Later => return (wrote, false),
                Io::Gone if self.listener.is_some() => {
                    self.host_gone();
                    return (wrote, false);
                }
                Io::Gone | Io::Failed(_) if self.listener.is_none() => {
                    // A terminal or file that refuses output for good: the guest must not
                    // wait forever, so what it writes is counted and discarded from here on.
                    if !self.output_failed {
                        error!("console output failed; discarding the guest's output from now on");
                        self.output_failed = true;
                    }
                    add(&self.inner.stats.dropped, self.out.len() as u64);
                    self.out.clear();
                    return (true, true);
                }
                Io::Gone | Io::Failed(_) => {
                    self.host_gone();
                    return (wrote, false);
                }
            }
        }
        (wrote, true)
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.params.queue_size)
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
        info!("features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // EVENT_IDX is not offered.
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
        // Only emerg_wr is writable: a write of it (any width) outputs its low byte.
        if offset == EMERG_WR_OFFSET && !buf.is_empty() {
            self.emergency_write(buf[0]);
            return Ok(());
        }
        if !self.inner.config_write_warned.swap(true, Ordering::AcqRel) {
            warn!(
                "ignoring config write of {} bytes at {offset} (only emerg_wr is writable; said once)",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        // The first table: the jail is complete, start the worker under it.
        self.start_worker()?;
        // The worker looks at the queues again.
        let _ = self.inner.tx_kick.write(1);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        match queue_index as usize {
            RX_QUEUE => self.inner.rx_broken.store(false, Ordering::Release),
            TX_QUEUE => self.inner.tx_broken.store(false, Ordering::Release),
            _ => {}
        }
        Ok(())
    }

    fn reset_device(&self) {
        self.inner.rx_broken.store(false, Ordering::Release);
        self.inner.tx_broken.store(false, Ordering::Release);
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        {
            let mut slot = self.inner.vrings.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                if let [rx, tx, ..] = vrings {
                    *slot = Some((rx.clone(), tx.clone()));
                }
            }
            let mut errors = self.inner.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.is_none() {
                *errors = queue_error_signal();
            }
        }
        let kick = match usize::from(device_event) {
            RX_QUEUE => &self.inner.rx_kick,
            TX_QUEUE => &self.inner.tx_kick,
            other => return Err(BackendError::NoSuchQueue(other).into()),
        };
        kick.write(1).map_err(BackendError::NotifyWorker)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
