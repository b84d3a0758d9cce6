//! The backend and its worker thread against real host ends (a listening unix socket, a pipe)
//! and vrings laid out in guest memory by `MockSplitQueue`, as a frontend would.

use super::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 16;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;

struct Guest {
    mem: GuestMemoryMmap,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    rx: VringRwLock,
    tx: VringRwLock,
    /// (descriptor table, available ring, used ring) of rx and tx.
    rings: [(u64, u64, u64); 2],
    rx_next: u16,
    tx_next: u16,
}

impl Guest {
    fn new() -> Guest {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 * MIB as usize)]).expect("memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        // The mock lays the rings out (and zeroes them) once; from then on they are read and
        // written in guest memory directly.
        let layout = |base: u64| {
            let mock = MockSplitQueue::create(&mem, GuestAddress(base), 4 * QSIZE);
            (
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
        };
        let rings = [layout(RX_RING), layout(TX_RING)];
        let vring = |(desc, avail, used): (u64, u64, u64)| {
            let v = VringRwLock::new(atomic.clone(), 256).expect("vring");
            v.set_queue_size(QSIZE);
            v.set_queue_info(desc, avail, used).expect("info");
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        };
        Guest {
            rx: vring(rings[0]),
            tx: vring(rings[1]),
            mem,
            atomic,
            rings,
            rx_next: 0,
            tx_next: 0,
        }
    }

    fn ring(&self, base: u64) -> (u64, u64, u64) {
        self.rings[usize::from(base == TX_RING)]
    }

    /// Makes chain `next` (one descriptor, in slot `next`) available on the ring at `base`.
    fn add(&self, base: u64, next: u16, addr: u64, len: u32, write: bool) {
        let (desc, avail, _) = self.ring(base);
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let d = desc + 16 * u64::from(next);
        self.mem.write_obj(addr, GuestAddress(d)).expect("desc");
        self.mem.write_obj(len, GuestAddress(d + 8)).expect("desc");
        self.mem
            .write_obj(flags, GuestAddress(d + 12))
            .expect("desc");
        self.mem
            .write_obj(0u16, GuestAddress(d + 14))
            .expect("desc");
        self.mem
            .write_obj(next, GuestAddress(avail + 4 + 2 * u64::from(next % QSIZE)))
            .expect("avail");
        self.mem
            .write_obj(next + 1, GuestAddress(avail + 2))
            .expect("avail idx");
    }

    fn transmit(&mut self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write");
        self.add(TX_RING, self.tx_next, addr, data.len() as u32, false);
        self.tx_next += 1;
    }

    fn receive_buffer(&mut self, addr: u64, len: u32) {
        self.add(RX_RING, self.rx_next, addr, len, true);
        self.rx_next += 1;
    }

    fn used(&self, base: u64) -> Vec<(u32, u32)> {
        let (_, _, used) = self.ring(base);
        let n: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        (0..u64::from(n))
            .map(|i| {
                let e = used + 4 + 8 * (i % u64::from(QSIZE));
                let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used");
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used");
                (id, len)
            })
            .collect()
    }
}

fn params() -> ConsoleParams {
    ConsoleParams {
        cols: 80,
        rows: 24,
        queue_size: 256,
    }
}

fn start(guest: &Guest, host: HostEnd) -> ConsoleBackend {
    let backend = ConsoleBackend::new(params(), host).expect("backend");
    backend.update_memory(guest.atomic.clone()).expect("memory");
    backend
}

fn kick(backend: &ConsoleBackend, guest: &Guest, queue: u16) {
    backend
        .handle_event(
            queue,
            EventSet::IN,
            &[guest.rx.clone(), guest.tx.clone()],
            0,
        )
        .expect("kick");
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn listener() -> (UnixListener, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "bulkhead-console-{}-{:?}.sock",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    (l, path)
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

#[test]
fn test_config_space_features_and_emergency_write_flag() {
    let c = config_space(132, 43);
    assert_eq!(c, [132, 0, 43, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let f = offered_features();
    assert_ne!(f & (1 << VIRTIO_CONSOLE_F_SIZE), 0);
    assert_ne!(f & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE), 0);
    assert_eq!(
        f & (1 << VIRTIO_CONSOLE_F_MULTIPORT),
        0,
        "one port, no control queues"
    );
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    let (a, _b) = UnixStream::pair().expect("pair");
    let backend = ConsoleBackend::new(params(), HostEnd::Output(a.into())).expect("backend");
    assert_eq!(backend.get_config(0, 4), vec![80, 0, 24, 0]);
    assert_eq!(
        backend.get_config(10, 4),
        vec![0, 0, 0, 0],
        "past the end reads zero"
    );
    assert!(
        backend.get_config(0xfff, 2).is_empty(),
        "beyond the config size"
    );
    backend.set_config(0, &[1, 2]).expect("ignored write");
    assert_eq!(backend.size(), (80, 24), "cols and rows are read-only");
}

#[test]
fn test_worker_output_to_file_descriptor_and_emergency_write() {
    let mut guest = Guest::new();
    let (a, mut b) = UnixStream::pair().expect("pair");
    let backend = start(&guest, HostEnd::Output(a.into()));
    guest.transmit(MIB, b"hello from hvc0\n");
    kick(&backend, &guest, TX_QUEUE as u16);
    assert_eq!(read_exact_timeout(&mut b, 16), b"hello from hvc0\n");
    wait_for("the chain back", || guest.used(TX_RING) == vec![(0, 0)]);
    backend
        .set_config(EMERG_WR_OFFSET, &[b'!', 0, 0, 0])
        .expect("emerg");
    assert_eq!(read_exact_timeout(&mut b, 1), b"!");
    let stats = backend.stats_line();
    assert!(
        stats.contains("tx_bytes=16") && stats.contains("emerg_bytes=1"),
        "{stats}"
    );
    backend.stop_worker();
}

#[test]
fn test_worker_socket_output_waits_for_client_and_reconnect_gets_console() {
    let mut guest = Guest::new();
    let (l, path) = listener();
    let backend = start(&guest, HostEnd::Listener(l.into()));
    // Written before anyone connected: kept, not lost.
    guest.transmit(MIB, b"early ");
    kick(&backend, &guest, TX_QUEUE as u16);
    wait_for("the chain back", || guest.used(TX_RING).len() == 1);
    let mut c1 = UnixStream::connect(&path).expect("connect");
    assert_eq!(read_exact_timeout(&mut c1, 6), b"early ");
    // Input from the client reaches the guest's buffer.
    guest.receive_buffer(2 * MIB, 64);
    kick(&backend, &guest, RX_QUEUE as u16);
    c1.write_all(b"ls\n").expect("write");
    wait_for("input in the guest", || guest.used(RX_RING) == vec![(0, 3)]);
    let mut got = [0u8; 3];
    guest
        .mem
        .read_slice(&mut got, GuestAddress(2 * MIB))
        .expect("read");
    assert_eq!(&got, b"ls\n");
    // The client goes; output while nobody is there waits for the next client.
    drop(c1);
    std::thread::sleep(Duration::from_millis(50));
    guest.transmit(MIB + 4096, b"while away");
    kick(&backend, &guest, TX_QUEUE as u16);
    wait_for("the chain back", || guest.used(TX_RING).len() == 2);
    let mut c2 = UnixStream::connect(&path).expect("reconnect");
    assert_eq!(read_exact_timeout(&mut c2, 10), b"while away");
    let stats = backend.stats_line();
    assert!(stats.contains("clients=2"), "{stats}");
    backend.stop_worker();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn test_worker_slow_reader_throttles_guest_and_loses_nothing() {
    let mut guest = Guest::new();
    let (l, path) = listener();
    let backend = start(&guest, HostEnd::Listener(l.into()));
    let mut client = UnixStream::connect(&path).expect("connect");
    // 12 chains of 64 KiB: far more than the output buffer and the socket hold.
    let chunk = 64 * 1024;
    let total = 12 * chunk;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    for (i, part) in data.chunks(chunk).enumerate() {
        guest.transmit(4 * MIB + (i * chunk) as u64, part);
    }
    kick(&backend, &guest, TX_QUEUE as u16);
    // Nobody reads yet: the guest is held up, not every chain comes back.
    std::thread::sleep(Duration::from_millis(200));
    let back = guest.used(TX_RING).len();
    assert!(back < 12, "{back} chains returned with no reader");
    let stats = backend.stats_line();
    assert!(!stats.contains("throttled=0 "), "{stats}");
    // A slow reader: small reads with pauses.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::with_capacity(total);
    let mut buf = [0u8; 8192];
    while got.len() < total {
        let n = client.read(&mut buf).expect("read");
        assert!(n > 0, "eof after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        if got.len() % (128 * 1024) < 8192 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(got.len(), total);
    assert!(got == data, "the stream differs");
    wait_for("every chain back", || guest.used(TX_RING).len() == 12);
    assert!(backend.stats_line().contains("dropped=0"));
    backend.stop_worker();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn test_worker_input_waits_for_guest_buffers() {
    let mut guest = Guest::new();
    let (r, mut w) = UnixStream::pair().expect("pair");
    let (out, _peer) = UnixStream::pair().expect("pair");
    r.set_nonblocking(true).expect("nonblocking");
    let backend = start(
        &guest,
        HostEnd::Streams {
            input: r.into(),
            output: out.into(),
        },
    );
    w.write_all(b"typed ahead").expect("write");
    std::thread::sleep(Duration::from_millis(50));
    assert!(guest.used(RX_RING).is_empty());
    guest.receive_buffer(2 * MIB, 4);
    guest.receive_buffer(3 * MIB, 64);
    kick(&backend, &guest, RX_QUEUE as u16);
    wait_for("input in the guest", || guest.used(RX_RING).len() == 2);
    assert_eq!(guest.used(RX_RING), vec![(0, 4), (1, 7)]);
    backend.stop_worker();
}

#[test]
fn test_worker_broken_tx_queue_stops_it() {
    let mut guest = Guest::new();
    let (a, _b) = UnixStream::pair().expect("pair");
    let backend = start(&guest, HostEnd::Output(a.into()));
    // A device-writable descriptor on the transmit queue.
    guest.add(TX_RING, 0, MIB, 16, true);
    guest.tx_next = 1;
    kick(&backend, &guest, TX_QUEUE as u16);
    wait_for("the queue stopped", || {
        backend.stats_line().contains("broken_queues=1")
    });
    assert!(guest.used(TX_RING).is_empty());
    backend.reset_device();
    backend.stop_worker();
}

/// The tids of this process's `console-io` threads.
fn console_io_tids() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "console-io")
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// User + system clock ticks of thread `tid`.
fn cpu_ticks(tid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

#[test]
fn test_worker_hang_up_with_input_buffer_full_does_not_spin() {
    let guest = Guest::new();
    let (l, path) = listener();
    let before_tids = console_io_tids();
    let backend = start(&guest, HostEnd::Listener(l.into()));
    std::thread::sleep(Duration::from_millis(50));
    let tid = console_io_tids()
        .into_iter()
        .find(|t| !before_tids.contains(t))
        .expect("this backend's console-io thread");
    let mut c = UnixStream::connect(&path).expect("connect");
    // More than the input buffer, with no receive buffers in the guest.
    c.write_all(&vec![b'x'; INPUT_BUFFER + 4096])
        .expect("write");
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    // The worker thread sleeps: its CPU time does not grow.
    let before = cpu_ticks(&tid);
    std::thread::sleep(Duration::from_millis(500));
    let spent = cpu_ticks(&tid) - before;
    assert!(spent < 3, "the worker spun: {spent} ticks in 0.5 s");
    backend.stop_worker();
    let _ = std::fs::remove_file(&path);
}
