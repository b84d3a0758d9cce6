//! Arbitrary descriptor chains in a memfd-backed guest, run through the balloon's queues: the
//! inflate and deflate queues (page frame numbers, released by punching holes in the memfd),
//! the reporting queue (free runs, released) and the stats queue (entries parsed, the buffer
//! held). The process must never panic, every round must end, and nothing outside guest RAM
//! is ever released: the memfd is a little larger than the guest RAM the balloon is told
//! about, and its tail must stay allocated.
//!
//! Input layout: byte 0 chooses the queue (bits 0-1: inflate, deflate, reporting, stats) and
//! the host page size the balloon assumes (bit 2: 64 KiB instead of 4 KiB), byte 1 the
//! available index; then 16 descriptors of 16 bytes (address, length, flags, next), 16
//! available ring entries of 2 bytes, and the rest is copied into guest memory at `PAYLOAD`
//! (page frame numbers, statistics).

#![no_main]

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, OnceLock};

use bulkhead_balloon::queue::{process_pages, take_stats, Counters, GuestStats, Role};
use bulkhead_balloon::ram::{GuestRam, Partial, RamRegion};
use bulkhead_device_runtime::testing::fuzz_queue::{lay_out, take};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest RAM as the balloon knows it; the memfd has `TAIL` more bytes after it.
const MEM_SIZE: u64 = 0x10_0000;
const TAIL: u64 = 0x1_0000;

static GUEST: OnceLock<(Arc<File>, GuestMemoryMmap)> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let [options, avail_idx] = take::<2>(&mut data);
    // One memfd and mapping for every run, cleaned at the start of each.
    let (file, mem) = GUEST.get_or_init(|| {
        let file = Arc::new(bulkhead_device_runtime::testing::memfd(MEM_SIZE + TAIL));
        file.write_all_at(&vec![0xa5; TAIL as usize], MEM_SIZE)
            .expect("tail");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .expect("guest memory");
        (file, mem)
    });
    // A clean guest for this run: every byte of guest RAM zero (the tail is never punched).
    bulkhead_balloon::ram::punch_hole(file, 0, MEM_SIZE).expect("clean guest");
    let mut ram = GuestRam {
        regions: vec![RamRegion {
            gpa: 0,
            len: MEM_SIZE,
            file: FileOffset::from_arc(file.clone(), 0),
            page_size: if options & 4 != 0 { 0x1_0000 } else { 0x1000 },
        }],
        partial: Partial::default(),
    };

    // Descriptors with addresses and lengths mostly inside guest memory, sometimes raw.
    // Page frame numbers mostly near guest RAM (some beyond it), as the payload.
    let (mut queue, avail_idx, _) = lay_out(mem, MEM_SIZE + 0x2000, 0x2_0000, avail_idx, &mut data);

    let counters = Counters::default();
    let role = match options & 3 {
        0 => Role::Inflate,
        1 => Role::Deflate,
        2 => Role::Reporting,
        _ => Role::Stats,
    };
    if role == Role::Stats {
        let mut stats = GuestStats::default();
        let _ = take_stats(&mut queue, &mem, &mut stats, &counters, |_, _| {});
    } else {
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds <= 3, "a queue made no progress");
            match process_pages(role, &mut queue, &mem, &mut ram, &counters, |_, _| {}) {
                Ok(round) if round.more => continue,
                _ => break,
            }
        }
        assert!(
            queue.next_used() <= avail_idx,
            "more chains answered than were available"
        );
    }
    // Nothing outside the balloon's guest RAM was released.
    let allocated = file.metadata().expect("metadata").blocks() * 512;
    assert!(allocated >= TAIL, "the tail beyond guest RAM was released");
    let mut tail = vec![0u8; TAIL as usize];
    file.read_exact_at(&mut tail, MEM_SIZE).expect("read tail");
    assert!(
        tail.iter().all(|b| *b == 0xa5),
        "the tail beyond guest RAM changed"
    );
});
