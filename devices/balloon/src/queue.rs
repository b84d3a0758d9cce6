//! The balloon's virtqueues, as the guest fills them (virtio 1.2, 5.5.6):
//!
//! - inflate and deflate: each chain is device-readable, an array of little-endian u32 page
//!   frame numbers of 4 KiB pages (a 64 KiB-page guest sends 16 consecutive ones per page);
//! - stats: one device-readable buffer of 10-byte entries (le16 tag, le64 value), which the
//!   device keeps until it wants fresh figures, then returns (used) for the guest to refill;
//! - reporting: device-writable buffers, each a run of free guest memory (its address and
//!   length) that the device may release before it returns it.
//!
//! Everything here is guest input: a chain that is malformed, too long, or names memory that is
//! not guest RAM is refused as a whole (answered, counted, logged; nothing released), never a
//! panic. A descriptor table the queue cannot even walk stops the queue (the caller signals
//! it to the frontend).

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ram::{GuestRam, RamError, BALLOON_PAGE};

/// Bytes of page frame numbers one inflate or deflate chain may carry (Linux sends at most
/// 256, VIRTIO_BALLOON_ARRAY_PFNS_MAX).
pub const MAX_PFN_BYTES: u32 = 64 * 1024;
/// Stats entries read from one buffer (16 tags are defined).
pub const MAX_STATS: usize = 64;
/// Size of one stats entry: le16 tag, le64 value (packed).
pub const STAT_ENTRY: usize = 10;
/// Chains handled per round before the caller looks at other queues.
pub const ROUND_BUDGET: usize = 256;

/// What a queue is, by its index and the features the driver accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// VIRTIO_BALLOON_F_STATS_VQ.
pub const F_STATS_VQ: u32 = 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// VIRTIO_BALLOON_F_FREE_PAGE_HINT (not offered; its queue would come before reporting).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// VIRTIO_BALLOON_F_PAGE_POISON (not offered; its queue-less config field is 12..16).
pub const F_PAGE_POISON: u32 = 4;
/// VIRTIO_BALLOON_F_REPORTING.
pub const F_REPORTING: u32 = 5;

/// The queues the driver creates for `acked` features, in index order: Linux creates only the
/// queues of the features it accepted, one after another (virtballoon_probe's `find_vqs`).
pub fn roles(acked: u64) -> Vec<Role> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut r = vec![Role::Inflate, Role::Deflate];
    if has(F_STATS_VQ) {
        r.push(Role::Stats);
    }
    if has(F_REPORTING) {
        r.push(Role::Reporting);
    }
    r
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("a device-writable descriptor in an inflate, deflate or stats chain")]
    WritableDescriptor,
    #[error("a device-readable descriptor in a reporting chain")]
    ReadableDescriptor,
    #[error("{0} bytes of page frame numbers (a multiple of 4, at most {MAX_PFN_BYTES})")]
    PfnLength(u64),
    #[error("{0} bytes of statistics (a multiple of {STAT_ENTRY}, at most {MAX_STATS} entries)")]
    StatsLength(u64),
    #[error("cannot read the chain's buffer at {0:#x}")]
    ReadBuffer(u64),
    #[error("page frame {pfn:#x} is outside guest RAM; the request of {count} pages is ignored")]
    PfnOutsideRam { pfn: u32, count: usize },
    #[error("reported range {gpa:#x}+{len:#x} is outside guest RAM; the report is ignored")]
    ReportOutsideRam { gpa: u64, len: u64 },
    #[error("cannot release guest memory")]
    Release(#[source] RamError),
}

/// The queue cannot be walked any more (a bad descriptor table or ring index).
#[derive(Debug, thiserror::Error)]
#[error("queue stopped until the driver resets it")]
pub struct QueueError(#[source] pub virtio_queue::Error);

/// What the device did, for `stats` on the control channel.
#[derive(Debug, Default)]
pub struct Counters {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    pub released_bytes: AtomicU64,
    pub reported_bytes: AtomicU64,
    pub reports: AtomicU64,
    pub stats_updates: AtomicU64,
    pub bad_requests: AtomicU64,
    pub broken_queues: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "inflated_pages={} deflated_pages={} released_bytes={} reported_bytes={} reports={} stats_updates={} bad_requests={} broken_queues={}",
            l(&self.inflated_pages),
            l(&self.deflated_pages),
            l(&self.released_bytes),
            l(&self.reported_bytes),
            l(&self.reports),
            l(&self.stats_updates),
            l(&self.bad_requests),
            l(&self.broken_queues),
        )
    }
}

/// The outcome of one round over a queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Chains returned to the guest (the caller notifies).
    pub used: usize,
    /// Chains refused.
    pub refused: usize,
    /// Whether the budget ended the round with chains left.
    pub more: bool,
}

/// The next available chain; an available ring the queue cannot read stops the queue.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueError> {
    let mut iter = queue.iter(mem).map_err(QueueError)?;
    Ok(iter.next())
}

/// The device-readable bytes of `chain`, refusing writable descriptors and more than `max`.
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max: u64,
) -> Result<Vec<u8>, RequestError> {
    let mut bytes = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(RequestError::WritableDescriptor);
        }
        let len = u64::from(desc.len());
        let total = bytes.len() as u64 + len;
        if total > max {
            return Err(RequestError::PfnLength(total));
        }
        let start = bytes.len();
        bytes.resize(start + len as usize, 0);
        mem.read_slice(&mut bytes[start..], desc.addr())
            .map_err(|_| RequestError::ReadBuffer(desc.addr().0))?;
    }
    Ok(bytes)
}

/// Runs of consecutive page frames in `pfns`, as (first pfn, count).
pub fn runs(pfns: &[u32]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        let pfn = u64::from(pfn);
        match runs.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// The page frames of one inflate or deflate chain, every one checked to be guest RAM.
fn pfns_of(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    ram: &GuestRam,
) -> Result<Vec<u32>, RequestError> {
    let bytes = read_chain(chain, mem, u64::from(MAX_PFN_BYTES))?;
    if bytes.len() % 4 != 0 {
        return Err(RequestError::PfnLength(bytes.len() as u64));
    }
    let pfns: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for &pfn in &pfns {
        if ram
            .check(u64::from(pfn) * BALLOON_PAGE, BALLOON_PAGE)
            .is_err()
        {
            return Err(RequestError::PfnOutsideRam {
                pfn,
                count: pfns.len(),
            });
        }
    }
    Ok(pfns)
}

/// Inflates (`inflate`) or deflates the pages of one chain; all checked before any is released.
fn balloon_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    ram: &mut GuestRam,
    inflate: bool,
    counters: &Counters,
) -> Result<(), RequestError> {
    let pfns = pfns_of(chain, mem, ram)?;
    for (first, count) in runs(&pfns) {
        let (gpa, len) = (first * BALLOON_PAGE, count * BALLOON_PAGE);
        if inflate {
            let n = ram.release(gpa, len, true).map_err(RequestError::Release)?;
            Counters::add(&counters.released_bytes, n);
        } else {
            ram.deflate(gpa, len).map_err(RequestError::Release)?;
        }
    }
    let pages = pfns.len() as u64;
    if inflate {
        Counters::add(&counters.inflated_pages, pages);
    } else {
        Counters::add(&counters.deflated_pages, pages);
    }
    Ok(())
}

/// Releases the runs of one reporting chain (device-writable descriptors, each a free run);
/// all checked before any is released.
fn report_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    ram: &mut GuestRam,
    counters: &Counters,
) -> Result<(), RequestError> {
    let mut ranges = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(RequestError::ReadableDescriptor);
        }
        let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
        if len == 0 {
            continue;
        }
        if ram.check(gpa, len).is_err() {
            return Err(RequestError::ReportOutsideRam { gpa, len });
        }
        ranges.push((gpa, len));
    }
    for (gpa, len) in ranges {
        let n = ram
            .release(gpa, len, false)
            .map_err(RequestError::Release)?;
        Counters::add(&counters.released_bytes, n);
        Counters::add(&counters.reported_bytes, n);
    }
    Counters::add(&counters.reports, 1);
    Ok(())
}

/// One round over an inflate, deflate or reporting queue: every available chain is handled
/// (or refused: `on_refused` gets why) and returned with nothing written.
pub fn process_pages(
    role: Role,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    ram: &mut GuestRam,
    counters: &Counters,
    mut on_refused: impl FnMut(Role, &RequestError),
) -> Result<Round, QueueError> {
    let mut round = Round::default();
    while let Some(chain) = next_chain(queue, mem)? {
        let head = chain.head_index();
        let result = match role {
            Role::Inflate => balloon_chain(chain, mem, ram, true, counters),
            Role::Deflate => balloon_chain(chain, mem, ram, false, counters),
            Role::Reporting => report_chain(chain, ram, counters),
            Role::Stats => Ok(()),
        };
        if let Err(e) = result {
            Counters::add(&counters.bad_requests, 1);
            round.refused += 1;
            on_refused(role, &e);
        }
        queue.add_used(mem, head, 0).map_err(QueueError)?;
        round.used += 1;
        if round.used >= ROUND_BUDGET {
            round.more = true;
            break;
        }
    }
    Ok(round)
}

/// The guest's memory statistics, by tag (VIRTIO_BALLOON_S_*).
pub const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

/// The latest statistics the guest sent; unknown tags are ignored.
pub type GuestStats = [Option<u64>; STAT_NAMES.len()];

/// Takes the guest's stats buffer: its entries go into `stats`, and its head is returned, to be
/// given back (used) when the device wants fresh figures. A malformed buffer is refused (its
/// head is still returned: the guest gets it back at the next poll).
pub fn take_stats(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    stats: &mut GuestStats,
    counters: &Counters,
    mut on_refused: impl FnMut(Role, &RequestError),
) -> Result<Option<u16>, QueueError> {
    let mut last = None;
    while let Some(chain) = next_chain(queue, mem)? {
        let head = chain.head_index();
        if let Some(previous) = last.replace(head) {
            // A second buffer while one is held: the older one goes back.
            queue.add_used(mem, previous, 0).map_err(QueueError)?;
        }
        let max = (MAX_STATS * STAT_ENTRY) as u64;
        let parsed = read_chain(chain, mem, max)
            .map_err(|e| match e {
                RequestError::PfnLength(n) => RequestError::StatsLength(n),
                e => e,
            })
            .and_then(|bytes| {
                if bytes.len() % STAT_ENTRY != 0 {
                    return Err(RequestError::StatsLength(bytes.len() as u64));
                }
                Ok(bytes)
            });
        match parsed {
            Ok(bytes) => {
                for entry in bytes.chunks_exact(STAT_ENTRY) {
                    let tag = u16::from_le_bytes([entry[0], entry[1]]);
                    let mut value = [0u8; 8];
                    value.copy_from_slice(&entry[2..10]);
                    if let Some(slot) = stats.get_mut(usize::from(tag)) {
                        *slot = Some(u64::from_le_bytes(value));
                    }
                }
                Counters::add(&counters.stats_updates, 1);
            }
            Err(e) => {
                Counters::add(&counters.bad_requests, 1);
                on_refused(Role::Stats, &e);
            }
        }
    }
    Ok(last)
}

/// Returns the held stats buffer `head`: the guest refills it with fresh figures.
pub fn request_stats(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, 0).map_err(QueueError)
}

/// A guest address, for tests and the fuzz target.
pub fn gpa(pfn: u64) -> GuestAddress {
    GuestAddress(pfn * BALLOON_PAGE)
}

#[cfg(test)]
mod tests;
