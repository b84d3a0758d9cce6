//! Arbitrary descriptor chains in guest memory, run through the virtio-net frame path: the rx
//! queue (frames from a tap stand-in placed into the guest's buffers), the tx queue (the
//! guest's frames written to the tap stand-in) or the control queue (commands parsed and
//! acked). The process must never panic, and every round must end.
//!
//! Input layout: byte 0 chooses options, byte 1 the available index, byte 2 how many frames
//! the tap holds for rx (0-3) and bytes 3-8 their lengths (u16 each); then 16 descriptors of
//! 16 bytes (address, length, flags, next), 16 available ring entries of 2 bytes, and the rest
//! is copied into guest memory at `PAYLOAD` (headers, frames, commands, indirect tables).
//!
//! Options (bits of byte 0): 1 event index, 2 MRG_RXBUF, 4 a legacy 10-byte header, 8 guest
//! checksum offload, 16 and 32 the queue (0 rx, 1 tx, 2 control, 3 rx), 64 a rate limiter of a
//! few hundred bytes and two frames (so rounds end throttled and resume), 128 tx frames written
//! in batches (`bulkhead_net::writebatch`, where io_uring is there).
//!
//! Checked: every round ends and a queue is drained in a bounded number of rounds; no chain is
//! answered beyond what the device took; the tx and control queues are drained unless they
//! stopped for a reason (throttled, the tap full, broken).

#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;

use bulkhead_net::ctrl::{parse, process_ctrl};
use bulkhead_net::datapath::{
    process_rx, process_tx, with_notifications_off, Negotiated, RxState, Stop, TxState,
};
use bulkhead_device_runtime::rate::{BucketConfig, LimiterConfig, RateLimiter};
use bulkhead_net::stats::Stats;
use bulkhead_net::writebatch::WriteBatch;
use bulkhead_net::Tap;
use bulkhead_device_runtime::testing::fuzz_queue::{lay_out, take, AVAIL, QSIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x2_0000;

fn tap_pair() -> (Tap, OwnedFd) {
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
    assert_eq!(ret, 0, "socketpair");
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            Tap::from_fd(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let [options, avail_idx, frames] = take::<3>(&mut data);
    let lengths = take::<6>(&mut data);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");

    // Descriptors with addresses and lengths mostly inside guest memory, sometimes raw.
    let (mut queue, _, n) = lay_out(&mem, MEM_SIZE + 0x200, 0x4400, avail_idx, &mut data);
    queue.set_event_idx(options & 1 != 0);

    let neg = Negotiated {
        hdr_len: if options & 4 != 0 { 10 } else { 12 },
        mrg_rxbuf: options & 2 != 0,
        guest_csum: options & 8 != 0,
    };
    let limiter = (options & 64 != 0).then(|| {
        Mutex::new(RateLimiter::new(&LimiterConfig {
            bandwidth: BucketConfig {
                size: 300,
                one_time_burst: 0,
                refill_time_ms: 1,
            },
            ops: BucketConfig {
                size: 2,
                one_time_burst: 1,
                refill_time_ms: 1,
            },
        }))
    });
    let stats = Stats::default();
    let (tap, peer) = tap_pair();

    let mut rounds = 0u32;
    let mut stopped = false;
    match (options >> 4) & 3 {
        1 => {
            let mut tx = match (options & 128 != 0).then(|| WriteBatch::new(&tap)) {
                Some(Ok(batch)) => TxState::with_write_batch(batch),
                _ => TxState::default(),
            };
            loop {
                let r = with_notifications_off(&mut queue, &mem, |q| {
                    process_tx(q, &mem, &tap, &mut tx, &neg, limiter.as_ref(), &stats)
                });
                rounds += 1;
                assert!(rounds <= u32::from(QSIZE) + 2, "tx made no progress");
                match r {
                    Ok(round) if round.stop == Stop::Budget => continue,
                    Ok(round) => stopped = round.stop != Stop::Idle,
                    Err(_) => stopped = true,
                }
                break;
            }
        }
        2 => loop {
            let r = process_ctrl(&mut queue, &mem, &stats, |command| command.is_some());
            rounds += 1;
            assert!(rounds <= u32::from(QSIZE) + 2, "ctrl made no progress");
            match r {
                Ok(round) if round.stop == Stop::Budget => continue,
                Ok(_) => {}
                Err(_) => stopped = true,
            }
            break;
        },
        _ => {
            for i in 0..usize::from(frames % 4) {
                let len = usize::from(u16::from_le_bytes([lengths[2 * i], lengths[2 * i + 1]]));
                let frame = vec![i as u8; len.max(1)];
                // SAFETY: write from a valid slice on an open descriptor.
                unsafe {
                    libc::write(
                        std::os::fd::AsRawFd::as_raw_fd(&peer),
                        frame.as_ptr().cast(),
                        frame.len(),
                    )
                };
            }
            let mut rx = RxState::default();
            loop {
                let r = process_rx(
                    &mut queue,
                    &mem,
                    &tap,
                    &mut rx,
                    &neg,
                    limiter.as_ref(),
                    &stats,
                );
                rounds += 1;
                assert!(rounds <= 8, "rx made no progress");
                match r {
                    Ok(round) if round.stop == Stop::Budget => continue,
                    Ok(round) => stopped = round.stop != Stop::Idle,
                    Err(_) => stopped = true,
                }
                break;
            }
        }
    }
    // The parser alone, on the payload.
    let _ = parse(&data[..n.min(64)]);

    // Every chain taken was answered at most once.
    assert!(queue.next_used() <= queue.next_avail() || stopped);
    // The tx and control queues are drained unless they stopped for a reason. Compared with
    // the available index in memory now: the device's own writes (acks, frames) may have
    // landed on the guest's rings, which is the guest's business.
    let now: u16 = mem
        .read_obj::<u16>(GuestAddress(AVAIL + 2))
        .map(u16::from_le)
        .expect("avail idx");
    let mode = (options >> 4) & 3;
    if (mode == 1 || mode == 2) && !stopped {
        assert_eq!(queue.next_avail(), now);
    }
});
