//! End to end: the `bulkhead-console` binary under its own seccomp filter and landlock (landlock
//! off only where the kernel has none), driven by `vhost::vhost_user::Frontend` as the VMM
//! drives it, on a listening socket: the guest's output reaches a client that connects after
//! it was written, a client's input reaches the guest, a second client gets the console after
//! the first left, an emergency write and a resize go through, and the process exits 0 when the
//! frontend hangs up. A call outside its filter would kill it (SIGSYS) and fail the test.
// Tests start threads as they like (clippy.toml is about the programs' threads).
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_device_runtime::testing::{
    ask, inherit, memfd_memory, seqpacket_pair, setup_vring, wait_exit, Vring,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-console");
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 64;

/// Makes chain `i` (one descriptor in slot `i`) available and kicks.
fn offer(r: &Vring, i: u16, addr: u64, len: u32, flags: u32) {
    r.table
        .store(
            i,
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0)),
        )
        .expect("desc");
    r.avail
        .ring()
        .ref_at(usize::from(i))
        .expect("slot")
        .store(i);
    r.avail.idx().store(i + 1);
    r.kick.write(1).expect("kick");
}

fn wait_used(r: &Vring, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.used.idx().load() < n {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read from the console");
    buf
}

/// Starts the device on `listener`; `landlock` on or off.
fn start(listener: &UnixListener, landlock: bool) -> (Child, UnixStream, std::os::fd::OwnedFd) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (control, control_theirs) = seqpacket_pair();
    for fd in [
        theirs.as_raw_fd(),
        control_theirs.as_raw_fd(),
        listener.as_raw_fd(),
    ] {
        inherit(fd);
    }
    let child = Command::new(BIN)
        .args(["--socket-fd", &theirs.as_raw_fd().to_string()])
        .args(["--control-fd", &control_theirs.as_raw_fd().to_string()])
        .args(["--listen-fd", &listener.as_raw_fd().to_string()])
        .args([
            "--queue-size",
            &QSIZE.to_string(),
            "--cols",
            "100",
            "--rows",
            "30",
        ])
        .args(["--landlock", if landlock { "on" } else { "off" }])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulkhead-console");
    (child, ours, control)
}

#[test]
fn test_console_binary_under_its_filter_socket_clients_and_queues() {
    let path = std::env::temp_dir().join(format!("bh-console-e2e-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let (mut child, ours, control) = start(&listener, true);
    // A kernel without landlock: the device refuses to start with it on (exit 1); then
    // the filter alone is under test.
    std::thread::sleep(Duration::from_millis(300));
    let (mut child, ours, control) = match child.try_wait().expect("wait") {
        Some(status) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            assert!(
                err.contains("no landlock"),
                "bulkhead-console exited {status}: {err}"
            );
            println!("no landlock here: running with --landlock off, seccomp on");
            drop((ours, control));
            start(&listener, false)
        }
        None => (child, ours, control),
    };
    drop(listener);

    let mut frontend = Frontend::from_stream(ours, 2);
    frontend.set_owner().expect("set_owner");
    let features = frontend.get_features().expect("get_features");
    assert_ne!(features & 1, 0, "VIRTIO_CONSOLE_F_SIZE");
    assert_ne!(features & 4, 0, "VIRTIO_CONSOLE_F_EMERG_WRITE");
    frontend.set_features(features).expect("set_features");
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .expect("protocol features");
    assert_eq!(frontend.get_queue_num().expect("queue num"), 2);
    let (_, config) = frontend
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .expect("get_config");
    assert_eq!(&config[..8], &[100, 0, 30, 0, 1, 0, 0, 0]);

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
    let rx = setup_vring(&mut frontend, &mem, host_base, 0, 0x1_0000, QSIZE);
    let tx = setup_vring(&mut frontend, &mem, host_base, 1, 0x2_0000, QSIZE);

    // Output before anyone connected: kept for the first client.
    mem.write_slice(b"login: ", GuestAddress(0x10_0000))
        .expect("write");
    offer(&tx, 0, 0x10_0000, 7, 0);
    wait_used(&tx, 1, "the first output back");
    let mut c1 = UnixStream::connect(&path).expect("connect");
    assert_eq!(read_n(&mut c1, 7), b"login: ");
    // Input to the guest.
    offer(&rx, 0, 0x20_0000, 64, VRING_DESC_F_WRITE);
    c1.write_all(b"root\n").expect("type");
    wait_used(&rx, 1, "input in the guest");
    let e = rx.used.ring().ref_at(0).expect("used").load();
    assert_eq!(e.len(), 5);
    let mut got = [0u8; 5];
    mem.read_slice(&mut got, GuestAddress(0x20_0000))
        .expect("read");
    assert_eq!(&got, b"root\n");
    // An emergency write (configuration space offset 8).
    frontend
        .set_config(8, VhostUserConfigFlags::WRITABLE, &[b'!', 0, 0, 0])
        .expect("emerg_wr");
    assert_eq!(read_n(&mut c1, 1), b"!");
    // The client leaves; a second one gets the console, with what was written meanwhile.
    drop(c1);
    std::thread::sleep(Duration::from_millis(100));
    mem.write_slice(b"# ", GuestAddress(0x10_1000))
        .expect("write");
    offer(&tx, 1, 0x10_1000, 2, 0);
    wait_used(&tx, 2, "the second output back");
    let mut c2 = UnixStream::connect(&path).expect("reconnect");
    assert_eq!(read_n(&mut c2, 2), b"# ");
    // A resize on the control channel shows in the configuration space.
    assert_eq!(ask(&control, b"resize 132 43"), "ok cols=132 rows=43");
    let (_, config) = frontend
        .get_config(0, 4, VhostUserConfigFlags::WRITABLE, &[0u8; 4])
        .expect("get_config");
    assert_eq!(config, [132, 0, 43, 0]);
    let stats = ask(&control, b"stats");
    assert!(
        stats.contains("clients=2") && stats.contains("emerg_bytes=1"),
        "{stats}"
    );

    // The frontend hangs up: the device exits 0, having never hit its filter.
    drop(frontend);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "bulkhead-console: {status}: {err}");
    assert!(err.contains("seccomp filter installed"), "{err}");
    let _ = std::fs::remove_file(&path);
}
