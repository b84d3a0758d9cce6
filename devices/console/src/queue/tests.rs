//! The queue handling against an in-memory guest (`MockSplitQueue`), as a frontend would lay
//! the rings out.

use super::*;
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).expect("memory")
}

use bulkhead_device_runtime::testing::MockRing as Ring;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn test_tx_chains_copied_in_order_and_returned() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    let a = pattern(100, 1);
    let b = pattern(5000, 2);
    mem.write_slice(&a, GuestAddress(MIB)).expect("write");
    mem.write_slice(&b[..3000], GuestAddress(2 * MIB))
        .expect("write");
    mem.write_slice(&b[3000..], GuestAddress(3 * MIB))
        .expect("write");
    ring.chain(&[(MIB, 100, false)]);
    ring.chain(&[(2 * MIB, 3000, false), (3 * MIB, 2000, false)]);
    let mut q = ring.queue();
    let mut out = VecDeque::new();
    let mut taken = 0;
    let round = drain_tx(&mut q, &mem, &mut out, 1 << 16, &mut taken).expect("tx");
    assert_eq!(
        round,
        TxRound {
            used: true,
            bytes: 5100,
            full: false
        }
    );
    let mut want = a.clone();
    want.extend_from_slice(&b);
    assert_eq!(out.iter().copied().collect::<Vec<_>>(), want);
    assert_eq!(ring.used(), vec![(0, 0), (1, 0)]);
    assert_eq!(taken, 0);
}

#[test]
fn test_tx_full_buffer_throttles_guest_and_loses_nothing() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    let data = pattern(10_000, 7);
    mem.write_slice(&data, GuestAddress(MIB)).expect("write");
    ring.chain(&[(MIB, 6000, false), (MIB + 6000, 4000, false)]);
    let mut q = ring.queue();
    let mut out = VecDeque::new();
    let mut taken = 0;
    let cap = 4096;
    let mut got = Vec::new();
    let mut rounds = 0;
    loop {
        let round = drain_tx(&mut q, &mem, &mut out, cap, &mut taken).expect("tx");
        assert!(out.len() <= cap, "the buffer is bounded");
        if round.used {
            break;
        }
        assert!(round.full, "{round:?}");
        assert!(
            ring.used().is_empty(),
            "the chain is not returned before it is all taken"
        );
        // The host end takes what is buffered.
        got.extend(out.drain(..));
        rounds += 1;
        assert!(rounds < 10);
    }
    got.extend(out.drain(..));
    assert_eq!(got, data, "byte-exact after being throttled");
    assert_eq!(ring.used(), vec![(0, 0)]);
    assert_eq!(rounds, 2, "4096 + 4096 + 1808");
}

#[test]
fn test_tx_nothing_taken_when_buffer_already_full() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 10, false)]);
    let mut q = ring.queue();
    let mut out: VecDeque<u8> = vec![0; 16].into();
    let mut taken = 0;
    let round = drain_tx(&mut q, &mem, &mut out, 16, &mut taken).expect("tx");
    assert!(round.full && !round.used);
    assert_eq!(out.len(), 16);
    assert!(ring.used().is_empty());
}

#[test]
fn test_tx_writable_descriptor_is_an_error() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 10, false), (MIB + 10, 10, true)]);
    let mut q = ring.queue();
    let mut out = VecDeque::new();
    let mut taken = 0;
    assert_eq!(
        drain_tx(&mut q, &mem, &mut out, 1024, &mut taken),
        Err(QueueError::WritableTxDescriptor)
    );
}

#[test]
fn test_tx_descriptor_outside_memory_is_an_error_not_a_panic() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(16 * MIB - 4, 64, false)]);
    let mut q = ring.queue();
    let mut out = VecDeque::new();
    let mut taken = 0;
    assert!(matches!(
        drain_tx(&mut q, &mem, &mut out, 1024, &mut taken),
        Err(QueueError::BadAddress { .. })
    ));
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(u64::MAX - 8, 64, false)]);
    let mut q = ring.queue();
    assert!(drain_tx(&mut q, &mem, &mut out, 1024, &mut taken).is_err());
}

#[test]
fn test_rx_input_spread_over_buffers() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 4, true), (MIB + 100, 4, true)]);
    ring.chain(&[(2 * MIB, 64, true)]);
    let mut q = ring.queue();
    let mut input: VecDeque<u8> = b"hello, console".iter().copied().collect();
    let round = fill_rx(&mut q, &mem, &mut input).expect("rx");
    assert_eq!(
        round,
        RxRound {
            used: true,
            bytes: 14
        }
    );
    assert!(input.is_empty());
    assert_eq!(ring.used(), vec![(0, 8), (2, 6)]);
    let mut got = [0u8; 4];
    mem.read_slice(&mut got, GuestAddress(MIB)).expect("read");
    assert_eq!(&got, b"hell");
    mem.read_slice(&mut got, GuestAddress(MIB + 100))
        .expect("read");
    assert_eq!(&got, b"o, c");
    let mut rest = [0u8; 6];
    mem.read_slice(&mut rest, GuestAddress(2 * MIB))
        .expect("read");
    assert_eq!(&rest, b"onsole");
}

#[test]
fn test_rx_no_buffers_keeps_input() {
    let mem = memory();
    let ring = Ring::new(&mem, QSIZE);
    let mut q = ring.queue();
    let mut input: VecDeque<u8> = b"wait".iter().copied().collect();
    let round = fill_rx(&mut q, &mem, &mut input).expect("rx");
    assert!(!round.used);
    assert_eq!(input.len(), 4, "input waits for the guest's buffers");
}

#[test]
fn test_rx_empty_input_takes_no_buffer() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 64, true)]);
    let mut q = ring.queue();
    let mut input = VecDeque::new();
    assert!(!fill_rx(&mut q, &mem, &mut input).expect("rx").used);
    assert!(ring.used().is_empty());
}

#[test]
fn test_rx_readable_descriptor_is_an_error() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QSIZE);
    ring.chain(&[(MIB, 64, false)]);
    let mut q = ring.queue();
    let mut input: VecDeque<u8> = b"x".iter().copied().collect();
    assert_eq!(
        fill_rx(&mut q, &mem, &mut input),
        Err(QueueError::ReadableRxDescriptor)
    );
    assert_eq!(input.len(), 1);
}
