//! A malicious frontend against the device: the block backend served by the runtime's stream
//! server in this process, driven over a socketpair with `vhost::vhost_user::Frontend`, or
//! with raw messages where `Frontend` refuses to send bad ones. Each case checks that the
//! device refuses (the request fails, or the server ends the connection with an error), that
//! no descriptor it was sent stays open, and that the server thread does not panic.
// Tests start threads as they like (clippy.toml is about the programs' threads).
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::thread::JoinHandle;

use bulkhead_block::{BlockBackend, BlockDeviceConfig, DiskImage, OpenMode, Serial};
use bulkhead_device_runtime::testing::{memfd, send_with_fds, vhost_user_message};
use bulkhead_device_runtime::{serve_stream, ServeError};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 1 << 20;
/// vhost-user request codes used raw.
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;

/// Descriptor counts are per process: one case at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

struct Served {
    image: TempFile,
    thread: JoinHandle<Result<(), ServeError>>,
}

/// Starts the server on one end of a socketpair; returns the other end.
fn serve(num_queues: u16) -> (Served, UnixStream) {
    let image = TempFile::new().expect("temp file");
    image.as_file().write_all(&[0u8; 64 << 10]).expect("fill");
    let disk = DiskImage::open(image.as_path(), OpenMode::default()).expect("open image");
    let backend = BlockBackend::new(BlockDeviceConfig {
        disk,
        num_queues,
        queue_size: 16,
        serial: Serial::default(),
        rate_limit: Default::default(),
        poll: std::time::Duration::ZERO,
    });
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let thread = std::thread::spawn(move || serve_stream(theirs, backend));
    (Served { image, thread }, ours)
}

impl Served {
    /// Waits for the server to end; panics if it panicked.
    fn end(self) -> Result<(), ServeError> {
        let result = self.thread.join().expect("the server panicked");
        drop(self.image);
        result
    }
}

/// Sends one raw vhost-user message with `fds` attached.
fn send_raw(stream: &UnixStream, request: u32, body: &[u8], fds: &[RawFd]) {
    // Version 1, no reply wanted.
    let msg = vhost_user_message(request, 1, body);
    let n = send_with_fds(stream, &msg, fds, 0);
    // The server may already have hung up on an earlier bad message.
    assert!(
        n == msg.len() as isize || n < 0,
        "short send of a raw message"
    );
}

/// A memory table body: `(guest address, size, frontend address, offset)` per region.
fn mem_table_body(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for (gpa, size, va, offset) in regions {
        for v in [gpa, size, va, offset] {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    body
}

fn region(gpa: u64, size: u64, va: u64, fd: &File) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: va,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    }
}

/// Runs `case` against a fresh server and checks: no panic, no descriptor left behind, and
/// the server's result is what `refused` says (`Some(true)`: it ended with an error; `None`:
/// either, for a message the kernel itself may refuse to carry).
fn check(name: &str, refused: Option<bool>, case: impl FnOnce(&mut Frontend, &UnixStream)) {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    let (served, stream) = serve(1);
    let raw = stream.try_clone().expect("dup socket");
    let mut frontend = Frontend::from_stream(stream, 64);
    case(&mut frontend, &raw);
    drop(frontend);
    drop(raw);
    let result = served.end();
    if let Some(refused) = refused {
        assert_eq!(
            result.is_err(),
            refused,
            "{name}: server ended with {result:?}"
        );
    }
    assert_eq!(open_fds(), before, "{name}: descriptors left open");
    println!("{name}: server ended with {result:?}, no descriptor left open, no panic");
}

fn negotiate(frontend: &mut Frontend) {
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("features");
    frontend.set_features(features).expect("set_features");
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
        .expect("protocol features");
}

#[test]
fn test_malicious_mem_table_zero_regions_refused() {
    check("zero regions", Some(true), |f, raw| {
        negotiate(f);
        send_raw(raw, SET_MEM_TABLE, &mem_table_body(&[]), &[]);
    });
}

#[test]
fn test_malicious_mem_table_too_many_regions_refused() {
    check("33 regions", Some(true), |f, raw| {
        negotiate(f);
        let files: Vec<File> = (0..33).map(|_| memfd(4096)).collect();
        let regions: Vec<_> = (0..33u64)
            .map(|i| (i << 20, 4096, 0x7000_0000 + (i << 20), 0))
            .collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_raw(raw, SET_MEM_TABLE, &mem_table_body(&regions), &fds);
    });
}

#[test]
fn test_malicious_mem_table_overlapping_regions_refused() {
    check("overlapping regions", Some(true), |f, _| {
        negotiate(f);
        let (a, b) = (memfd(MEM_SIZE), memfd(MEM_SIZE));
        let _ = f.set_mem_table(&[
            region(0, MEM_SIZE, 0x1000_0000, &a),
            region(MEM_SIZE / 2, MEM_SIZE, 0x2000_0000, &b),
        ]);
    });
    check(
        "regions overlapping in frontend addresses",
        Some(true),
        |f, _| {
            negotiate(f);
            let (a, b) = (memfd(MEM_SIZE), memfd(MEM_SIZE));
            let _ = f.set_mem_table(&[
                region(0, MEM_SIZE, 0x1000_0000, &a),
                region(4 * MEM_SIZE, MEM_SIZE, 0x1000_0000 + 4096, &b),
            ]);
        },
    );
}

#[test]
fn test_malicious_mem_table_empty_or_wrapping_region_refused() {
    // Raw: Frontend does not send these.
    check("region of size zero", Some(true), |f, raw| {
        negotiate(f);
        let a = memfd(MEM_SIZE);
        let body = mem_table_body(&[(0, 0, 0x1000_0000, 0)]);
        send_raw(raw, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
    });
    check(
        "region wrapping the guest address space",
        Some(true),
        |f, raw| {
            negotiate(f);
            let a = memfd(MEM_SIZE);
            let body = mem_table_body(&[(u64::MAX - 4095, MEM_SIZE, 0x1000_0000, 0)]);
            send_raw(raw, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
        },
    );
    check(
        "region wrapping the frontend address space",
        Some(true),
        |f, raw| {
            negotiate(f);
            let a = memfd(MEM_SIZE);
            let body = mem_table_body(&[(0, MEM_SIZE, u64::MAX - 4095, 0)]);
            send_raw(raw, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
        },
    );
    // mmap accepts it; the first access would be SIGBUS (found by the fuzz target).
    check("region past the end of its file", Some(true), |f, raw| {
        negotiate(f);
        let a = memfd(4096);
        let body = mem_table_body(&[(0, MEM_SIZE, 0x1000_0000, 1 << 40)]);
        send_raw(raw, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
    });
    check("region longer than its file", Some(true), |f, _| {
        negotiate(f);
        let a = memfd(4096);
        let _ = f.set_mem_table(&[region(0, MEM_SIZE, 0x1000_0000, &a)]);
    });
}

#[test]
fn test_malicious_mem_table_fd_count_mismatch_refused() {
    check("regions without descriptors", Some(true), |f, raw| {
        negotiate(f);
        let a = memfd(MEM_SIZE);
        let body = mem_table_body(&[(0, MEM_SIZE, 0x1000_0000, 0), (MEM_SIZE, 4096, 0, 0)]);
        send_raw(raw, SET_MEM_TABLE, &body, &[a.as_raw_fd()]);
    });
}

#[test]
fn test_malicious_ring_outside_memory_refused() {
    check("ring outside memory", Some(true), |f, _| {
        negotiate(f);
        let a = memfd(MEM_SIZE);
        f.set_mem_table(&[region(0, MEM_SIZE, 0x1000_0000, &a)])
            .expect("mem table");
        f.set_vring_num(0, 16).expect("vring num");
        let _ = f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: 0,
                desc_table_addr: 0x1000_0000 + MEM_SIZE, // one past the region
                used_ring_addr: 0x1000_0000,
                avail_ring_addr: 0x1000_0000,
                log_addr: None,
            },
        );
    });
}

#[test]
fn test_malicious_vring_index_past_queues_refused() {
    check("vring num past the queues", Some(true), |f, _| {
        negotiate(f);
        let _ = f.set_vring_num(5, 16);
    });
    check("vring kick past the queues", Some(true), |f, _| {
        negotiate(f);
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let _ = f.set_vring_kick(63, &kick);
    });
    check("vring size not a power of two", Some(true), |f, _| {
        negotiate(f);
        let _ = f.set_vring_num(0, 12);
    });
}

#[test]
fn test_malicious_stray_and_extra_fds_refused() {
    check("descriptors on GET_FEATURES", Some(true), |f, raw| {
        negotiate(f);
        let a = memfd(4096);
        send_raw(raw, GET_FEATURES, &[], &[a.as_raw_fd(), a.as_raw_fd()]);
    });
    check("two descriptors on SET_VRING_KICK", Some(true), |f, raw| {
        negotiate(f);
        let (a, b) = (
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        );
        send_raw(
            raw,
            SET_VRING_KICK,
            &0u64.to_le_bytes(),
            &[a.as_raw_fd(), b.as_raw_fd()],
        );
    });
    check("more descriptors than a message carries", None, |f, raw| {
        negotiate(f);
        let files: Vec<File> = (0..200).map(|_| memfd(4096)).collect();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_raw(raw, GET_FEATURES, &[], &fds);
    });
}

#[test]
fn test_malicious_descriptor_flood_replaced_fds_closed() {
    check(
        "a flood of kick and call descriptors",
        Some(false),
        |f, _| {
            negotiate(f);
            let a = memfd(MEM_SIZE);
            f.set_mem_table(&[region(0, MEM_SIZE, 0x1000_0000, &a)])
                .expect("mem table");
            for _ in 0..500 {
                let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                f.set_vring_call(0, &call).expect("call");
                let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                f.set_vring_err(0, &err).expect("err");
            }
            for _ in 0..20 {
                let b = memfd(MEM_SIZE);
                f.set_mem_table(&[region(0, MEM_SIZE, 0x1000_0000, &b)])
                    .expect("mem table replaced");
            }
        },
    );
}

/// A queue the guest broke (its avail index jumped past the queue size) is stopped by the
/// device, which signals the vring's error eventfd (VHOST_USER_SET_VRING_ERR): the frontend
/// then shows the driver DEVICE_NEEDS_RESET.
#[test]
fn test_malicious_avail_index_jump_signals_vring_err() {
    check("avail index jump", None, |f, _| {
        use std::os::unix::fs::FileExt;
        negotiate(f);
        let a = memfd(MEM_SIZE);
        let va = 0x1000_0000;
        f.set_mem_table(&[region(0, MEM_SIZE, va, &a)])
            .expect("mem table");
        // avail->idx at avail + 2: 100 requests announced in a ring of 16.
        a.write_at(&100u16.to_le_bytes(), 0x1000 + 2)
            .expect("avail idx");
        f.set_vring_num(0, 16).expect("vring num");
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: 0,
                desc_table_addr: va,
                avail_ring_addr: va + 0x1000,
                used_ring_addr: va + 0x2000,
                log_addr: None,
            },
        )
        .expect("vring addr");
        f.set_vring_base(0, 0).expect("vring base");
        let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        f.set_vring_err(0, &err).expect("err");
        f.set_vring_call(0, &call).expect("call");
        f.set_vring_kick(0, &kick).expect("kick");
        f.set_vring_enable(0, true).expect("enable");
        kick.write(1).expect("kick");
        let start = std::time::Instant::now();
        let mut signalled = false;
        while start.elapsed() < std::time::Duration::from_secs(5) {
            if err.read().is_ok() {
                signalled = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(signalled, "the vring's error eventfd was not signalled");
        println!(
            "avail index jump: vring error eventfd signalled after {:?}",
            start.elapsed()
        );
    });
}
