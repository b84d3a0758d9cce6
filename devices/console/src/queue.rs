//! The two virtqueues of a single-port console (no VIRTIO_CONSOLE_F_MULTIPORT): receiveq0
//! (index 0, host to guest) and transmitq0 (index 1, guest to host), against bounded byte
//! buffers. Everything here works on a `virtio_queue::Queue` and guest memory, so it is tested
//! with `MockSplitQueue` and fuzzed without a frontend.
//!
//! Flow control: [`drain_tx`] takes the guest's output only while the output buffer has room.
//! A chain that does not fit is copied in part and put back on the available ring
//! (`go_to_previous_position`), with the number of its bytes already taken remembered, so the
//! guest gets it back (and can write more) only once every byte of it is in the buffer: a
//! slow or absent host end throttles the guest and nothing is dropped.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

/// Bytes copied from guest memory at a time.
const CHUNK: usize = 4096;

/// A guest request the device cannot serve: the queue stops until the driver resets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("a transmit chain has a device-writable descriptor")]
    WritableTxDescriptor,
    #[error("a receive chain has a device-readable descriptor")]
    ReadableRxDescriptor,
    #[error("a descriptor points outside guest memory ({addr:#x}, {len} bytes)")]
    BadAddress { addr: u64, len: u32 },
    #[error("cannot update the used ring")]
    AddUsed(String),
}

/// What one transmit round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxRound {
    /// Chains were returned to the guest (it needs a notification).
    pub used: bool,
    /// Bytes moved into the output buffer.
    pub bytes: usize,
    /// It stopped because the buffer is full (a chain waits for room).
    pub full: bool,
}

/// What one receive round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxRound {
    /// Chains were returned to the guest.
    pub used: bool,
    /// Bytes given to the guest.
    pub bytes: usize,
}

/// Moves the guest's output from transmitq0 into `out` while it has room (`cap` bytes in all).
/// `taken` is the part of the chain at the head of the ring already copied in an earlier round
/// (0 when none); it is updated.
pub fn drain_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    out: &mut VecDeque<u8>,
    cap: usize,
    taken: &mut u64,
) -> Result<TxRound, QueueError> {
    let mut round = TxRound::default();
    let mut chunk = [0u8; CHUNK];
    loop {
        if out.len() >= cap {
            round.full = true;
            return Ok(round);
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return Ok(round);
        };
        let head = chain.head_index();
        // Offset in the chain, and how much of it is already in the buffer.
        let mut offset = 0u64;
        let mut complete = true;
        for desc in chain {
            if desc.is_write_only() {
                return Err(QueueError::WritableTxDescriptor);
            }
            let len = u64::from(desc.len());
            let end = offset + len;
            if end <= *taken {
                offset = end;
                continue;
            }
            // From here: bytes [start, len) of this descriptor.
            let mut start = (*taken).saturating_sub(offset);
            while start < len {
                let room = cap.saturating_sub(out.len());
                if room == 0 {
                    complete = false;
                    break;
                }
                let n = usize::try_from(len - start)
                    .unwrap_or(usize::MAX)
                    .min(CHUNK)
                    .min(room);
                let addr = desc
                    .addr()
                    .checked_add(start)
                    .ok_or(QueueError::BadAddress {
                        addr: desc.addr().0,
                        len: desc.len(),
                    })?;
                mem.read_slice(&mut chunk[..n], addr)
                    .map_err(|_| QueueError::BadAddress {
                        addr: desc.addr().0,
                        len: desc.len(),
                    })?;
                out.extend(&chunk[..n]);
                round.bytes += n;
                start += n as u64;
                *taken = offset + start;
            }
            if !complete {
                break;
            }
            offset = end;
        }
        if !complete {
            // Back on the ring: the guest does not get it until all of it is taken.
            q.go_to_previous_position();
            round.full = true;
            return Ok(round);
        }
        *taken = 0;
        q.add_used(mem, head, 0)
            .map_err(|e| QueueError::AddUsed(e.to_string()))?;
        round.used = true;
    }
}

/// Gives the guest what waits in `input`, in the buffers of receiveq0.
pub fn fill_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    input: &mut VecDeque<u8>,
) -> Result<RxRound, QueueError> {
    let mut round = RxRound::default();
    while !input.is_empty() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let mut written = 0u32;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(QueueError::ReadableRxDescriptor);
            }
            let mut start = 0u32;
            while start < desc.len() && !input.is_empty() {
                let (front, _) = input.as_slices();
                let n = front.len().min(CHUNK).min((desc.len() - start) as usize);
                let addr =
                    desc.addr()
                        .checked_add(u64::from(start))
                        .ok_or(QueueError::BadAddress {
                            addr: desc.addr().0,
                            len: desc.len(),
                        })?;
                mem.write_slice(&front[..n], addr)
                    .map_err(|_| QueueError::BadAddress {
                        addr: desc.addr().0,
                        len: desc.len(),
                    })?;
                input.drain(..n);
                start += n as u32;
                written += n as u32;
            }
            if input.is_empty() {
                break;
            }
        }
        round.bytes += written as usize;
        q.add_used(mem, head, written)
            .map_err(|e| QueueError::AddUsed(e.to_string()))?;
        round.used = true;
    }
    Ok(round)
}

#[cfg(test)]
mod tests;
