//! The backend: features, config space, queue layout, and the worker threads moving frames
//! end to end (kicks through `handle_event`, a SOCK_SEQPACKET pair standing in for the tap).

use super::*;
use crate::datapath::tests::{recv, send, seqpacket_pair};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn params(pairs: u16) -> NetParams {
    NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu: Some(1500),
        queue_pairs: pairs,
        queue_size: 256,
        rx_limit: LimiterConfig::default(),
        tx_limit: LimiterConfig::default(),
    }
}

fn backend(pairs: u16) -> (NetBackend, Vec<OwnedFd>) {
    let mut taps = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..pairs {
        let (tap, peer) = seqpacket_pair();
        taps.push(tap);
        peers.push(peer);
    }
    (
        NetBackend::new(params(pairs), taps).expect("backend"),
        peers,
    )
}

#[test]
fn test_features_offered() {
    let (b, _) = backend(1);
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_NET_F_MQ), 0, "one pair: no MQ");
    let (b2, _) = backend(2);
    assert_ne!(b2.features() & (1 << VIRTIO_NET_F_MQ), 0);
    let mut p = params(1);
    p.mtu = None;
    assert_eq!(offered_features(&p) & (1 << VIRTIO_NET_F_MTU), 0);
}

#[test]
fn test_config_space_and_queue_layout() {
    let (b, _) = backend(2);
    assert_eq!(
        b.get_config(0, 12),
        vec![0x52, 0x54, 0, 1, 2, 3, 1, 0, 2, 0, 0xdc, 0x05]
    );
    assert_eq!(b.get_config(8, 2), vec![2, 0], "max_virtqueue_pairs");
    assert_eq!(b.get_config(100, 2), vec![0, 0]);
    assert!(b.get_config(0x1000, 1).is_empty());
    assert!(b.get_config(u32::MAX, u32::MAX).is_empty());
    assert_eq!(b.num_queues(), 5);
    // rx0 tx0 + ctrl (index 4) on pair 0's thread, rx1 tx1 on pair 1's.
    assert_eq!(b.queues_per_thread(), vec![0b10011, 0b01100]);
}

#[test]
fn test_tun_offloads_follow_guest_features() {
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tun_offloads(0), 0);
    assert_eq!(
        tun_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(tun_offloads(GUEST_OFFLOADS), 0x1f);
    assert_eq!(
        tun_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        TUN_F_CSUM,
        "ECN needs TSO"
    );
    assert_eq!(
        tun_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
        TUN_F_CSUM | TUN_F_TSO6
    );
}

#[test]
fn test_ctrl_commands_follow_negotiation() {
    let (b, _) = backend(2);
    let i = &b.inner;
    assert!(
        !i.execute(Some(Command::QueuePairs(1))),
        "MQ not negotiated"
    );
    b.acked_features(b.features());
    assert_eq!(b.active_pairs(), 2);
    assert!(i.execute(Some(Command::QueuePairs(1))));
    assert_eq!(b.active_pairs(), 1);
    assert!(!i.execute(Some(Command::QueuePairs(0))));
    assert!(!i.execute(Some(Command::QueuePairs(3))));
    assert!(i.execute(Some(Command::QueuePairs(2))));
    // Offloads outside what was negotiated are refused; the socket stand-ins refuse the
    // ioctl itself, which is an ERR too.
    assert!(!i.execute(Some(Command::GuestOffloads(1 << VIRTIO_NET_F_HOST_TSO4))));
    assert!(!i.execute(Some(Command::GuestOffloads(1 << VIRTIO_NET_F_GUEST_CSUM))));
    assert!(i.execute(Some(Command::RxMode {
        command: 0,
        on: true
    })));
    assert!(i.execute(Some(Command::MacAddr([2, 0, 0, 0, 0, 1]))));
    assert!(!i.execute(None));
    b.reset_device();
    assert_eq!(b.active_pairs(), 2);
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 64 MiB of guest memory and a one-pair backend using it, with every feature but
/// `EVENT_IDX` (so the driver's calls and kicks follow the rings' flags).
fn backend_without_event_idx() -> (
    GuestMemoryMmap,
    GuestMemoryAtomic<GuestMemoryMmap>,
    NetBackend,
    Vec<OwnedFd>,
) {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).expect("memory");
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (b, peers) = backend(1);
    b.acked_features(b.features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
    b.update_memory(atomic.clone()).expect("memory");
    (mem, atomic, b, peers)
}

#[test]
fn test_workers_move_frames_both_ways_and_ctrl_answered() {
    let (mem, atomic, b, peers) = backend_without_event_idx();

    // rx at 0, tx at 1 MiB, ctrl at 2 MiB (rings laid out for 256, used as 64).
    let rx_vq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
    let tx_vq = MockSplitQueue::create(&mem, GuestAddress(MIB), 256);
    let ctrl_vq = MockSplitQueue::create(&mem, GuestAddress(2 * MIB), 256);
    let vrings: Vec<VringRwLock> = [&rx_vq, &tx_vq, &ctrl_vq]
        .iter()
        .map(|vq| {
            let v = VringRwLock::new(atomic.clone(), 256).expect("vring");
            v.set_queue_size(64);
            v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .expect("addresses");
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();

    // Guest → tap.
    let frame: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    mem.write_slice(&frame, GuestAddress(8 * MIB))
        .expect("frame");
    tx_vq
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(8 * MIB, 1000, 0, 0))],
            0,
        )
        .expect("tx chain");
    b.handle_event(1, EventSet::IN, &vrings, 0)
        .expect("tx kick");
    let mut got = None;
    wait_until("the tx frame", || {
        got = recv(&peers[0]);
        got.is_some()
    });
    assert_eq!(got.expect("frame"), frame);
    wait_until("the tx used entry", || tx_vq.used().idx().load() == 1);

    // Tap → guest: the frame arrives before the guest has buffers; a kick delivers it.
    let mut incoming = vec![0u8; 12];
    incoming.extend_from_slice(&[0x5a; 200]);
    send(&peers[0], &incoming);
    b.handle_event(0, EventSet::IN, &vrings, 0)
        .expect("rx kick");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rx_vq.used().idx().load(), 0);
    rx_vq
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                16 * MIB,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .expect("rx chain");
    b.handle_event(0, EventSet::IN, &vrings, 0)
        .expect("rx kick");
    wait_until("the rx frame", || rx_vq.used().idx().load() == 1);
    // Further frames need no kick: the tap's readiness drives the worker.
    rx_vq
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                17 * MIB,
                4096,
                VRING_DESC_F_WRITE as u16,
                1,
            ))],
            1,
        )
        .expect("rx chain");
    send(&peers[0], &incoming);
    wait_until("the second rx frame", || rx_vq.used().idx().load() == 2);
    let mut hdr = [0u8; 12];
    mem.read_slice(&mut hdr, GuestAddress(17 * MIB))
        .expect("hdr");
    assert_eq!(&hdr[10..], &[1, 0]);

    // Control queue: VQ_PAIRS_SET without MQ (one pair) is answered ERR at once.
    mem.write_slice(&[4, 0, 1, 0], GuestAddress(9 * MIB))
        .expect("command");
    ctrl_vq
        .add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(9 * MIB, 4, VRING_DESC_F_NEXT as u16, 1)),
                RawDescriptor::from(Descriptor::new(
                    9 * MIB + 64,
                    1,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )),
            ],
            0,
        )
        .expect("ctrl chain");
    b.handle_event(2, EventSet::IN, &vrings, 0)
        .expect("ctrl kick");
    assert_eq!(ctrl_vq.used().idx().load(), 1);
    let ack: u8 = mem.read_obj(GuestAddress(9 * MIB + 64)).expect("ack");
    assert_eq!(u32::from(ack), virtio_bindings::virtio_net::VIRTIO_NET_ERR);

    let stats = b.stats_line();
    assert!(
        stats.starts_with("rx_packets=2 rx_bytes=400 tx_packets=1 tx_bytes=988 "),
        "{stats}"
    );
    b.stop_workers();
}

#[test]
fn test_handle_event_bad_indices_fail_cleanly() {
    let (b, _) = backend(1);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let vring = VringRwLock::new(mem, 256).expect("vring");
    assert!(b
        .handle_event(7, EventSet::IN, std::slice::from_ref(&vring), 0)
        .is_err());
    assert!(b
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 3)
        .is_err());
    // The control queue with no such vring in the slice.
    assert!(b
        .handle_event(2, EventSet::IN, std::slice::from_ref(&vring), 0)
        .is_err());
}

/// Vrings over mock queues at `base` (rx, tx, then more), laid out for 256 and used as 64.
fn vrings_at<'a>(
    mem: &'a GuestMemoryMmap,
    atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    bases: &[u64],
) -> (Vec<MockSplitQueue<'a, GuestMemoryMmap>>, Vec<VringRwLock>) {
    let vqs: Vec<_> = bases
        .iter()
        .map(|b| MockSplitQueue::create(mem, GuestAddress(*b), 256))
        .collect();
    let vrings = vqs
        .iter()
        .map(|vq| {
            let v = VringRwLock::new(atomic.clone(), 256).expect("vring");
            v.set_queue_size(64);
            v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
                .expect("addresses");
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();
    (vqs, vrings)
}

#[test]
fn test_second_pair_has_its_own_worker_and_tap() {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).expect("memory");
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (b, peers) = backend(2);
    b.acked_features(b.features());
    b.update_memory(atomic.clone()).expect("memory");
    // Pair 1's thread sees [rx1, tx1].
    let (vqs, vrings) = vrings_at(&mem, &atomic, &[0, MIB]);
    mem.write_slice(&[7u8; 100], GuestAddress(8 * MIB))
        .expect("frame");
    vqs[1]
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(8 * MIB, 100, 0, 0))],
            0,
        )
        .expect("tx chain");
    b.handle_event(1, EventSet::IN, &vrings, 1)
        .expect("tx1 kick");
    let mut got = None;
    wait_until("the frame on tap queue 1", || {
        got = recv(&peers[1]);
        got.is_some()
    });
    assert_eq!(got.expect("frame"), vec![7u8; 100]);
    assert!(recv(&peers[0]).is_none(), "nothing on tap queue 0");

    // rx on pair 1 only while it is active.
    vqs[0]
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                16 * MIB,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .expect("rx chain");
    assert!(b.inner.execute(Some(Command::QueuePairs(1))));
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[9u8; 64]);
    send(&peers[1], &frame);
    b.handle_event(0, EventSet::IN, &vrings, 1)
        .expect("rx1 kick");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vqs[0].used().idx().load(), 0, "pair 1 is not active");
    assert!(b.inner.execute(Some(Command::QueuePairs(2))));
    wait_until("the frame on rx1", || vqs[0].used().idx().load() == 1);
    b.stop_workers();
}

#[test]
fn test_tx_rate_limit_holds_and_resumes_without_kicks() {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).expect("memory");
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (tap, peer) = seqpacket_pair();
    let mut p = params(1);
    // 100 KiB per 100 ms (1 MiB/s), full at start.
    p.tx_limit.bandwidth = bulkhead_device_runtime::rate::BucketConfig {
        size: 100 << 10,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    let b = NetBackend::new(p, vec![tap]).expect("backend");
    b.acked_features(b.features());
    b.update_memory(atomic.clone()).expect("memory");
    let (vqs, vrings) = vrings_at(&mem, &atomic, &[0, MIB, 2 * MIB]);
    // 40 frames of 10 KiB (header included): 400 KiB, 300 KiB beyond the first bucket.
    let frame_len = 10 << 10;
    let raw: Vec<RawDescriptor> = (0..40)
        .map(|_| RawDescriptor::from(Descriptor::new(8 * MIB, frame_len, 0, 0)))
        .collect();
    vqs[1].add_desc_chains(&raw, 0).expect("tx chains");
    let start = Instant::now();
    b.handle_event(1, EventSet::IN, &vrings, 0)
        .expect("tx kick");
    let mut frames = 0;
    wait_until("every frame", || {
        while recv(&peer).is_some() {
            frames += 1;
        }
        frames == 40
    });
    let took = start.elapsed();
    // (400 - 100 - 12 * 40 / 1024) KiB at 1 KiB/ms: about 300 ms; never much faster.
    assert!(
        took >= Duration::from_millis(270) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let stats = b.stats_line();
    assert!(!stats.contains("tx_throttled=0 "), "{stats}");
    b.stop_workers();
}

#[test]
fn test_tx_steady_stream_calls_the_driver_once_per_half_ring() {
    // No EVENT_IDX and no NO_INTERRUPT flag: the driver wants every call the device makes.
    let (mem, atomic, b, peers) = backend_without_event_idx();
    let (vqs, vrings) = vrings_at(&mem, &atomic, &[0, MIB, 2 * MIB]);
    vrings[1].set_queue_size(256);
    let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    // SAFETY: a new descriptor of the eventfd, owned by the File from here on.
    let file = unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
            call.try_clone().expect("clone"),
        ))
    };
    vrings[1].set_call(Some(file));
    // 130 frames: two full rounds of 64 (the first leaves the driver uncalled, the second is
    // half the ring and calls), then 2 and the ring is empty (calls).
    let raw: Vec<RawDescriptor> = (0..130)
        .map(|_| RawDescriptor::from(Descriptor::new(8 * MIB, 100, 0, 0)))
        .collect();
    vqs[1].add_desc_chains(&raw, 0).expect("tx chains");
    b.handle_event(1, EventSet::IN, &vrings, 0)
        .expect("tx kick");
    let mut frames = 0;
    wait_until("every frame", || {
        while recv(&peers[0]).is_some() {
            frames += 1;
        }
        frames == 130 && vqs[1].used().idx().load() == 130
    });
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(call.read().expect("calls"), 2);
    b.stop_workers();
}
