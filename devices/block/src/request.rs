//! Parsing and validation of virtio-blk requests (VIRTIO 1.2, section 5.2.6).
//!
//! Everything here is hostile guest input. A descriptor chain is read as two byte streams, the
//! way VIRTIO_F_ANY_LAYOUT (implied by VIRTIO_F_VERSION_1) allows: the device-readable
//! descriptors carry the 16-byte header followed by any data the device reads, and the
//! device-writable descriptors carry any data the device writes followed by the status byte,
//! which is the last byte of the last descriptor. A chain whose last descriptor is not writable
//! has no status byte and is returned with used length 0.
//!
//! The walk over a chain stops at the first descriptor that makes the device refuse it (more
//! than `seg_max` data descriptors, a descriptor longer than `size_max`, a buffer outside guest
//! memory, a device-readable buffer after a device-writable one) and at a chain the ring cannot
//! describe (a loop, a `next` past the table, nested indirect tables, more than 4 GiB): no
//! further descriptor is read, so the status byte is not known either and the chain is returned
//! with used length 0. Any other malformed request completes with `VIRTIO_BLK_S_IOERR` (or
//! `VIRTIO_BLK_S_UNSUPP` for unknown request types).

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::SECTOR_SHIFT;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_LEN: u64 = 16;
/// Size of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Status byte values.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
pub const STATUS_OK: u8 = 0;

/// What the device accepts; the limits are the ones advertised in the config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Most data descriptors in one request (`seg_max`).
    pub seg_max: u32,
    /// Longest data descriptor (`size_max`). A descriptor may also carry the 16-byte header or
    /// the status byte (VIRTIO_F_ANY_LAYOUT), so up to `size_max + 16` bytes are accepted.
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
    /// VIRTIO_BLK_F_DISCARD was negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    pub write_zeroes: bool,
}

/// A guest-physical buffer, already checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a discard or write-zeroes request, checked against the capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

impl SectorRange {
    /// Byte offset and length in the image.
    pub fn byte_range(&self) -> (u64, u64) {
        (
            self.sector << SECTOR_SHIFT,
            u64::from(self.num_sectors) << SECTOR_SHIFT,
        )
    }
}

/// Why a request was refused; logged at debug level (the guest controls how often).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the last descriptor is not device-writable, so there is no status byte")]
    NoStatus,
    #[error("the chain has more than seg_max + 2 descriptors")]
    TooManyDescriptors,
    #[error("a descriptor is longer than size_max")]
    DescriptorTooLarge,
    #[error(
        "the chain ends early: it loops, leaves its table, nests indirect tables or exceeds 4 GiB"
    )]
    BrokenChain,
    #[error("the chain's head is already in flight in this batch")]
    DuplicateHead,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("a descriptor lies outside guest memory")]
    OutOfGuestMemory,
    #[error("the header is shorter than 16 bytes")]
    ShortHeader,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("the request carries data in the wrong direction")]
    WrongDirection,
    #[error("the data length is not a multiple of 512")]
    UnalignedLength,
    #[error("the request reaches beyond the end of the disk")]
    OutOfRange,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("the GET_ID buffer is shorter than 20 bytes")]
    ShortIdBuffer,
    #[error("bad discard/write-zeroes segment list")]
    BadSegmentList,
    #[error("a discard/write-zeroes segment has unknown flags")]
    UnsupportedSegmentFlags,
    #[error("a discard/write-zeroes segment exceeds the advertised sector limit")]
    SegmentTooLarge,
}

impl RequestError {
    /// The status byte reported for this error.
    pub fn status(self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedSegmentFlags => {
                STATUS_UNSUPP
            }
            _ => STATUS_IOERR,
        }
    }
}

/// What a parsed request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// VIRTIO_BLK_T_IN: read `len` bytes at `sector` into `data`.
    Read {
        sector: u64,
        data: Vec<Segment>,
        len: u64,
    },
    /// VIRTIO_BLK_T_OUT: write the `len` bytes in `data` at `sector`.
    Write {
        sector: u64,
        data: Vec<Segment>,
        len: u64,
    },
    Flush,
    /// VIRTIO_BLK_T_GET_ID: write the serial into `data` (at least 20 bytes).
    GetId {
        data: Vec<Segment>,
    },
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
    /// Complete at once with this error's status.
    Fail(RequestError),
}

/// A request taken off the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Where the status byte goes; `None` means the chain cannot be answered (used length 0).
    pub status: Option<GuestAddress>,
    pub action: Action,
}

/// A flattened, validated view of a chain's descriptors.
struct Streams {
    readable: Vec<Segment>,
    /// Device-writable buffers, the status byte already removed.
    writable: Vec<Segment>,
}

impl Request {
    /// Parses the chain. Never fails: malformed chains become [`Action::Fail`].
    pub fn parse<M>(chain: DescriptorChain<M>, limits: &Limits) -> Request
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let head = chain.head_index();
        let mem: &GuestMemoryMmap = chain.memory();
        // Clone the memory handle out of the chain so the chain can be consumed.
        let (status, streams) = collect(chain.clone(), mem, limits);
        let action = match streams {
            Ok(streams) if status.is_some() => parse_action(streams, mem, limits),
            Ok(_) => Action::Fail(RequestError::NoStatus),
            Err(e) => Action::Fail(e),
        };
        Request {
            head,
            status,
            action,
        }
    }
}

/// Walks the chain: finds the status byte and splits the buffers by direction. Stops at the
/// first descriptor that makes the request refused; a refused chain has no known status byte.
fn collect<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> (Option<GuestAddress>, Result<Streams, RequestError>)
where
    M: Deref<Target = GuestMemoryMmap>,
{
    // Header + seg_max data descriptors + status, as Linux lays requests out.
    let max_descriptors = limits.seg_max as usize + 2;
    let max_len = u64::from(limits.size_max) + HEADER_LEN;
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut count = 0usize;
    // The last descriptor seen, whether it is writable and whether it points to a next one.
    let mut last: Option<(Segment, bool, bool)> = None;
    // The chain iterator ends chains that loop, leave the table, nest indirect tables or exceed
    // 4 GiB by returning `None` early; such a chain's last descriptor still has NEXT set.
    for desc in chain {
        count += 1;
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let refused = if count > max_descriptors {
            Some(RequestError::TooManyDescriptors)
        } else if u64::from(seg.len) > max_len {
            Some(RequestError::DescriptorTooLarge)
        } else if seg.len != 0 && !mem.check_range(seg.addr, seg.len as usize) {
            Some(RequestError::OutOfGuestMemory)
        } else if !desc.is_write_only() && !writable.is_empty() {
            Some(RequestError::ReadableAfterWritable)
        } else {
            None
        };
        if let Some(e) = refused {
            // No further descriptor is read: where the status byte is stays unknown.
            return (None, Err(e));
        }
        last = Some((seg, desc.is_write_only(), desc.has_next()));
        if seg.len == 0 {
            continue;
        }
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }

    // The status byte is the last byte of the last descriptor, which must be writable.
    let status = match last {
        Some((_, _, true)) => return (None, Err(RequestError::BrokenChain)),
        Some((seg, true, false)) if seg.len > 0 => seg
            .addr
            .checked_add(u64::from(seg.len) - 1)
            .filter(|addr| mem.check_range(*addr, 1)),
        _ => None,
    };
    if status.is_none() {
        return (None, Err(RequestError::NoStatus));
    }
    // Drop the status byte from the writable stream.
    if let Some(seg) = writable.last_mut() {
        seg.len -= 1;
        if seg.len == 0 {
            writable.pop();
        }
    }
    (status, Ok(Streams { readable, writable }))
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` at byte `at`: returns the bytes before it (copied) and the segments after.
fn split_front(
    segments: &[Segment],
    mem: &GuestMemoryMmap,
    at: u64,
) -> Result<(Vec<u8>, Vec<Segment>), RequestError> {
    let want = usize::try_from(at).map_err(|_| RequestError::ShortHeader)?;
    let mut front = Vec::with_capacity(want);
    let mut rest = Vec::new();
    for seg in segments {
        let missing = want - front.len();
        if missing == 0 {
            rest.push(*seg);
            continue;
        }
        let take = missing.min(seg.len as usize);
        let start = front.len();
        front.resize(start + take, 0);
        let buf = front.get_mut(start..).ok_or(RequestError::ShortHeader)?;
        mem.read_slice(buf, seg.addr)
            .map_err(|_| RequestError::OutOfGuestMemory)?;
        if take < seg.len as usize {
            let addr = seg
                .addr
                .checked_add(take as u64)
                .ok_or(RequestError::OutOfGuestMemory)?;
            rest.push(Segment {
                addr,
                len: seg.len - take as u32,
            });
        }
    }
    if front.len() < want {
        return Err(RequestError::ShortHeader);
    }
    Ok((front, rest))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Checks that `len` bytes at `sector` are inside the disk and a whole number of sectors.
fn check_data_range(sector: u64, len: u64, limits: &Limits) -> Result<(), RequestError> {
    if !len.is_multiple_of(1 << SECTOR_SHIFT) {
        return Err(RequestError::UnalignedLength);
    }
    let end = sector
        .checked_add(len >> SECTOR_SHIFT)
        .ok_or(RequestError::OutOfRange)?;
    if end > limits.capacity_sectors {
        return Err(RequestError::OutOfRange);
    }
    Ok(())
}

fn parse_action(streams: Streams, mem: &GuestMemoryMmap, limits: &Limits) -> Action {
    match parse_action_inner(streams, mem, limits) {
        Ok(action) => action,
        Err(e) => Action::Fail(e),
    }
}

fn parse_action_inner(
    streams: Streams,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Action, RequestError> {
    let (header, data_out) = split_front(&streams.readable, mem, HEADER_LEN)?;
    let request_type = le_u32(&header, 0);
    let sector = le_u64(&header, 8);
    // Moved into the action that uses it: no copy per request.
    let data_in = streams.writable;
    let out_len = total_len(&data_out);
    let in_len = total_len(&data_in);

    match request_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            check_data_range(sector, in_len, limits)?;
            Ok(Action::Read {
                sector,
                data: data_in,
                len: in_len,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_data_range(sector, out_len, limits)?;
            Ok(Action::Write {
                sector,
                data: data_out,
                len: out_len,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            Ok(Action::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            if in_len < ID_BYTES as u64 {
                return Err(RequestError::ShortIdBuffer);
            }
            Ok(Action::GetId { data: data_in })
        }
        VIRTIO_BLK_T_DISCARD if limits.discard => {
            let ranges = parse_ranges(
                &data_out,
                in_len,
                mem,
                limits,
                limits.max_discard_seg,
                limits.max_discard_sectors,
                false,
            )?;
            Ok(Action::Discard(ranges))
        }
        VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => {
            let ranges = parse_ranges(
                &data_out,
                in_len,
                mem,
                limits,
                limits.max_write_zeroes_seg,
                limits.max_write_zeroes_sectors,
                true,
            )?;
            Ok(Action::WriteZeroes(ranges))
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

/// Parses the `virtio_blk_discard_write_zeroes` array of a discard or write-zeroes request.
fn parse_ranges(
    data_out: &[Segment],
    in_len: u64,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    max_seg: u32,
    max_sectors: u32,
    unmap_allowed: bool,
) -> Result<Vec<SectorRange>, RequestError> {
    if in_len != 0 {
        return Err(RequestError::WrongDirection);
    }
    let out_len = total_len(data_out);
    if out_len == 0
        || !out_len.is_multiple_of(SEGMENT_LEN)
        || out_len / SEGMENT_LEN > u64::from(max_seg)
    {
        return Err(RequestError::BadSegmentList);
    }
    // At most max_seg * 16 bytes: bounded by the advertised limit.
    let (bytes, _) = split_front(data_out, mem, out_len)?;
    let mut ranges = Vec::with_capacity(bytes.len() / SEGMENT_LEN as usize);
    for raw in bytes.chunks_exact(SEGMENT_LEN as usize) {
        let sector = le_u64(raw, 0);
        let num_sectors = le_u32(raw, 8);
        let flags = le_u32(raw, 12);
        let unmap_flag = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        // Unknown flags, and unmap on a discard, are UNSUPP (5.2.6.2).
        if flags & !unmap_flag != 0 || (!unmap_allowed && flags & unmap_flag != 0) {
            return Err(RequestError::UnsupportedSegmentFlags);
        }
        if limits.read_only {
            return Err(RequestError::ReadOnly);
        }
        if num_sectors > max_sectors {
            return Err(RequestError::SegmentTooLarge);
        }
        check_data_range(sector, u64::from(num_sectors) << SECTOR_SHIFT, limits)?;
        ranges.push(SectorRange {
            sector,
            num_sectors,
            unmap: flags & unmap_flag != 0,
        });
    }
    Ok(ranges)
}
