//! End to end: the `bulkhead-block` binary driven by `vhost::vhost_user::Frontend`, as the VMM
//! drives it, with guest memory in a memfd shared over the socket.
// Tests start threads as they like (clippy.toml is about the programs' threads).
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_device_runtime::testing::{
    ask, memfd_memory, seqpacket_pair, setup_vring, split_desc, wait_exit,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-block");
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 16;
const SECTORS: usize = 128;

fn image() -> TempFile {
    let tmp = TempFile::new().expect("temp file");
    let mut content = Vec::new();
    for s in 0..SECTORS {
        content.extend(std::iter::repeat_n(s as u8, 512));
    }
    tmp.as_file().write_all(&content).expect("fill");
    tmp
}

/// Spawns the device on one end of a socketpair, as the VMM does.
fn spawn_on_socketpair(img: &Path, extra: &[&str]) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let fd = theirs.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own open descriptor so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let child = Command::new(BIN)
        .args(["--socket-fd", &fd.to_string(), "--path"])
        .arg(img)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn bulkhead-block");
    drop(theirs);
    (child, ours)
}

fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).expect("header");
}

#[test]
fn test_socket_fd_frontend_requests_served_and_exit_zero_on_hangup() {
    let img = image();
    let (mut child, stream) = spawn_on_socketpair(
        img.as_path(),
        &[
            "--num-queues",
            "2",
            "--queue-size",
            "64",
            "--serial",
            "e2e-disk",
        ],
    );
    let mut frontend = Frontend::from_stream(stream, 2);

    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("get_features");
    for bit in [
        32, // VIRTIO_F_VERSION_1
        29, // VIRTIO_RING_F_EVENT_IDX
        28, // VIRTIO_RING_F_INDIRECT_DESC
        30, // VHOST_USER_F_PROTOCOL_FEATURES
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert!(features & (1 << bit) != 0, "feature bit {bit} missing");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    frontend.set_features(features).expect("set_features");
    let protocol = frontend.get_protocol_features().expect("protocol features");
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(protocol.contains(wanted));
    frontend
        .set_protocol_features(wanted)
        .expect("set protocol");
    assert_eq!(frontend.get_queue_num().expect("queue num"), 2);

    let (_, payload) = frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("get_config");
    let capacity = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
    let seg_max = u32::from_le_bytes(payload[12..16].try_into().expect("4 bytes"));
    let blk_size = u32::from_le_bytes(payload[20..24].try_into().expect("4 bytes"));
    let num_queues = u16::from_le_bytes(payload[34..36].try_into().expect("2 bytes"));
    assert_eq!(capacity, SECTORS as u64);
    assert_eq!(seg_max, 62);
    assert_eq!(blk_size, 512);
    assert_eq!(num_queues, 2);

    let (mem, memfd) = memfd_memory(MEM_SIZE);
    let region = mem.iter().next().expect("one region");
    let host_base = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .expect("set_mem_table");

    // Queue 1 (the second queue) carries the requests, to exercise a non-zero worker. The
    // rings are laid out by hand: MockSplitQueue places its used ring over the avail ring's
    // used_event field, which breaks EVENT_IDX.
    let vring = setup_vring(&mut frontend, &mem, host_base, 1, 0x1_0000, QSIZE);
    let (table, avail, used_ring) = (&vring.table, &vring.avail, &vring.used);
    let (call, kick) = (&vring.call, &vring.kick);

    // A write of sector 5, a read of sectors 4..6 and a GET_ID, in one kick.
    let (hdr, data, status) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    header(&mem, hdr, VIRTIO_BLK_T_OUT, 5);
    header(&mem, hdr + 0x100, VIRTIO_BLK_T_IN, 4);
    header(&mem, hdr + 0x200, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xabu8; 512], GuestAddress(data))
        .expect("payload");
    let next = VRING_DESC_F_NEXT;
    let write = VRING_DESC_F_WRITE;
    let descs = [
        split_desc(hdr, 16, next, 1),
        split_desc(data, 512, next, 2),
        split_desc(status, 1, write, 0),
        split_desc(hdr + 0x100, 16, next, 4),
        split_desc(data + 0x1000, 1536, next | write, 5),
        split_desc(status + 1, 1, write, 0),
        split_desc(hdr + 0x200, 16, next, 7),
        split_desc(data + 0x2000, 20, next | write, 8),
        split_desc(status + 2, 1, write, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        table.store(i as u16, *d).expect("descriptor");
    }
    for (slot, head) in [0u16, 3, 6].iter().enumerate() {
        avail.ring().ref_at(slot).expect("avail slot").store(*head);
    }
    avail.idx().store(3);
    mem.write_slice(&[0xffu8; 3], GuestAddress(status))
        .expect("status");
    kick.write(1).expect("kick");

    let start = Instant::now();
    while used_ring.idx().load() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "requests not completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The used entries are published before the call eventfd is signalled.
    while call.read().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "guest was not notified"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut statuses = [0xffu8; 3];
    mem.read_slice(&mut statuses, GuestAddress(status))
        .expect("status");
    assert_eq!(statuses, [0, 0, 0]);

    // Completion order is free; match the used entries by head.
    let mut used: Vec<(u32, u32)> = (0..3)
        .map(|i| {
            let e = used_ring.ring().ref_at(i).expect("used").load();
            (e.id(), e.len())
        })
        .collect();
    used.sort();
    assert_eq!(used, vec![(0, 1), (3, 1537), (6, 21)]);

    let mut read = vec![0u8; 1536];
    mem.read_slice(&mut read, GuestAddress(data + 0x1000))
        .expect("read back");
    let sector5 = read.get(512..1024).expect("sector 5");
    let writes_first = sector5.iter().all(|&b| b == 0xab);
    let reads_first = sector5.iter().all(|&b| b == 5);
    assert!(writes_first || reads_first);
    assert!(read[..512].iter().all(|&b| b == 4));
    assert!(read[1024..].iter().all(|&b| b == 6));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(data + 0x2000))
        .expect("id");
    assert_eq!(&id[..9], b"e2e-disk\0");
    let on_disk = std::fs::read(img.as_path()).expect("image");
    assert!(on_disk[5 * 512..6 * 512].iter().all(|&b| b == 0xab));

    // Stopping the ring reports where the device stopped.
    assert_eq!(frontend.get_vring_base(1).expect("vring base"), 3);

    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn test_socket_path_connect_then_hangup_exit_zero() {
    let img = image();
    let dir = TempFile::new().expect("temp name");
    let sock = dir.as_path().with_extension("sock");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--path")
        .arg(img.as_path())
        .arg("--readonly")
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    let frontend = loop {
        match Frontend::connect(&sock, 1) {
            Ok(f) => break f,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    let features = frontend.get_features().expect("features");
    assert!(features & (1 << VIRTIO_BLK_F_RO) != 0);
    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn test_bad_input_exit_status_two() {
    let img = image();
    let cases: Vec<Vec<String>> = vec![
        // missing image
        vec![
            "--socket-fd".into(),
            "0".into(),
            "--path".into(),
            "/nonexistent/disk.img".into(),
        ],
        // both socket options
        vec![
            "--socket-fd".into(),
            "3".into(),
            "--socket-path".into(),
            "/tmp/x.sock".into(),
            "--path".into(),
            img.as_path().display().to_string(),
        ],
        // neither socket option
        vec!["--path".into(), img.as_path().display().to_string()],
        // unparsable number
        vec![
            "--socket-fd".into(),
            "three".into(),
            "--path".into(),
            img.as_path().display().to_string(),
        ],
        // not a socket (stdin is /dev/null)
        vec![
            "--socket-fd".into(),
            "0".into(),
            "--path".into(),
            img.as_path().display().to_string(),
        ],
        // serial too long
        vec![
            "--socket-fd".into(),
            "0".into(),
            "--path".into(),
            img.as_path().display().to_string(),
            "--serial".into(),
            "123456789012345678901".into(),
        ],
    ];
    for args in cases {
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "args {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "args {args:?}: {stderr}");
        assert!(!stderr.is_empty(), "args {args:?}: no message");
    }
}

/// The VMM's layout: socket 3, control channel 4, image 5, and a stray descriptor 7 that the
/// runtime must close.
#[test]
fn test_contract_fds_control_channel_answers_and_stray_fd_closed() {
    use std::os::unix::process::CommandExt;
    let img = image();
    let image = File::options()
        .read(true)
        .write(true)
        .open(img.as_path())
        .expect("open image");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (control, control_theirs) = seqpacket_pair();
    let stray = File::open("/dev/null").expect("stray");
    let layout = [
        (theirs.as_raw_fd(), 3),
        (control_theirs.as_raw_fd(), 4),
        (image.as_raw_fd(), 5),
        (stray.as_raw_fd(), 7),
    ];
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--socket-fd",
        "3",
        "--control-fd",
        "4",
        "--image-fd",
        "5",
        "--path",
        "e2e.img",
    ])
    .stdin(Stdio::null());
    // SAFETY: only dup3/dup2 between fork and exec, onto numbers above all the sources (which
    // are moved out of the way first).
    unsafe {
        cmd.pre_exec(move || {
            let mut moved = Vec::new();
            for (fd, _) in layout {
                let high = libc::fcntl(fd, libc::F_DUPFD, 100);
                if high < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved.push(high);
            }
            for (high, (_, target)) in moved.iter().zip(layout) {
                if libc::dup2(*high, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn bulkhead-block");
    drop((theirs, control_theirs, image, stray));

    assert_eq!(ask(&control, b"ping"), "ok pong");
    let stats = ask(&control, b"stats");
    assert!(
        stats.starts_with("ok reads=0 read_bytes=0 writes=0"),
        "stats: {stats}"
    );
    assert_eq!(ask(&control, b"resize 5"), "err unknown command");
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).expect("comm");
    assert_eq!(comm.trim_end(), "bulkhead-block");
    let fd_path = |n: i32| format!("/proc/{}/fd/{n}", child.id());
    assert!(std::fs::read_link(fd_path(5)).is_ok(), "the image is open");
    // Descriptor 7 may be reused by the device (an eventfd, its io_uring), but not for
    // /dev/null; the copies at 100 and up were not CLOEXEC and must be closed too.
    assert_ne!(
        std::fs::read_link(fd_path(7)).ok(),
        Some("/dev/null".into()),
        "the stray descriptor 7 is still open"
    );
    for n in 100..104 {
        assert!(
            std::fs::read_link(fd_path(n)).is_err(),
            "descriptor {n} is open"
        );
    }

    // The VMM hanging up the control channel ends only the control thread.
    drop(control);
    let frontend = Frontend::from_stream(ours, 1);
    frontend.set_owner().expect("set_owner");
    assert_ne!(frontend.get_features().expect("features"), 0);
    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn test_control_fd_not_seqpacket_exit_status_two() {
    let img = image();
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (_, stream_not_seqpacket) = UnixStream::pair().expect("socketpair");
    for fd in [theirs.as_raw_fd(), stream_not_seqpacket.as_raw_fd()] {
        // SAFETY: clearing FD_CLOEXEC on our own open descriptors so the child inherits them.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    }
    let out = Command::new(BIN)
        .args(["--socket-fd", &theirs.as_raw_fd().to_string()])
        .args([
            "--control-fd",
            &stream_not_seqpacket.as_raw_fd().to_string(),
        ])
        .arg("--path")
        .arg(img.as_path())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    drop(ours);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SOCK_SEQPACKET"), "{stderr}");
}

#[test]
fn test_rate_limited_queue_resumes_without_kick_in_order() {
    // The real process, under its seccomp filter: one operation per 100 ms after a full bucket
    // of 1. Four reads in one kick: the first at once, the other three 100 ms apart, served by
    // the worker's own timeout (no further kick), in ring order.
    let img = image();
    let (mut child, stream) = spawn_on_socketpair(
        img.as_path(),
        &[
            "--queue-size",
            "64",
            "--ops-size",
            "1",
            "--ops-refill-time",
            "100",
        ],
    );
    let mut frontend = Frontend::from_stream(stream, 1);
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("get_features");
    // Without EVENT_IDX: the driver's kicks would be the only other wake-up.
    frontend
        .set_features(features & !(1 << 29))
        .expect("set_features");
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK)
        .expect("set protocol");
    let (mem, memfd) = memfd_memory(MEM_SIZE);
    let region = mem.iter().next().expect("one region");
    let host_base = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .expect("set_mem_table");
    let vring = setup_vring(&mut frontend, &mem, host_base, 0, 0x1_0000, QSIZE);
    let (table, avail, used_ring) = (&vring.table, &vring.avail, &vring.used);
    let (_call, kick) = (&vring.call, &vring.kick);

    let (hdr, data, status) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    for i in 0..4u16 {
        let a = u64::from(i);
        header(&mem, hdr + a * 0x100, VIRTIO_BLK_T_IN, a);
        let first = 3 * i;
        table
            .store(
                first,
                split_desc(hdr + a * 0x100, 16, VRING_DESC_F_NEXT, first + 1),
            )
            .expect("descriptor");
        table
            .store(
                first + 1,
                split_desc(
                    data + a * 0x1000,
                    512,
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    first + 2,
                ),
            )
            .expect("descriptor");
        table
            .store(first + 2, split_desc(status + a, 1, VRING_DESC_F_WRITE, 0))
            .expect("descriptor");
        avail
            .ring()
            .ref_at(usize::from(i))
            .expect("avail slot")
            .store(first);
    }
    avail.idx().store(4);
    let start = Instant::now();
    kick.write(1).expect("kick");
    let mut done_at = Vec::new();
    while done_at.len() < 4 {
        let n = usize::from(used_ring.idx().load());
        while done_at.len() < n {
            done_at.push(start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "throttled requests not resumed without a kick: {n} of 4 done"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let heads: Vec<u32> = (0..4)
        .map(|i| used_ring.ring().ref_at(i).expect("used").load().id())
        .collect();
    assert_eq!(heads, [0, 3, 6, 9], "ring order kept");
    // The first is served from the full bucket, before any refill (a busy 2-CPU host took
    // 136 ms to serve it); the other three wait for three refills: never sooner than that
    // (the limit holds), and not stalled (loose: the host's load moves it).
    assert!(done_at[0] < Duration::from_millis(250), "{done_at:?}");
    let total = done_at[3];
    assert!(
        total >= Duration::from_millis(270) && total <= Duration::from_millis(1000),
        "3 refills of 100 ms took {total:?} ({done_at:?})"
    );
    for i in 0..4u64 {
        let mut sector = [0u8; 512];
        mem.read_slice(&mut sector, GuestAddress(data + i * 0x1000))
            .expect("read back");
        assert!(sector.iter().all(|&b| b == i as u8), "sector {i}");
    }
    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// Bytes of the inflight region of the test's one queue (the runtime's layout).
fn inflight_size() -> u64 {
    bulkhead_device_runtime::inflight::region_size(1, QSIZE)
}

/// A memfd for the inflight region, as the VMM creates it.
fn inflight_memfd() -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"inflight".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(inflight_size()).expect("size");
    file
}

/// Sets up queue 0 of `frontend` (16 entries at 0x1_0000/0x1_1000/0x1_2000) with `base`, the
/// inflight region first if given; returns the kick and call eventfds.
fn start_queue(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap,
    memfd: &File,
    inflight: Option<(&vhost::vhost_user::message::VhostUserInflight, &File)>,
    base: u16,
) -> (EventFd, EventFd) {
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("get_features");
    frontend.set_features(features).expect("set_features");
    let protocol = frontend.get_protocol_features().expect("protocol");
    assert!(
        protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD not offered with --inflight-fd"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        )
        .expect("set protocol");
    let host_base = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .expect("set_mem_table");
    if let Some((info, file)) = inflight {
        frontend
            .set_inflight_fd(info, file.as_raw_fd())
            .expect("set_inflight_fd");
    }
    let call = EventFd::new(EFD_NONBLOCK).expect("call");
    let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
    frontend.set_vring_num(0, QSIZE).expect("vring num");
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_base + 0x1_0000,
                used_ring_addr: host_base + 0x1_2000,
                avail_ring_addr: host_base + 0x1_1000,
                log_addr: None,
            },
        )
        .expect("vring addr");
    frontend.set_vring_base(0, base).expect("vring base");
    frontend.set_vring_call(0, &call).expect("vring call");
    frontend.set_vring_kick(0, &kick).expect("vring kick");
    frontend.set_vring_enable(0, true).expect("vring enable");
    (kick, call)
}

fn wait_used(used_ring: &UsedRing<'_, GuestMemoryMmap>, n: u16) {
    let start = Instant::now();
    while used_ring.idx().load() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "used index {} < {n}",
            used_ring.idx().load()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// In-flight tracking end to end: the device offers INFLIGHT_SHMFD only when handed a region
/// (`--inflight-fd`), lays it out on GET_INFLIGHT_FD, tracks what it takes and completes
/// (nothing left in flight, the region's used index follows the ring's); then a process that
/// died with a request taken and not completed (its region entry in flight) is replaced: the
/// new process, given the same region with SET_INFLIGHT_FD and the used index as base,
/// resubmits that request without a kick, once, and the data reaches the image.
#[test]
fn test_inflight_region_tracked_then_resubmitted_by_next_process() {
    use vhost::vhost_user::message::VhostUserInflight;
    let img = image();
    let (mem, memfd) = memfd_memory(MEM_SIZE);
    let region = inflight_memfd();
    let spawn = || {
        let fd = region.as_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on our own descriptor so the child inherits it.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        spawn_on_socketpair(
            img.as_path(),
            &[
                "--queue-size",
                &QSIZE.to_string(),
                "--inflight-fd",
                &fd.to_string(),
            ],
        )
    };
    let (mut first, stream) = spawn();
    let mut frontend = Frontend::from_stream(stream, 1);
    // The first activation: a new region from the device.
    frontend.set_owner().expect("owner");
    let features = frontend.get_features().expect("features");
    frontend.set_features(features).expect("set features");
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        )
        .expect("protocol");
    let (info, file) = frontend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .expect("get_inflight_fd");
    assert_eq!(
        (info.mmap_size, info.num_queues, info.queue_size),
        (inflight_size(), 1, QSIZE)
    );
    drop(frontend);
    let _ = wait_exit(&mut first, Duration::from_secs(10));
    let (mut first, stream) = spawn();
    let mut frontend = Frontend::from_stream(stream, 1);
    let table = DescriptorTable::new(&mem, GuestAddress(0x1_0000), QSIZE);
    let avail = AvailRing::new(&mem, GuestAddress(0x1_1000), QSIZE);
    let used_ring = UsedRing::new(&mem, GuestAddress(0x1_2000), QSIZE);
    let (kick, _call) = start_queue(&mut frontend, &mem, &memfd, Some((&info, &file)), 0);
    // Two writes (heads 0 and 3): completed, nothing left in flight.
    let (hdr, data, status) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    let next = VRING_DESC_F_NEXT;
    let write = VRING_DESC_F_WRITE;
    for (i, (head, sector, byte)) in [(0u16, 1u64, 0x11u8), (3, 2, 0x22), (6, 3, 0x33)]
        .iter()
        .enumerate()
    {
        let o = 0x100 * i as u64;
        header(&mem, hdr + o, VIRTIO_BLK_T_OUT, *sector);
        mem.write_slice(&[*byte; 512], GuestAddress(data + 0x1000 * i as u64))
            .expect("payload");
        table
            .store(*head, split_desc(hdr + o, 16, next, head + 1))
            .expect("d");
        table
            .store(
                head + 1,
                split_desc(data + 0x1000 * i as u64, 512, next, head + 2),
            )
            .expect("d");
        table
            .store(head + 2, split_desc(status + i as u64, 1, write, 0))
            .expect("d");
    }
    avail.ring().ref_at(0).expect("slot").store(0);
    avail.ring().ref_at(1).expect("slot").store(3);
    avail.idx().store(2);
    kick.write(1).expect("kick");
    wait_used(&used_ring, 2);
    // The region: queue 0's header (version 1, 16 descriptors, used index 2), nothing in
    // flight, heads 0 and 3 have counters 1 and 2.
    let mut r = vec![0u8; inflight_size() as usize];
    use std::os::unix::fs::FileExt;
    region.read_exact_at(&mut r, 0).expect("region");
    assert_eq!(u16::from_le_bytes([r[8], r[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([r[10], r[11]]), QSIZE, "desc_num");
    assert_eq!(u16::from_le_bytes([r[14], r[15]]), 2, "used_idx");
    let d = |h: usize| 16 + 16 * h;
    assert!(
        (0..usize::from(QSIZE)).all(|h| r[d(h)] == 0),
        "left in flight"
    );
    let counter = |h: usize| u64::from_le_bytes(r[d(h) + 8..d(h) + 16].try_into().expect("8"));
    assert_eq!((counter(0), counter(3)), (1, 2));
    // The process "dies" having taken head 6 (avail slot 2) and not completed it.
    avail.ring().ref_at(2).expect("slot").store(6);
    avail.idx().store(3);
    region.write_all_at(&[1], d(6) as u64).expect("inflight");
    region
        .write_all_at(&3u64.to_le_bytes(), d(6) as u64 + 8)
        .expect("counter");
    first.kill().expect("kill");
    let _ = first.wait();
    drop(frontend);
    // Its successor gets the same region and the used index as base, and no kick.
    let (mut second, stream) = spawn();
    let mut frontend = Frontend::from_stream(stream, 1);
    let _ring = start_queue(&mut frontend, &mem, &memfd, Some((&info, &file)), 2);
    wait_used(&used_ring, 3);
    let e = used_ring.ring().ref_at(2).expect("used").load();
    assert_eq!(e.id(), 6, "the request in flight was resubmitted");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_ring.idx().load(), 3, "nothing done twice");
    let on_disk = std::fs::read(img.as_path()).expect("image");
    assert!(on_disk[3 * 512..4 * 512].iter().all(|&b| b == 0x33));
    region.read_exact_at(&mut r, 0).expect("region");
    assert_eq!(r[d(6)], 0, "completed: no longer in flight");
    drop(frontend);
    let status = wait_exit(&mut second, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// Fault injection through the control channel (docs/restart.md): `fault crash` answers, then
/// the process dies of SIGABRT; `fault seccomp` makes a call the device's filter forbids, which
/// kills it with SIGSYS before any reply; an unknown fault is refused.
#[test]
fn test_control_fault_crash_and_seccomp_kill_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let img = image();
    for (fault, signal) in [("crash", libc::SIGABRT), ("seccomp", libc::SIGSYS)] {
        let (control, control_theirs) = seqpacket_pair();
        let fd = control_theirs.as_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on our own descriptor so the child inherits it.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let (mut child, stream) =
            spawn_on_socketpair(img.as_path(), &["--control-fd", &fd.to_string()]);
        drop(control_theirs);
        assert_eq!(ask(&control, b"ping"), "ok pong");
        assert!(ask(&control, b"fault melt").starts_with("err unknown fault"));
        let request = format!("fault {fault}");
        // SAFETY: write from a valid slice on an open descriptor.
        let n = unsafe { libc::write(control.as_raw_fd(), request.as_ptr().cast(), request.len()) };
        assert_eq!(n, request.len() as isize);
        let status = wait_exit(&mut child, Duration::from_secs(10));
        assert_eq!(status.signal(), Some(signal), "fault {fault}: {status}");
        drop(stream);
    }
}

/// `--fault crash_after=2` (what `--disk ...,fault=crash_after=2` hands the device): the process
/// aborts as it takes its second request, with both taken and none completed (the inflight
/// region says so); its successor, given the region and the used index, resubmits them in the
/// order they were taken and completes the third; every write reaches the image, none is
/// completed twice.
#[test]
fn test_fault_crash_after_with_requests_in_flight_nothing_lost() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::process::ExitStatusExt;
    use vhost::vhost_user::message::VhostUserInflight;
    let img = image();
    let (mem, memfd) = memfd_memory(MEM_SIZE);
    let region = inflight_memfd();
    let spawn = |extra: &[&str]| {
        let fd = region.as_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on our own descriptor so the child inherits it.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let fd = fd.to_string();
        let mut args = vec!["--queue-size", "16", "--inflight-fd", fd.as_str()];
        args.extend_from_slice(extra);
        spawn_on_socketpair(img.as_path(), &args)
    };
    let (mut first, stream) = spawn(&["--fault", "crash_after=2"]);
    let mut frontend = Frontend::from_stream(stream, 1);
    frontend.set_owner().expect("owner");
    let features = frontend.get_features().expect("features");
    frontend.set_features(features).expect("set features");
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        )
        .expect("protocol");
    let (info, file) = frontend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .expect("get_inflight_fd");
    let table = DescriptorTable::new(&mem, GuestAddress(0x1_0000), QSIZE);
    let avail = AvailRing::new(&mem, GuestAddress(0x1_1000), QSIZE);
    let used_ring = UsedRing::new(&mem, GuestAddress(0x1_2000), QSIZE);
    let (hdr, data, status) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    for (i, sector) in [7u64, 8, 9].iter().enumerate() {
        let head = 3 * i as u16;
        let o = 0x100 * i as u64;
        header(&mem, hdr + o, VIRTIO_BLK_T_OUT, *sector);
        mem.write_slice(
            &[0x70 + i as u8; 512],
            GuestAddress(data + 0x1000 * i as u64),
        )
        .expect("payload");
        table
            .store(head, split_desc(hdr + o, 16, VRING_DESC_F_NEXT, head + 1))
            .expect("d");
        table
            .store(
                head + 1,
                split_desc(data + 0x1000 * i as u64, 512, VRING_DESC_F_NEXT, head + 2),
            )
            .expect("d");
        table
            .store(
                head + 2,
                split_desc(status + i as u64, 1, VRING_DESC_F_WRITE, 0),
            )
            .expect("d");
        avail.ring().ref_at(i).expect("slot").store(head);
    }
    avail.idx().store(3);
    // Rings started with the requests already there: the device takes them at once.
    let (_kick, _call) = start_queue_again(&mut frontend, &mem, &memfd, &info, &file, 0);
    let status1 = wait_exit(&mut first, Duration::from_secs(10));
    assert_eq!(status1.signal(), Some(libc::SIGABRT), "{status1}");
    assert_eq!(used_ring.idx().load(), 0, "nothing completed");
    let mut r = vec![0u8; inflight_size() as usize];
    region.read_exact_at(&mut r, 0).expect("region");
    let d = |h: usize| 16 + 16 * h;
    let in_flight: Vec<usize> = (0..usize::from(QSIZE)).filter(|h| r[d(*h)] == 1).collect();
    assert_eq!(
        in_flight,
        vec![0, 3],
        "the two requests taken were in flight"
    );
    drop(frontend);
    let (mut second, stream) = spawn(&[]);
    let mut frontend = Frontend::from_stream(stream, 1);
    let _ring = start_queue(&mut frontend, &mem, &memfd, Some((&info, &file)), 0);
    wait_used(&used_ring, 3);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_ring.idx().load(), 3, "nothing completed twice");
    let ids: Vec<u32> = (0..3)
        .map(|i| used_ring.ring().ref_at(i).expect("used").load().id())
        .collect();
    assert_eq!(
        ids,
        vec![0, 3, 6],
        "resubmitted in the order taken, then the third"
    );
    let on_disk = std::fs::read(img.as_path()).expect("image");
    for (i, sector) in [7usize, 8, 9].iter().enumerate() {
        assert!(
            on_disk[sector * 512..(sector + 1) * 512]
                .iter()
                .all(|&b| b == 0x70 + i as u8),
            "sector {sector}"
        );
    }
    drop(frontend);
    let status2 = wait_exit(&mut second, Duration::from_secs(10));
    assert!(status2.success(), "exit status {status2}");
}

/// As [`start_queue`] on a frontend whose owner, features and protocol features are set.
fn start_queue_again(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap,
    memfd: &File,
    info: &vhost::vhost_user::message::VhostUserInflight,
    file: &File,
    base: u16,
) -> (EventFd, EventFd) {
    let host_base = mem.get_host_address(GuestAddress(0)).expect("host addr") as u64;
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .expect("set_mem_table");
    frontend
        .set_inflight_fd(info, file.as_raw_fd())
        .expect("set_inflight_fd");
    let call = EventFd::new(EFD_NONBLOCK).expect("call");
    let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
    frontend.set_vring_num(0, QSIZE).expect("vring num");
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_base + 0x1_0000,
                used_ring_addr: host_base + 0x1_2000,
                avail_ring_addr: host_base + 0x1_1000,
                log_addr: None,
            },
        )
        .expect("vring addr");
    frontend.set_vring_base(0, base).expect("vring base");
    frontend.set_vring_call(0, &call).expect("vring call");
    frontend.set_vring_kick(0, &kick).expect("vring kick");
    frontend.set_vring_enable(0, true).expect("vring enable");
    (kick, call)
}
