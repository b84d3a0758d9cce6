//! The frame path against an in-memory guest (MockSplitQueue) and a tap stand-in: a
//! non-blocking SOCK_SEQPACKET socket pair, which keeps frame boundaries as a tap does.

use super::*;
use crate::writebatch::WriteBatch;
use bulkhead_device_runtime::rate::{BucketConfig, LimiterConfig};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::AsRawFd;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 64;

pub(crate) fn seqpacket_pair() -> (Tap, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // Room for several 64 KiB frames in flight.
    for fd in fds {
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt reads an int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            Tap::from_fd(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

pub(crate) fn send(peer: &OwnedFd, bytes: &[u8]) {
    // SAFETY: write from a valid slice on an open descriptor.
    let n = unsafe { libc::write(peer.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, bytes.len() as isize, "{}", io::Error::last_os_error());
}

pub(crate) fn recv(peer: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2 * RX_BUF_LEN];
    // SAFETY: read into a valid buffer on an open descriptor.
    let n = unsafe {
        libc::recv(
            peer.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// A frame as the tap hands it: a 12-byte header with `flags`, then `len` bytes of pattern.
fn tap_frame(flags: u8, len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = flags;
    f[10] = 0xee; // num_buffers as the tap leaves it: garbage the device overwrites.
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)]).expect("memory")
}

use bulkhead_device_runtime::testing::MockRing as Ring;

fn mrg() -> Negotiated {
    Negotiated {
        hdr_len: VNET_HDR_LEN,
        mrg_rxbuf: true,
        guest_csum: true,
    }
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
    v
}

#[test]
fn test_rx_single_buffer_frame_and_num_buffers_one() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 2048, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let frame = tap_frame(0, 60, 1);
    send(&peer, &frame);
    let stats = Stats::default();
    let mut rx = RxState::default();
    let neg = Negotiated::default();
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &neg, None, &stats).expect("rx");
    assert_eq!(
        round,
        Round {
            used: true,
            stop: Stop::Idle
        }
    );
    assert_eq!(ring.used(), vec![(0, 72)]);
    let got = read_guest(&mem, MIB, 72);
    assert_eq!(&got[..10], &frame[..10]);
    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
    assert_eq!(&got[12..], &frame[12..]);
    assert_eq!(count(&stats.rx_packets), 1);
    assert_eq!(count(&stats.rx_bytes), 60);
}

#[test]
fn test_rx_mrg_rxbuf_splits_frame_over_chains() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    for i in 0..8 {
        ring.chain(&[(MIB + i * 0x1000, 1500, true)]);
    }
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let frame = tap_frame(1, 5000, 3);
    send(&peer, &frame);
    let stats = Stats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(ring.used(), vec![(0, 1500), (1, 1500), (2, 1500), (3, 512)]);
    let mut got = Vec::new();
    for (i, len) in [1500usize, 1500, 1500, 512].iter().enumerate() {
        got.extend(read_guest(&mem, MIB + i as u64 * 0x1000, *len));
    }
    assert_eq!(&got[10..12], &[4, 0], "num_buffers");
    assert_eq!(got[0], 1, "flags kept with guest_csum");
    assert_eq!(&got[12..], &frame[12..]);
}

#[test]
fn test_rx_largest_frame_in_page_buffers() {
    // The largest frame (64 KiB GSO + headers) in 4 KiB mergeable buffers: 17 of them.
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    for i in 0..20 {
        ring.chain(&[(MIB + i * 0x1000, 4096, true)]);
    }
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let frame = tap_frame(1, MAX_FRAME_LEN, 9);
    send(&peer, &frame);
    let stats = Stats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    let used = ring.used();
    assert_eq!(used.len(), 17);
    assert_eq!(
        used.iter().map(|u| u.1 as usize).sum::<usize>(),
        frame.len()
    );
    let got = read_guest(&mem, MIB, frame.len());
    assert_eq!(&got[10..12], &17u16.to_le_bytes());
    assert_eq!(&got[12..], &frame[12..]);
}

#[test]
fn test_rx_too_few_buffers_waits_then_resumes_in_order() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 1500, true)]);
    ring.chain(&[(MIB + 0x1000, 1500, true)]);
    let mut q = ring.queue();
    q.set_event_idx(true);
    let (tap, peer) = seqpacket_pair();
    let big = tap_frame(0, 4000, 5);
    let small = tap_frame(0, 100, 6);
    send(&peer, &big);
    send(&peer, &small);
    let stats = Stats::default();
    let mut rx = RxState::default();
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(round.stop, Stop::NoBuffers);
    assert!(ring.used().is_empty(), "nothing published");
    assert_eq!(q.next_avail(), 0, "chains given back");
    assert!(rx.has_pending());
    // The small frame is still in the tap: the device stopped reading it.
    // The avail event asks for a kick once the guest adds past the two buffers it has.
    let avail_event: u16 = mem
        .read_obj(
            ring.vq
                .used_addr()
                .checked_add(4 + 8 * u64::from(QSIZE))
                .expect("addr"),
        )
        .expect("avail event");
    assert_eq!(avail_event, 2);
    // A second round without new buffers: still waiting, nothing read.
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(round.stop, Stop::NoBuffers);
    ring.chain(&[(MIB + 0x2000, 1500, true)]);
    ring.chain(&[(MIB + 0x3000, 1500, true)]);
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(ring.used(), vec![(0, 1500), (1, 1500), (2, 1012), (3, 112)]);
    let got = read_guest(&mem, MIB, 12);
    assert_eq!(&got[10..12], &3u16.to_le_bytes());
    let got = read_guest(&mem, MIB + 0x3000, 112);
    assert_eq!(&got[12..], &small[12..]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
}

#[test]
fn test_rx_without_mrg_short_buffer_drops_frame_keeps_buffer() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 1000, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    send(&peer, &tap_frame(0, 2000, 1));
    let small = tap_frame(2, 50, 2);
    send(&peer, &small);
    let stats = Stats::default();
    let mut rx = RxState::default();
    let neg = Negotiated::default();
    process_rx(&mut q, &mem, &tap, &mut rx, &neg, None, &stats).expect("rx");
    assert_eq!(count(&stats.rx_dropped), 1);
    assert_eq!(ring.used(), vec![(0, 62)], "the buffer took the next frame");
    let got = read_guest(&mem, MIB, 62);
    assert_eq!(got[0], 0, "DATA_VALID cleared without GUEST_CSUM");
    assert_eq!(&got[12..], &small[12..]);
}

#[test]
fn test_rx_legacy_header_is_ten_bytes() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 2048, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let frame = tap_frame(0, 64, 4);
    send(&peer, &frame);
    let stats = Stats::default();
    let mut rx = RxState::default();
    let neg = Negotiated {
        hdr_len: LEGACY_HDR_LEN,
        mrg_rxbuf: false,
        guest_csum: false,
    };
    process_rx(&mut q, &mem, &tap, &mut rx, &neg, None, &stats).expect("rx");
    assert_eq!(ring.used(), vec![(0, 74)]);
    let got = read_guest(&mem, MIB, 74);
    assert_eq!(&got[10..], &frame[12..]);
}

#[test]
fn test_rx_bad_chains_refused_frame_dropped() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    // A device-readable buffer, one outside guest memory, then a good one.
    ring.chain(&[(MIB, 1500, false)]);
    ring.chain(&[(1 << 40, 1500, true)]);
    ring.chain(&[(MIB + 0x1000, 1500, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    for seed in 0..3 {
        send(&peer, &tap_frame(0, 100, seed));
    }
    let stats = Stats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(ring.used(), vec![(0, 0), (1, 0), (2, 112)]);
    assert_eq!(count(&stats.bad_chains), 2);
    assert_eq!(count(&stats.rx_dropped), 2);
    assert_eq!(count(&stats.rx_packets), 1);
}

#[test]
fn test_rx_frame_larger_than_whole_ring_dropped() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    // Every entry of the ring, 16 bytes each: 1 KiB can never hold a 2 KiB frame.
    for i in 0..u64::from(QSIZE) {
        ring.chain(&[(MIB + i * 16, 16, true)]);
    }
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    send(&peer, &tap_frame(0, 2048, 1));
    let stats = Stats::default();
    let mut rx = RxState::default();
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(count(&stats.rx_dropped), 1);
    assert!(ring.used().is_empty(), "{:?}", ring.used());
}

#[test]
fn test_rx_throttled_keeps_frame_until_tokens() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 2048, true)]);
    ring.chain(&[(MIB + 0x1000, 2048, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    send(&peer, &tap_frame(0, 100, 1));
    send(&peer, &tap_frame(0, 100, 2));
    let limiter = Mutex::new(RateLimiter::new(&LimiterConfig {
        bandwidth: BucketConfig::default(),
        ops: BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 60_000,
        },
    }));
    let stats = Stats::default();
    let mut rx = RxState::default();
    let round =
        process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), Some(&limiter), &stats).expect("rx");
    assert!(matches!(round.stop, Stop::Throttled(d) if d > Duration::from_secs(50)));
    assert_eq!(ring.used().len(), 1);
    assert!(rx.has_pending());
    assert_eq!(count(&stats.rx_throttled), 1);
}

#[test]
fn test_rx_broken_ring_is_an_error_not_a_panic() {
    let mem = memory();
    let ring = Ring::new(&mem, QSIZE);
    let mut q = ring.queue();
    // The available index a whole queue and more ahead.
    ring.vq.avail().idx().store(QSIZE + 5);
    let (tap, peer) = seqpacket_pair();
    send(&peer, &tap_frame(0, 100, 1));
    let mut rx = RxState::default();
    let r = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &Stats::default());
    assert!(matches!(r, Err(QueueError::AvailRing(_))), "{r:?}");
    // A head index past the queue.
    let ring = Ring::new(&mem, QSIZE);
    let mut q = ring.queue();
    ring.vq
        .avail()
        .ring()
        .ref_at(0)
        .expect("entry")
        .store(QSIZE + 3);
    ring.vq.avail().idx().store(1);
    let r = process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &Stats::default());
    assert!(matches!(r, Err(QueueError::HeadIndex(_))), "{r:?}");
}

/// One tx round with no batch, the default header and no limiter.
fn tx_plain(q: &mut Queue, mem: &GuestMemoryMmap, tap: &Tap, stats: &Stats) -> Round {
    process_tx(
        q,
        mem,
        tap,
        &mut TxState::default(),
        &Negotiated::default(),
        None,
        stats,
    )
    .expect("tx")
}

#[test]
fn test_tx_header_passed_through_to_tap() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    let frame = tap_frame(1, 3000, 8);
    mem.write_slice(&frame[..12], GuestAddress(MIB))
        .expect("hdr");
    mem.write_slice(&frame[12..], GuestAddress(2 * MIB))
        .expect("data");
    ring.chain(&[(MIB, 12, false), (2 * MIB, 3000, false)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let stats = Stats::default();
    let round = tx_plain(&mut q, &mem, &tap, &stats);
    assert_eq!(
        round,
        Round {
            used: true,
            stop: Stop::Idle
        }
    );
    assert_eq!(recv(&peer).expect("frame"), frame);
    assert_eq!(ring.used(), vec![(0, 0)]);
    assert_eq!(count(&stats.tx_bytes), 3000);
}

#[test]
fn test_tx_legacy_header_widened() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    let mut chain = vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    chain.extend_from_slice(&[0xab; 60]);
    mem.write_slice(&chain, GuestAddress(MIB)).expect("write");
    ring.chain(&[(MIB, 70, false)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let neg = Negotiated {
        hdr_len: LEGACY_HDR_LEN,
        mrg_rxbuf: false,
        guest_csum: false,
    };
    process_tx(
        &mut q,
        &mem,
        &tap,
        &mut TxState::default(),
        &neg,
        None,
        &Stats::default(),
    )
    .expect("tx");
    let got = recv(&peer).expect("frame");
    assert_eq!(&got[..10], &chain[..10]);
    assert_eq!(&got[10..12], &[0, 0]);
    assert_eq!(&got[12..], &chain[10..]);
}

#[test]
fn test_tx_bad_chains_refused_nothing_sent() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 12, false), (2 * MIB, 100, true)]); // writable in a tx chain
    ring.chain(&[(MIB, 8, false)]); // shorter than the header
    ring.chain(&[(1 << 40, 100, false)]); // outside guest memory
    ring.chain(&[(MIB, u32::MAX, false)]); // larger than any frame
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let stats = Stats::default();
    tx_plain(&mut q, &mem, &tap, &stats);
    assert!(recv(&peer).is_none());
    assert_eq!(ring.used(), vec![(0, 0), (2, 0), (3, 0), (4, 0)]);
    assert_eq!(count(&stats.bad_chains), 4);
}

#[test]
fn test_tx_descriptor_across_two_regions_is_sent_whole() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 32 * MIB as usize),
        (GuestAddress(32 * MIB), 32 * MIB as usize),
    ])
    .expect("memory");
    let mut ring = Ring::new(&mem, QSIZE);
    let frame = tap_frame(0, 3000, 5);
    let at = 32 * MIB - 1000;
    mem.write_slice(&frame, GuestAddress(at)).expect("frame");
    ring.chain(&[(at, frame.len() as u32, false)]);
    // Runs past the end of guest memory.
    ring.chain(&[(64 * MIB - 100, 200, false)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let stats = Stats::default();
    tx_plain(&mut q, &mem, &tap, &stats);
    assert_eq!(recv(&peer).expect("frame"), frame);
    assert!(recv(&peer).is_none());
    assert_eq!(ring.used(), vec![(0, 0), (1, 0)]);
    assert_eq!(count(&stats.bad_chains), 1);
}

#[test]
fn test_tx_looping_chain_bounded() {
    let mem = memory();
    let ring = Ring::new(&mem, QSIZE);
    // One descriptor whose next is itself, with NEXT set: walked at most a queue's length.
    let raw = RawDescriptor::from(Descriptor::new(MIB, 64, VRING_DESC_F_NEXT as u16, 0));
    ring.vq.add_desc_chains(&[raw], 0).expect("chain");
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let stats = Stats::default();
    tx_plain(&mut q, &mem, &tap, &stats);
    let got = recv(&peer).expect("a frame of the walked bytes");
    assert_eq!(got.len(), 64 * usize::from(QSIZE));
}

#[test]
fn test_tx_throttled_rewinds_and_resumes() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    for _ in 0..3 {
        ring.chain(&[(MIB, 112, false)]);
    }
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    let limiter = Mutex::new(RateLimiter::new(&LimiterConfig {
        bandwidth: BucketConfig {
            size: 200,
            one_time_burst: 0,
            refill_time_ms: 20,
        },
        ops: BucketConfig::default(),
    }));
    let stats = Stats::default();
    let mut tx = TxState::default();
    let neg = Negotiated::default();
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, Some(&limiter), &stats).expect("tx");
    let Stop::Throttled(wait) = round.stop else {
        panic!("not throttled: {round:?}");
    };
    assert!(wait <= Duration::from_millis(20));
    assert_eq!(ring.used().len(), 2);
    assert_eq!(q.next_avail(), 2, "the throttled chain stays in the ring");
    std::thread::sleep(wait + Duration::from_millis(2));
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, Some(&limiter), &stats).expect("tx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(ring.used().len(), 3);
    for _ in 0..3 {
        assert_eq!(recv(&peer).expect("frame").len(), 112);
    }
}

#[test]
fn test_tx_budget_bounds_one_round() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 256);
    for _ in 0..(BATCH + 3) {
        ring.chain(&[(MIB, 60, false)]);
    }
    let mut q = ring.queue();
    let (tap, _peer) = seqpacket_pair();
    let stats = Stats::default();
    let mut tx = TxState::default();
    let neg = Negotiated::default();
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, None, &stats).expect("tx");
    assert_eq!(round.stop, Stop::Budget);
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, None, &stats).expect("tx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(ring.used().len(), BATCH + 3);
}

#[test]
fn test_rx_first_buffer_smaller_than_header_refused() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 8, true)]);
    ring.chain(&[(MIB + 0x1000, 1500, true)]);
    ring.chain(&[(MIB + 0x2000, 1500, true)]);
    let mut q = ring.queue();
    let (tap, peer) = seqpacket_pair();
    send(&peer, &tap_frame(0, 100, 1));
    let stats = Stats::default();
    let mut rx = RxState::default();
    process_rx(&mut q, &mem, &tap, &mut rx, &mrg(), None, &stats).expect("rx");
    assert_eq!(ring.used(), vec![(0, 0)]);
    assert_eq!(count(&stats.bad_chains), 1);
}

/// `corrupt=N`'s frame: a checksum left to offload is completed (the receiver's sum over the
/// pseudo-header and the segment comes out right before the flip and wrong after it), the
/// flag is cleared, the last byte flipped; offsets outside the frame change nothing.
#[test]
fn test_corrupt_frame_completes_offloaded_checksum_then_flips() {
    let ones = |data: &[u8], extra: u16| {
        let mut s = u64::from(!internet_sum(data)) + u64::from(extra);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    };
    // Header: NEEDS_CSUM, no GSO, csum_start 34 (Ethernet + IPv4), csum_offset 6 (UDP).
    let mut frame = vec![0u8; VNET_HDR_LEN + 34 + 8 + 37];
    frame[HDR_FLAGS] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    frame[HDR_CSUM_START..HDR_CSUM_START + 2].copy_from_slice(&34u16.to_le_bytes());
    frame[HDR_CSUM_OFFSET..HDR_CSUM_OFFSET + 2].copy_from_slice(&6u16.to_le_bytes());
    for (i, b) in frame[VNET_HDR_LEN + 34..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    // The field holds the pseudo-header's sum, as Linux leaves it for the device.
    let pseudo: u16 = 0x1234;
    let field = VNET_HDR_LEN + 34 + 6;
    frame[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let mut sent = frame.clone();
    assert!(corrupt_frame(&mut sent));
    assert_eq!(u32::from(sent[HDR_FLAGS]) & VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
    let last = sent.len() - 1;
    assert_eq!(sent[last], frame[last] ^ 0xff);
    let segment = VNET_HDR_LEN + 34;
    assert_ne!(ones(&sent[segment..], pseudo), 0xffff, "the flip is caught");
    let mut unflipped = sent.clone();
    unflipped[last] ^= 0xff;
    assert_eq!(
        ones(&unflipped[segment..], pseudo),
        0xffff,
        "checksum completed"
    );
    // Without NEEDS_CSUM only the byte changes.
    let mut plain = frame.clone();
    plain[HDR_FLAGS] = 0;
    let before = plain.clone();
    assert!(corrupt_frame(&mut plain));
    let changed: Vec<usize> = (0..plain.len())
        .filter(|&i| plain[i] != before[i])
        .collect();
    assert_eq!(changed, [last]);
    // A checksum field past the end, or no frame at all: nothing changes.
    let mut bad = frame.clone();
    bad[HDR_CSUM_OFFSET..HDR_CSUM_OFFSET + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    let copy = bad.clone();
    assert!(!corrupt_frame(&mut bad));
    assert_eq!(bad, copy);
    assert!(!corrupt_frame(&mut [0u8; VNET_HDR_LEN]));
}

/// An rx side that reads the tap in batches (what the device runs with where io_uring is
/// there). Where it is not (qemu-user runs these tests for aarch64) the test says so and is
/// not run; under `BULKHEAD_TEST_STRICT=1` (the test command on the build machine) that fails.
fn read_ahead_rx(tap: &Tap) -> Option<RxState> {
    match ReadAhead::new(RX_BUF_LEN, tap) {
        Ok(ahead) => Some(RxState::with_read_ahead(ahead)),
        Err(e) => {
            assert!(
                std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                "io_uring unavailable ({e}; BULKHEAD_TEST_STRICT is set, so this fails)"
            );
            eprintln!("io_uring unavailable ({e}): read-ahead test not run");
            None
        }
    }
}

/// The guest's copy of the frame in the 2 KiB buffer at `MIB + i * 0x1000`, header dropped.
fn guest_frame(mem: &GuestMemoryMmap, i: u64, len: usize) -> Vec<u8> {
    read_guest(mem, MIB + i * 0x1000, VNET_HDR_LEN + len)[VNET_HDR_LEN..].to_vec()
}

#[test]
fn test_rx_read_ahead_keeps_the_taps_order_and_drains_it() {
    let (tap, peer) = seqpacket_pair();
    let Some(mut rx) = read_ahead_rx(&tap) else {
        return;
    };
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    for i in 0..50 {
        ring.chain(&[(MIB + i * 0x1000, 2048, true)]);
    }
    let mut q = ring.queue();
    let frames: Vec<Vec<u8>> = (0..40).map(|i| tap_frame(0, 60 + i, i as u8)).collect();
    for f in &frames {
        send(&peer, f);
    }
    let stats = Stats::default();
    let neg = Negotiated::default();
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &neg, None, &stats).expect("rx");
    assert_eq!(
        round.stop,
        Stop::Idle,
        "the tap was read until it was empty"
    );
    let used = ring.used();
    assert_eq!(used.len(), 40);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            used[i],
            (i as u32, f.len() as u32),
            "frame {i} in chain {i}"
        );
        assert_eq!(
            guest_frame(&mem, i as u64, f.len() - VNET_HDR_LEN),
            f[VNET_HDR_LEN..]
        );
    }
    // Frames that come later are read by the next round.
    send(&peer, &frames[0]);
    let round = process_rx(&mut q, &mem, &tap, &mut rx, &neg, None, &stats).expect("rx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(ring.used().len(), 41);
}

/// A batch's "tap empty" holds for the round that read it only. Here the batch that found the
/// tap empty was read before the guest ran out of buffers; frames came while the device waited
/// for buffers (on a tap their readiness edges were spent then), so the round after the kick
/// must read the tap again, not end on the old batch's EAGAIN with frames left in the tap.
#[test]
fn test_rx_read_ahead_reads_again_after_waiting_for_buffers() {
    let (tap, peer) = seqpacket_pair();
    let Some(mut rx) = read_ahead_rx(&tap) else {
        return;
    };
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 2048, true)]);
    ring.chain(&[(MIB + 0x1000, 2048, true)]);
    let mut q = ring.queue();
    let frames: Vec<Vec<u8>> = (0..5).map(|i| tap_frame(0, 100 + i, i as u8)).collect();
    for f in &frames[..3] {
        send(&peer, f);
    }
    // A batch of two (both frames), then of four (the third frame and three EAGAINs); the third
    // frame finds no buffer.
    assert_eq!(round_stop(&mut q, &mem, &tap, &mut rx), Stop::NoBuffers);
    assert_eq!(ring.used().len(), 2);
    for f in &frames[3..] {
        send(&peer, f);
    }
    for i in 2..5 {
        ring.chain(&[(MIB + i * 0x1000, 2048, true)]);
    }
    assert_eq!(round_stop(&mut q, &mem, &tap, &mut rx), Stop::Idle);
    let used = ring.used();
    assert_eq!(
        used.len(),
        5,
        "the frames that came while waiting were read: {used:?}"
    );
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            guest_frame(&mem, i as u64, f.len() - VNET_HDR_LEN),
            f[VNET_HDR_LEN..]
        );
    }
    assert!(recv_tap_empty(&tap), "nothing left in the tap");
}

/// One rx round with the modern header and fresh stats: how it ended.
fn round_stop(q: &mut Queue, mem: &GuestMemoryMmap, tap: &Tap, rx: &mut RxState) -> Stop {
    let (neg, stats) = (Negotiated::default(), Stats::default());
    process_rx(q, mem, tap, rx, &neg, None, &stats)
        .expect("rx")
        .stop
}

fn recv_tap_empty(tap: &Tap) -> bool {
    let mut buf = vec![0u8; RX_BUF_LEN];
    matches!(tap.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[test]
fn test_rx_read_ahead_reset_drops_what_was_read_ahead() {
    let (tap, peer) = seqpacket_pair();
    let Some(mut rx) = read_ahead_rx(&tap) else {
        return;
    };
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 2048, true)]);
    let mut q = ring.queue();
    for i in 0..4 {
        send(&peer, &tap_frame(0, 80, i));
    }
    // Two frames read in the first batch: one placed, one pending without a buffer; the next
    // batch is not read while a frame waits.
    assert_eq!(round_stop(&mut q, &mem, &tap, &mut rx), Stop::NoBuffers);
    assert_eq!(ring.used().len(), 1);
    assert_eq!(rx.reset(), 1, "the pending frame");
    // After a reset the device starts from the tap again: the two frames still there.
    let mut ring = Ring::new(&mem, QSIZE);
    for i in 0..4 {
        ring.chain(&[(MIB + i * 0x1000, 2048, true)]);
    }
    let mut q = ring.queue();
    assert_eq!(round_stop(&mut q, &mem, &tap, &mut rx), Stop::Idle);
    assert_eq!(ring.used().len(), 2);
    let third = tap_frame(0, 80, 2);
    assert_eq!(guest_frame(&mem, 0, 80), third[VNET_HDR_LEN..]);
}

/// A tx side that writes in batches (what the device runs with where io_uring is there, on a
/// tap with tun's unlimited send buffer), and guest memory. Where it is not (qemu-user runs these tests for
/// aarch64) the test says so and is not run; under `BULKHEAD_TEST_STRICT=1` that fails.
fn batched_tx(tap: &Tap) -> Option<(TxState, GuestMemoryMmap)> {
    match WriteBatch::new(tap) {
        Ok(batch) => Some((TxState::with_write_batch(batch), memory())),
        Err(e) => {
            assert!(
                std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                "io_uring unavailable ({e}; BULKHEAD_TEST_STRICT is set, so this fails)"
            );
            eprintln!("io_uring unavailable ({e}): write-batch test not run");
            None
        }
    }
}

/// `n` one-descriptor tx chains, frame `i` of `len(i)` bytes after its header, each byte
/// telling which frame it belongs to; the frames as the tap should get them.
fn tx_frames(
    mem: &GuestMemoryMmap,
    ring: &mut Ring,
    n: usize,
    len: impl Fn(usize) -> usize,
) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let frame = tap_frame(0, len(i), i as u8);
            let addr = MIB + i as u64 * 0x1_0000;
            mem.write_slice(&frame, GuestAddress(addr)).expect("frame");
            ring.chain(&[(addr, frame.len() as u32, false)]);
            frame
        })
        .collect()
}

fn drain(peer: &OwnedFd) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| recv(peer)).collect()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// Batches of up to 16 frames, two-piece chains (WRITEV) and one-piece ones (WRITE) mixed,
/// and malformed chains between them: every good frame reaches the tap once, in the ring's
/// order, and every chain is returned once, in order.
#[test]
fn test_tx_write_batch_keeps_order_and_returns_every_chain() {
    let (tap, peer) = seqpacket_pair();
    let Some((mut tx, mem)) = batched_tx(&tap) else {
        return;
    };
    let mut ring = Ring::new(&mem, 256);
    let mut want = Vec::new();
    let mut heads = Vec::new();
    for i in 0..40usize {
        let frame = tap_frame(0, 60 + 17 * i, i as u8);
        let addr = MIB + i as u64 * 0x1_0000;
        mem.write_slice(&frame, GuestAddress(addr)).expect("frame");
        let head = if i % 3 == 0 {
            ring.chain(&[
                (addr, 12, false),
                (addr + 12, frame.len() as u32 - 12, false),
            ])
        } else {
            ring.chain(&[(addr, frame.len() as u32, false)])
        };
        heads.push(head);
        want.push(frame);
        if i % 13 == 5 {
            // Device-writable in a tx chain: refused between batched frames.
            heads.push(ring.chain(&[(addr, 100, true)]));
        }
    }
    let mut q = ring.queue();
    let stats = Stats::default();
    let neg = Negotiated::default();
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, None, &stats).expect("tx");
    assert_eq!(round.stop, Stop::Idle);
    assert!(tx.batched(), "batching stayed on");
    assert_eq!(drain(&peer), want);
    let used: Vec<u32> = ring.used().iter().map(|&(h, _)| h).collect();
    assert_eq!(
        used,
        heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>()
    );
    assert_eq!(count(&stats.tx_packets), 40);
    assert_eq!(count(&stats.bad_chains), 3);
}

/// A frame the tap refuses for good (here larger than the socket takes: EMSGSIZE) in the
/// middle of a batch is lost, as on a wire; the frames after it still go, in order.
#[test]
fn test_tx_write_batch_frame_refused_for_good_is_dropped_alone() {
    let (tap, peer) = seqpacket_pair();
    let Some((mut tx, mem)) = batched_tx(&tap) else {
        return;
    };
    let mut ring = Ring::new(&mem, QSIZE);
    // 16 KiB of send buffer (the pair has 4 MiB): the 60000-byte frame can never fit
    // (EMSGSIZE), the 100-byte ones do.
    set_sndbuf(&tap, 16 << 10);
    let want = tx_frames(&mem, &mut ring, 6, |i| if i == 2 { 60_000 } else { 100 });
    let mut q = ring.queue();
    let stats = Stats::default();
    let round = process_tx(
        &mut q,
        &mem,
        &tap,
        &mut tx,
        &Negotiated::default(),
        None,
        &stats,
    )
    .expect("tx");
    assert_eq!(round.stop, Stop::Idle);
    let mut expected = want.clone();
    expected.remove(2);
    assert_eq!(drain(&peer), expected);
    assert_eq!(ring.used().len(), 6);
    assert_eq!(count(&stats.tx_dropped), 1);
    assert_eq!(count(&stats.tx_packets), 5);
    assert!(
        tx.batched(),
        "a frame refused for good does not stop batching"
    );
}

fn set_sndbuf(tap: &Tap, size: libc::c_int) {
    // SAFETY: setsockopt reads an int.
    let r = unsafe {
        libc::setsockopt(
            tap.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(r, 0);
}

/// A tap whose send buffer fills in the middle of a batch (a limited one: EAGAIN): the frames
/// it took are returned, the refused one and those after it stay in the ring, batching stops,
/// and once the tap drains the rest goes out in order: nothing lost, nothing reordered.
#[test]
fn test_tx_write_batch_tap_full_rewinds_in_order() {
    let (tap, peer) = seqpacket_pair();
    let Some((mut tx, mem)) = batched_tx(&tap) else {
        return;
    };
    let mut ring = Ring::new(&mem, QSIZE);
    set_sndbuf(&tap, 16 << 10);
    let want = tx_frames(&mem, &mut ring, 16, |_| 3000);
    let mut q = ring.queue();
    let stats = Stats::default();
    let neg = Negotiated::default();
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, None, &stats).expect("tx");
    assert_eq!(round.stop, Stop::TapFull);
    assert!(!tx.batched(), "a full send buffer ends batching");
    let took = ring.used().len();
    assert!(
        took > 0 && took < 16,
        "{took} frames went before the buffer was full"
    );
    assert_eq!(
        usize::from(q.next_avail()),
        took,
        "the rest is back in the ring"
    );
    let mut got = drain(&peer);
    while got.len() < want.len() {
        let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, None, &stats).expect("tx");
        got.extend(drain(&peer));
        if round.stop == Stop::Idle {
            break;
        }
    }
    got.extend(drain(&peer));
    assert_eq!(got, want);
    assert_eq!(ring.used().len(), 16);
    assert_eq!(count(&stats.tx_dropped), 0);
}

/// Throttled in the middle of a batch: the frames before the refused one go out, it and the
/// rest wait in the ring, and are sent in order once the tokens are there.
#[test]
fn test_tx_write_batch_throttled_sends_those_before() {
    let (tap, peer) = seqpacket_pair();
    let Some((mut tx, mem)) = batched_tx(&tap) else {
        return;
    };
    let mut ring = Ring::new(&mem, QSIZE);
    let want = tx_frames(&mem, &mut ring, 5, |_| 100);
    let mut q = ring.queue();
    let limiter = Mutex::new(RateLimiter::new(&LimiterConfig {
        bandwidth: BucketConfig {
            size: 300,
            one_time_burst: 0,
            refill_time_ms: 20,
        },
        ops: BucketConfig::default(),
    }));
    let stats = Stats::default();
    let neg = Negotiated::default();
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, Some(&limiter), &stats).expect("tx");
    let Stop::Throttled(wait) = round.stop else {
        panic!("not throttled: {round:?}");
    };
    assert_eq!(ring.used().len(), 3);
    assert_eq!(drain(&peer), want[..3].to_vec());
    assert_eq!(q.next_avail(), 3, "the throttled chain stays in the ring");
    std::thread::sleep(wait + Duration::from_millis(25));
    let round = process_tx(&mut q, &mem, &tap, &mut tx, &neg, Some(&limiter), &stats).expect("tx");
    assert_eq!(round.stop, Stop::Idle);
    assert_eq!(drain(&peer), want[3..].to_vec());
    assert_eq!(ring.used().len(), 5);
}

#[test]
fn test_unsent_plan() {
    let (again, old, none) = (-libc::EAGAIN, -libc::EOPNOTSUPP, -libc::ECANCELED);
    assert_eq!(unsent_plan(&[]), None);
    assert_eq!(unsent_plan(&[64, 64]), None);
    // Refused for good (EINVAL): lost, nothing goes back.
    assert_eq!(unsent_plan(&[64, -libc::EINVAL, 64]), None);
    // Full from frame 1 on: back to the ring from there.
    assert_eq!(unsent_plan(&[64, again, again]), Some((1, true)));
    // A later frame went out: the refused one is dropped, not sent after it.
    assert_eq!(unsent_plan(&[64, again, 64]), Some((1, false)));
    assert_eq!(unsent_plan(&[old, old]), Some((0, true)));
    // A ring that failed: frames without a result after one that has an error.
    assert_eq!(unsent_plan(&[64, -libc::EINVAL, none]), Some((2, true)));
}
