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
use bulkhead_device_runtime::testing::fuzz_queue::{lay_out, take};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x2_0000;

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let [options, avail_idx, input_len] = take::<3>(&mut data);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");

    // Descriptors with addresses and lengths mostly inside guest memory, sometimes raw.
    let (mut queue, _, _) = lay_out(&mem, MEM_SIZE + 0x200, 0x1000, avail_idx, &mut data);

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
