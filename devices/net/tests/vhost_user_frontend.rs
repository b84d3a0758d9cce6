//! End to end: the `bulkhead-net` binary, jailed by its own landlock and seccomp filter, driven
//! by `vhost::vhost_user::Frontend` as the VMM drives it, on a real tap in a network namespace
//! of the test's own. The host side of the tap is an AF_PACKET socket: frames the guest sends
//! are captured there, frames written there reach the guest.
//!
//! Needs root (a network namespace, /dev/net/tun); skipped with a message otherwise, except
//! under `BULKHEAD_TEST_STRICT=1` (the test command), where that fails.
// Tests start threads as they like (clippy.toml is about the programs' threads).
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_device_runtime::testing::{
    ask, inherit, memfd_memory, seqpacket_pair, setup_vring, split_desc, wait_exit, Vring,
};
use bulkhead_net::Tap;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-net");
const MEM_SIZE: usize = 32 << 20;
const QSIZE: u16 = 64;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental: nothing else on the tap uses it.
const TAP: &str = "bhnet0";

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

fn ifreq(name: &str) -> IfReq {
    let mut req = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

/// Brings `name` up and returns an AF_PACKET socket bound to it (all protocols).
fn host_side(name: &str) -> OwnedFd {
    // SAFETY: plain socket creation; the result is checked.
    let ctl = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(ctl >= 0, "socket");
    // SAFETY: fresh descriptor.
    let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
    // A jumbo MTU, so a frame can need more than one 2 KiB buffer.
    let mut req = ifreq(name);
    req.data[..4].copy_from_slice(&9000i32.to_ne_bytes());
    // SAFETY: SIOCSIFMTU on an ifreq.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFMTU as libc::Ioctl, &req) };
    assert_eq!(r, 0, "SIOCSIFMTU");
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS on an ifreq.
    unsafe {
        assert_eq!(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS as libc::Ioctl, &mut req),
            0
        );
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        assert_eq!(
            libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &req),
            0
        );
    }
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFINDEX on an ifreq.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX as libc::Ioctl, &mut req) };
    assert_eq!(r, 0, "SIOCGIFINDEX");
    let index = i32::from_ne_bytes(req.data[..4].try_into().expect("4 bytes"));
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "AF_PACKET socket");
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index;
    // SAFETY: bind with a sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind AF_PACKET");
    fd
}

/// Receives frames on the host side until one with [`ETHERTYPE`] comes (or 10 s pass).
fn capture(fd: &OwnedFd) -> Vec<u8> {
    capture_where(fd, |f| {
        f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes()
    })
}

/// Receives frames on the host side until one that `wanted` accepts comes (or 10 s pass).
fn capture_where(fd: &OwnedFd, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 70000];
    loop {
        assert!(Instant::now() < deadline, "no frame from the guest");
        // SAFETY: recv into a valid buffer on an open descriptor.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let frame = &buf[..n as usize];
        if wanted(frame) {
            return frame.to_vec();
        }
    }
}

fn ethernet(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)));
    f
}

/// An Ethernet + IPv4 + TCP frame with `payload` bytes, to TCP port 5001 (from the guest's
/// MAC) or 5002 (to it); checksums are left for the offload (NEEDS_CSUM).
fn tcp_frame(dst: [u8; 6], src: [u8; 6], payload: usize) -> Vec<u8> {
    let port: u16 = if src == MAC { 5001 } else { 5002 };
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

fn is_our_tcp(f: &[u8], port: u16) -> bool {
    f.len() >= 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 && f[36..38] == port.to_be_bytes()
}

/// The frames the guest received so far, reassembled from the used ring (rx buffers at
/// 0x40_0000 + index * 0x1000): waits (10 s) for one that `wanted` accepts and returns its
/// header, the number of buffers it took and the frame.
fn received(
    rx: &Vring,
    mem: &GuestMemoryMmap,
    wanted: impl Fn(&[u8]) -> bool,
) -> ([u8; 12], u16, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = |u: u16| {
        let e = rx.used.ring().ref_at(usize::from(u)).expect("used").load();
        let mut bytes = vec![0u8; e.len() as usize];
        mem.read_slice(
            &mut bytes,
            GuestAddress(0x40_0000 + u64::from(e.id()) * 0x1000),
        )
        .expect("read");
        bytes
    };
    loop {
        assert!(
            Instant::now() < deadline,
            "the frame did not reach the guest"
        );
        let used = rx.used.idx().load();
        let mut u = 0;
        while u < used {
            let first = read(u);
            let mut hdr = [0u8; 12];
            hdr.copy_from_slice(&first[..12]);
            let num_buffers = u16::from_le_bytes([first[10], first[11]]).max(1);
            if u + num_buffers > used {
                break;
            }
            let mut frame = first[12..].to_vec();
            for k in 1..num_buffers {
                frame.extend_from_slice(&read(u + k));
            }
            if wanted(&frame) {
                return (hdr, num_buffers, frame);
            }
            u += num_buffers;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_used(rings: &Vring, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rings.used.idx().load() < n {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Says why the real-tap test cannot run here; under `BULKHEAD_TEST_STRICT=1` (the test command
/// sets it) that is a failure, not a skip.
fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
        "{why}: the real-tap test needs root (BULKHEAD_TEST_STRICT is set, so this fails)"
    );
    println!("{why}: real-tap test skipped");
}

/// A `bulkhead-net` on a tap of its own, in this thread's own network namespace, with its
/// vhost-user session up to the memory table.
struct Device {
    child: Child,
    frontend: Frontend,
    control: OwnedFd,
    host: OwnedFd,
    mem: GuestMemoryMmap,
    host_base: u64,
    _memfd: File,
}

/// Starts [`Device`] on tap `name` with `args`; `None` (having said why) where it cannot run.
fn start_device(name: &str, args: &[&str]) -> Option<Device> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        cannot_run("no /dev/net/tun");
        return None;
    }
    // SAFETY: unshare of this test thread's network namespace; children inherit it.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        cannot_run(&format!(
            "cannot create a network namespace ({})",
            std::io::Error::last_os_error()
        ));
        return None;
    }
    let tap = Tap::open_named(name, 1)
        .expect("open tap")
        .pop()
        .expect("one queue");
    let host = host_side(name);

    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (control, control_theirs) = seqpacket_pair();
    for fd in [
        theirs.as_raw_fd(),
        control_theirs.as_raw_fd(),
        tap.as_raw_fd(),
    ] {
        inherit(fd);
    }
    let child = Command::new(BIN)
        .args(["--socket-fd", &theirs.as_raw_fd().to_string()])
        .args(["--control-fd", &control_theirs.as_raw_fd().to_string()])
        .args(["--tap-fd", &tap.as_raw_fd().to_string()])
        .args(["--queue-size", &QSIZE.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn bulkhead-net");
    drop((theirs, control_theirs, tap));

    let mut frontend = Frontend::from_stream(ours, 3);
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("get_features");
    frontend.set_features(features).expect("set_features");
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .expect("protocol features");
    let (mem, memfd) = memfd_memory(MEM_SIZE);
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
    Some(Device {
        child,
        frontend,
        control,
        host,
        mem,
        host_base,
        _memfd: memfd,
    })
}

#[test]
fn test_real_tap_frames_both_ways_under_the_jail() {
    let Some(Device {
        mut child,
        mut frontend,
        control,
        host,
        mem,
        host_base,
        _memfd,
    }) = start_device(TAP, &["--mac", "52:54:00:ab:cd:ef", "--mtu", "1400"])
    else {
        return;
    };
    assert_eq!(frontend.get_queue_num().expect("queue num"), 3);
    let (_, config) = frontend
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .expect("get_config");
    assert_eq!(&config[..6], &MAC);
    assert_eq!(
        &config[6..],
        &[1, 0, 1, 0, 0x78, 0x05],
        "link up, 1 pair, mtu 1400"
    );

    let rx = setup_vring(&mut frontend, &mem, host_base, 0, 0x1_0000, QSIZE);
    let tx = setup_vring(&mut frontend, &mem, host_base, 1, 0x2_0000, QSIZE);

    // Guest → tap: a header and the frame in two descriptors.
    let out = ethernet([0xff; 6], MAC, 1000, 1);
    mem.write_slice(&[0u8; 12], GuestAddress(0x10_0000))
        .expect("hdr");
    mem.write_slice(&out, GuestAddress(0x11_0000))
        .expect("frame");
    tx.table
        .store(0, split_desc(0x10_0000, 12, VRING_DESC_F_NEXT, 1))
        .expect("desc");
    tx.table
        .store(1, split_desc(0x11_0000, out.len() as u32, 0, 0))
        .expect("desc");
    tx.avail.ring().ref_at(0).expect("slot").store(0);
    tx.avail.idx().store(1);
    tx.kick.write(1).expect("kick");
    assert_eq!(capture(&host), out);
    wait_used(&tx, 1, "the tx used entry");

    // Tap → guest: mergeable 2 KiB buffers; a 3000-byte frame takes two.
    for i in 0..8u16 {
        rx.table
            .store(
                i,
                split_desc(
                    0x40_0000 + u64::from(i) * 0x1000,
                    2048,
                    VRING_DESC_F_WRITE,
                    0,
                ),
            )
            .expect("desc");
        rx.avail
            .ring()
            .ref_at(usize::from(i))
            .expect("slot")
            .store(i);
    }
    rx.avail.idx().store(8);
    rx.kick.write(1).expect("kick");
    let incoming = ethernet(MAC, [0x02, 0, 0, 0, 0, 1], 3000, 7);
    // SAFETY: send a valid buffer on the bound AF_PACKET socket.
    let n = unsafe {
        libc::send(
            host.as_raw_fd(),
            incoming.as_ptr().cast(),
            incoming.len(),
            0,
        )
    };
    assert_eq!(
        n,
        incoming.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    // The kernel may send its own frames (IPv6 router solicitations) first: look for ours.
    let found = received(&rx, &mem, |f| {
        f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes()
    });
    assert_eq!(found.1, 2, "num_buffers");
    assert_eq!(found.2, incoming);

    // Guest → tap, TSO (HOST_TSO4): a 20000-byte TCP segment crosses the tap whole; the host
    // side sees it before any segmentation.
    let segment = tcp_frame([0x02, 0, 0, 0, 0, 1], MAC, 20000);
    let mut hdr = [0u8; 12];
    hdr[0] = 1; // NEEDS_CSUM
    hdr[1] = 1; // GSO TCPV4
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    mem.write_slice(&hdr, GuestAddress(0x12_0000)).expect("hdr");
    mem.write_slice(&segment, GuestAddress(0x12_000c))
        .expect("frame");
    tx.table
        .store(2, split_desc(0x12_0000, 12 + segment.len() as u32, 0, 0))
        .expect("desc");
    tx.avail.ring().ref_at(1).expect("slot").store(2);
    tx.avail.idx().store(2);
    tx.kick.write(1).expect("kick");
    let captured = capture_where(&host, |f| is_our_tcp(f, 5001));
    assert_eq!(captured.len(), segment.len(), "the segment crossed whole");
    assert_eq!(captured[54..], segment[54..]);

    // Tap → guest, TSO (GUEST_TSO4 made the device set TUN_F_TSO4): a 30000-byte segment sent
    // with a vnet header from the host side reaches the guest whole, over 2 KiB mergeable
    // buffers, its header saying TCPV4.
    for i in 8..60u16 {
        rx.table
            .store(
                i,
                split_desc(
                    0x40_0000 + u64::from(i) * 0x1000,
                    2048,
                    VRING_DESC_F_WRITE,
                    0,
                ),
            )
            .expect("desc");
        rx.avail
            .ring()
            .ref_at(usize::from(i))
            .expect("slot")
            .store(i);
    }
    rx.avail.idx().store(60);
    rx.kick.write(1).expect("kick");
    let big = tcp_frame(MAC, [0x02, 0, 0, 0, 0, 1], 30000);
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int.
    let r = unsafe {
        libc::setsockopt(
            host.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0, "PACKET_VNET_HDR");
    let mut packet = hdr[..10].to_vec();
    packet.extend_from_slice(&big);
    // SAFETY: send a valid buffer on the bound AF_PACKET socket.
    let n = unsafe { libc::send(host.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0) };
    assert_eq!(
        n,
        packet.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    let (vnet, buffers, frame) = received(&rx, &mem, |f| is_our_tcp(f, 5002));
    assert_eq!(frame.len(), big.len(), "the segment arrived whole");
    assert_eq!(frame[54..], big[54..]);
    assert_eq!(vnet[1], 1, "gso_type TCPV4");
    assert!(buffers >= 15, "{buffers} buffers");

    let stats = ask(&control, b"stats");
    assert!(stats.starts_with("ok rx_packets="), "{stats}");
    assert!(stats.contains(" tx_packets=2 tx_bytes=21068 "), "{stats}");
    // Every guest offload negotiated: the tap took CSUM|TSO4|TSO6|TSO_ECN (+UFO if known).
    assert!(
        stats.ends_with("offloads=0xf") || stats.ends_with("offloads=0x1f"),
        "{stats}"
    );

    // A tx ring the guest breaks (its available index jumps past the ring) is stopped, and
    // the frontend hears of it on the vring's error eventfd (VHOST_USER_SET_VRING_ERR).
    let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    frontend.set_vring_err(1, &err).expect("set_vring_err");
    // SET_VRING_ERR has no reply: a request that has one, answered after it on the same
    // socket, makes sure the device holds the eventfd before the kick reaches its worker
    // (otherwise the queue can be stopped with no eventfd to signal yet, on a busy host).
    frontend.get_features().expect("get_features");
    tx.avail.idx().store(2 + QSIZE + 100);
    tx.kick.write(1).expect("kick");
    let start = Instant::now();
    while err.read().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the tx vring's error eventfd was not signalled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = ask(&control, b"stats");
    assert!(stats.contains(" broken_queues=1 "), "{stats}");

    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// A descriptor that is not a tap queue is bad input: exit status 2, one line saying so.
#[test]
fn test_tap_fd_not_a_tap_exit_status_two() {
    let (_ours, theirs) = UnixStream::pair().expect("socketpair");
    let (not_tap, _peer) = UnixStream::pair().expect("socketpair");
    for fd in [theirs.as_raw_fd(), not_tap.as_raw_fd()] {
        inherit(fd);
    }
    let out = Command::new(BIN)
        .args(["--socket-fd", &theirs.as_raw_fd().to_string()])
        .args(["--tap-fd", &not_tap.as_raw_fd().to_string()])
        .args(["--mac", "52:54:00:ab:cd:ef"])
        .stdin(Stdio::null())
        .output()
        .expect("run bulkhead-net");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a tap queue"), "{stderr}");
    // Bad options too.
    let out = Command::new(BIN)
        .args([
            "--socket-fd",
            "3",
            "--tap-fd",
            "5",
            "--mac",
            "ff:ff:ff:ff:ff:ff",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run bulkhead-net");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Issue 8's rate limit: with a transmit limit of 10 MiB/s (`--tx-bw-size 1048576
/// --tx-bw-refill-time 100`: Firecracker's token bucket, starting full at 1 MiB), 32 MiB the
/// guest sends take 3.1 s, within 20% of 3.2 s. The driver keeps the tx ring full the whole
/// time, so the limiter is what sets the pace (the tap takes these frames at far more than
/// 10 MiB/s on any machine: the floor is the limiter's and the ceiling has room for a slow
/// host). The frames are 32 KiB, 1024 of them.
#[test]
fn test_tx_rate_limit_10_mib_per_s_holds_32_mib_near_3_2_s() {
    const FRAME: usize = 32 << 10;
    const FRAMES: u16 = 1024;
    const IN_FLIGHT: u16 = QSIZE / 2;
    let Some(Device {
        mut child,
        mut frontend,
        control,
        host: _host,
        mem,
        host_base,
        _memfd,
    }) = start_device(
        "bhrate0",
        &[
            "--mac",
            "52:54:00:ab:cd:ef",
            "--tx-bw-size",
            "1048576",
            "--tx-bw-refill-time",
            "100",
        ],
    )
    else {
        return;
    };
    let _rx = setup_vring(&mut frontend, &mem, host_base, 0, 0x1_0000, QSIZE);
    let tx = setup_vring(&mut frontend, &mem, host_base, 1, 0x2_0000, QSIZE);
    // Chain k (of IN_FLIGHT): descriptors 2k (the header) and 2k + 1 (the frame), reused.
    let frame = ethernet([0xff; 6], MAC, FRAME - 14, 3);
    for k in 0..IN_FLIGHT {
        let (hdr, data) = (
            0x10_0000 + u64::from(k) * 0x1000,
            0x20_0000 + u64::from(k) * FRAME as u64,
        );
        mem.write_slice(&[0u8; 12], GuestAddress(hdr)).expect("hdr");
        mem.write_slice(&frame, GuestAddress(data)).expect("frame");
        tx.table
            .store(2 * k, split_desc(hdr, 12, VRING_DESC_F_NEXT, 2 * k + 1))
            .expect("desc");
        tx.table
            .store(2 * k + 1, split_desc(data, FRAME as u32, 0, 0))
            .expect("desc");
    }
    let start = Instant::now();
    let mut avail: u16 = 0;
    loop {
        let used = tx.used.idx().load();
        if used >= FRAMES {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {used} of {FRAMES} frames sent in 30 s"
        );
        // Refill: the chain of each used entry goes back into the available ring.
        let mut added = false;
        while avail < FRAMES && avail.wrapping_sub(used) < IN_FLIGHT {
            let chain = if avail < IN_FLIGHT {
                2 * avail
            } else {
                let e = tx
                    .used
                    .ring()
                    .ref_at(usize::from((avail - IN_FLIGHT) % QSIZE))
                    .expect("used")
                    .load();
                e.id() as u16
            };
            tx.avail
                .ring()
                .ref_at(usize::from(avail % QSIZE))
                .expect("slot")
                .store(chain);
            avail += 1;
            added = true;
        }
        if added {
            tx.avail.idx().store(avail);
            tx.kick.write(1).expect("kick");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = start.elapsed().as_secs_f64();
    let stats = ask(&control, b"stats");
    println!("32 MiB under a 10 MiB/s transmit limit: {took:.2} s (expected 3.1 s); {stats}");
    assert!(
        stats.contains(&format!(" tx_packets={FRAMES} ")),
        "every frame reached the tap: {stats}"
    );
    assert!(
        !stats.contains(" tx_throttled=0 "),
        "never throttled: {stats}"
    );
    assert!(
        (2.56..=3.84).contains(&took),
        "32 MiB at 10 MiB/s took {took:.2} s, not within 20% of 3.2 s"
    );
    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}
