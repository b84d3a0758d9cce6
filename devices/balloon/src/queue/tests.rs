//! The queues against an in-memory guest (MockSplitQueue) whose RAM is a memfd, as a
//! frontend's memory table gives it: what is released is checked with the memfd's allocated
//! blocks.

use super::*;
use crate::ram::GuestRam;
use bulkhead_device_runtime::testing::memfd;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use vm_memory::FileOffset;

const MIB: u64 = 1 << 20;
const RAM: u64 = 8 * MIB;
const QSIZE: u16 = 16;
/// Where the tests put their buffers (the rings sit at 0).
const BUF: u64 = 0x10_0000;
/// The pages the tests balloon: 4 MiB..8 MiB.
const FIRST_PFN: u32 = (4 * MIB / 4096) as u32;

struct Guest {
    mem: GuestMemoryMmap,
    file: Arc<File>,
}

impl Guest {
    fn new() -> Guest {
        let file = Arc::new(memfd(RAM));
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            RAM as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .expect("guest memory");
        // Every page touched: allocated.
        file.write_all_at(&vec![0x5a; RAM as usize], 0)
            .expect("touch");
        Guest { mem, file }
    }

    fn allocated(&self) -> u64 {
        self.file.metadata().expect("metadata").blocks() * 512
    }

    fn ram(&self) -> GuestRam {
        GuestRam::from_memory(&self.mem).expect("ram")
    }
}

use bulkhead_device_runtime::testing::MockRing as Ring;

/// Writes `pfns` at `addr` and returns their byte length.
fn put_pfns(mem: &GuestMemoryMmap, addr: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .expect("write pfns");
    bytes.len() as u32
}

fn run(
    role: Role,
    q: &mut Queue,
    g: &Guest,
    ram: &mut GuestRam,
    c: &Counters,
) -> (Round, Vec<String>) {
    let mut refused = Vec::new();
    let round = process_pages(role, q, &g.mem, ram, c, |_, e| {
        refused.push(bulkhead_device_runtime::chain(e))
    })
    .expect("round");
    (round, refused)
}

#[test]
fn test_roles_follow_acked_features() {
    assert_eq!(roles(0), vec![Role::Inflate, Role::Deflate]);
    assert_eq!(
        roles(1 << F_REPORTING),
        vec![Role::Inflate, Role::Deflate, Role::Reporting]
    );
    assert_eq!(
        roles(1 << F_REPORTING | 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM),
        vec![Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting]
    );
}

#[test]
fn test_runs_merge_consecutive_frames() {
    assert_eq!(runs(&[5, 6, 7, 9, 10, 3]), vec![(5, 3), (9, 2), (3, 1)]);
    assert!(runs(&[]).is_empty());
}

#[test]
fn test_inflate_releases_pages_from_the_memfd() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    // Two chains of 256 pages (1 MiB each), one of them split over two descriptors.
    let pfns: Vec<u32> = (FIRST_PFN..FIRST_PFN + 256).collect();
    let n = put_pfns(&g.mem, BUF, &pfns);
    ring.chain(&[(BUF, n, false)]);
    let pfns2: Vec<u32> = (FIRST_PFN + 256..FIRST_PFN + 512).collect();
    let n2 = put_pfns(&g.mem, BUF + 0x1000, &pfns2);
    ring.chain(&[
        (BUF + 0x1000, n2 / 2, false),
        (BUF + 0x1000 + u64::from(n2 / 2), n2 / 2, false),
    ]);
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Inflate, &mut q, &g, &mut ram, &c);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(round.used, 2);
    assert_eq!(ring.used(), vec![(0, 0), (1, 0)]);
    assert_eq!(before - g.allocated(), 2 * MIB, "2 MiB left the memfd");
    assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 512);
    assert_eq!(c.released_bytes.load(Ordering::Relaxed), 2 * MIB);
    // The guest reads zeros there now; the rest is untouched.
    let mut b = [0u8; 4];
    g.mem
        .read_slice(&mut b, GuestAddress(4 * MIB))
        .expect("read");
    assert_eq!(b, [0; 4]);
    g.mem
        .read_slice(&mut b, GuestAddress(4 * MIB - 4))
        .expect("read");
    assert_eq!(b, [0x5a; 4]);
}

#[test]
fn test_deflate_releases_nothing_and_is_counted() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    let n = put_pfns(&g.mem, BUF, &[FIRST_PFN, FIRST_PFN + 1]);
    ring.chain(&[(BUF, n, false)]);
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Deflate, &mut q, &g, &mut ram, &c);
    assert!(refused.is_empty());
    assert_eq!(round.used, 1);
    assert_eq!(g.allocated(), before);
    assert_eq!(c.deflated_pages.load(Ordering::Relaxed), 2);
}

#[test]
fn test_inflate_page_outside_ram_refused_nothing_released() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    // Good pages, then one just past the end of RAM: the whole request is refused.
    let n = put_pfns(
        &g.mem,
        BUF,
        &[FIRST_PFN, FIRST_PFN + 1, (RAM / 4096) as u32],
    );
    ring.chain(&[(BUF, n, false)]);
    let n = put_pfns(&g.mem, BUF + 0x100, &[u32::MAX]);
    ring.chain(&[(BUF + 0x100, n, false)]);
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Inflate, &mut q, &g, &mut ram, &c);
    assert_eq!((round.used, round.refused), (2, 2));
    assert_eq!(g.allocated(), before, "nothing released");
    assert_eq!(ring.used(), vec![(0, 0), (1, 0)], "both answered");
    assert!(
        refused[0].contains("page frame 0x800 is outside guest RAM"),
        "{}",
        refused[0]
    );
    assert!(
        refused[0].contains("request of 3 pages is ignored"),
        "{}",
        refused[0]
    );
    assert!(refused[1].contains("0xffffffff"), "{}", refused[1]);
    assert_eq!(c.bad_requests.load(Ordering::Relaxed), 2);
    assert_eq!(c.inflated_pages.load(Ordering::Relaxed), 0);
}

#[test]
fn test_inflate_malformed_chains_refused() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    put_pfns(&g.mem, BUF, &[FIRST_PFN; 4]);
    ring.chain(&[(BUF, 6, false)]); // not a multiple of 4
    ring.chain(&[(BUF, 8, true)]); // device-writable
    ring.chain(&[(BUF, MAX_PFN_BYTES, false), (BUF, 4, false)]); // too long
    ring.chain(&[(RAM - 2, 4, false)]); // buffer beyond RAM
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Inflate, &mut q, &g, &mut ram, &c);
    assert_eq!((round.used, round.refused), (4, 4), "{refused:?}");
    assert_eq!(g.allocated(), before);
    assert!(refused[0].contains("6 bytes of page frame numbers"));
    assert!(refused[1].contains("device-writable"));
    assert!(refused[2].contains("bytes of page frame numbers"));
    assert!(refused[3].contains("cannot read"));
}

#[test]
fn test_reporting_releases_reported_runs() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    // Two 1 MiB runs in one report (device-writable descriptors).
    ring.chain(&[(4 * MIB, MIB as u32, true), (6 * MIB, MIB as u32, true)]);
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Reporting, &mut q, &g, &mut ram, &c);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(round.used, 1);
    assert_eq!(ring.used(), vec![(0, 0)]);
    assert_eq!(before - g.allocated(), 2 * MIB);
    assert_eq!(c.reported_bytes.load(Ordering::Relaxed), 2 * MIB);
    assert!(ram.partial.is_empty());
}

#[test]
fn test_reporting_outside_ram_or_readable_refused_nothing_released() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    ring.chain(&[(4 * MIB, MIB as u32, true), (RAM - 0x1000, 0x2000, true)]);
    ring.chain(&[(4 * MIB, MIB as u32, false)]);
    let mut q = ring.queue();
    let before = g.allocated();
    let (round, refused) = run(Role::Reporting, &mut q, &g, &mut ram, &c);
    assert_eq!((round.used, round.refused), (2, 2));
    assert_eq!(
        g.allocated(),
        before,
        "the good run of a bad report is kept too"
    );
    assert!(refused[0].contains("outside guest RAM"), "{}", refused[0]);
    assert!(refused[1].contains("device-readable"), "{}", refused[1]);
}

#[test]
fn test_stats_taken_and_given_back() {
    let g = Guest::new();
    let c = Counters::default();
    let mut ring = Ring::new(&g.mem, QSIZE);
    let mut buf = Vec::new();
    for (tag, value) in [(4u16, 123u64), (5, 456), (6, 789), (99, 1)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&value.to_le_bytes());
    }
    g.mem.write_slice(&buf, GuestAddress(BUF)).expect("write");
    ring.chain(&[(BUF, buf.len() as u32, false)]);
    let mut q = ring.queue();
    let mut stats = GuestStats::default();
    let head = take_stats(&mut q, &g.mem, &mut stats, &c, |_, e| panic!("{e}"))
        .expect("queue")
        .expect("held");
    assert_eq!(head, 0);
    assert!(
        ring.used().is_empty(),
        "held until the device wants fresh figures"
    );
    assert_eq!(stats[4], Some(123));
    assert_eq!(stats[5], Some(456));
    assert_eq!(stats[6], Some(789));
    assert_eq!(stats[0], None);
    request_stats(&mut q, &g.mem, head).expect("give back");
    assert_eq!(ring.used(), vec![(0, 0)]);
    // A buffer of 7 bytes: refused, still held (given back at the next poll).
    ring.chain(&[(BUF, 7, false)]);
    let mut refused = 0;
    let head = take_stats(&mut q, &g.mem, &mut stats, &c, |_, _| refused += 1).expect("queue");
    assert_eq!((head, refused), (Some(1), 1));
}

#[test]
fn test_broken_avail_ring_stops_the_queue() {
    let g = Guest::new();
    let mut ram = g.ram();
    let c = Counters::default();
    let ring = Ring::new(&g.mem, QSIZE);
    let mut q = ring.queue();
    // An available index far ahead of the queue's size.
    ring.vq.avail().idx().store(1000);
    let result = process_pages(Role::Inflate, &mut q, &g.mem, &mut ram, &c, |_, _| {});
    assert!(result.is_err());
}
