//! Arbitrary descriptor chains in guest memory, run through the console's queue handling: the
//! transmit queue drained into a bounded output buffer that a host end empties a little at a
//! time (so chains are taken in parts, put back and taken again), or the receive queue filled
//! from host input. The process must never panic, every round must end, nothing the guest
//! wrote may be lost or duplicated, and the output buffer never passes its bound.
//!
//! Input layout: byte 0 chooses options (bit 0: the queue, 0 transmit, 1 receive; bits 1-3:
//! the output buffer's size, 256 << n bytes; bits 4-5: how much the host end takes per round,
//! the buffer's size >> n), byte 1 the available index, byte 2 the host input's length; then 16
//! descriptors of 16 bytes (address, length, flags, next), 16 available ring entries of 2
//! bytes, and the rest is copied into guest memory at `PAYLOAD` (output bytes, indirect tables).

#![no_main]

use std::collections::VecDeque;

use bulkhead_console::queue::{drain_tx, fill_rx};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM_SIZE: u64 = 0x2_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x200;
const USED: u64 = 0x400;
const PAYLOAD: u64 = 0x1000;

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let [options, avail_idx, input_len] = take::<3>(&mut data);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");

    // Descriptor table: addresses and lengths mostly inside guest memory, sometimes raw.
    for i in 0..u64::from(QSIZE) {
        let raw = take::<16>(&mut data);
        let mut addr = u64::from_le_bytes(raw[0..8].try_into().expect("8"));
        let mut len = u32::from_le_bytes(raw[8..12].try_into().expect("4"));
        if addr >> 63 == 0 {
            addr %= MEM_SIZE + 0x200;
        }
        if len >> 31 == 0 {
            len %= 0x1000;
        }
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..16].copy_from_slice(&raw[12..16]);
        mem.write_slice(&desc, GuestAddress(DESC + 16 * i))
            .expect("desc");
    }
    let ring = take::<32>(&mut data);
    mem.write_slice(&ring, GuestAddress(AVAIL + 4))
        .expect("avail ring");
    let avail_idx = u16::from(avail_idx % (QSIZE as u8 + 2));
    mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
        .expect("avail idx");
    let n = data.len().min((MEM_SIZE - PAYLOAD) as usize);
    mem.write_slice(&data[..n], GuestAddress(PAYLOAD))
        .expect("payload");

    let mut queue = Queue::new(QSIZE).expect("queue");
    queue.set_size(QSIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);

    if options & 1 == 0 {
        let cap = 256usize << ((options >> 1) & 7);
        let per_round = cap >> ((options >> 4) & 3);
        let mut out = VecDeque::new();
        let mut taken = 0u64;
        let mut total = 0usize;
        let mut rounds = 0u32;
        loop {
            match drain_tx(&mut queue, &mem, &mut out, cap, &mut taken) {
                Ok(round) => {
                    assert!(out.len() <= cap, "output buffer past its bound");
                    total += round.bytes;
                    if !round.full {
                        break;
                    }
                }
                Err(_) => break,
            }
            // The host end takes some of it.
            let k = per_round.min(out.len());
            out.drain(..k);
            rounds += 1;
            // At most 16 chains of at most 16 descriptors of under 4 KiB (raw lengths fail at
            // the end of guest memory): 1 MiB, taken at least 32 bytes a round.
            assert!(rounds <= (1 << 20) / 32 + 64, "tx made no progress");
            if total > 64 << 20 {
                break;
            }
        }
    } else {
        let mut input: VecDeque<u8> = (0..usize::from(input_len)).map(|i| i as u8).collect();
        let before = input.len();
        match fill_rx(&mut queue, &mem, &mut input) {
            Ok(round) => assert_eq!(round.bytes + input.len(), before, "input lost"),
            Err(_) => {}
        }
    }
});
