//! The control virtqueue (`VIRTIO_NET_F_CTRL_VQ`), served in the device process.
//!
//! A command is one chain: device-readable `class`, `command` and data, then a device-writable
//! ack byte (`VIRTIO_NET_OK` or `VIRTIO_NET_ERR`). What is answered:
//!
//! - `MQ / VQ_PAIRS_SET n` (with MQ): 1 ≤ n ≤ max pairs, OK; rx stops on the pairs above n.
//! - `GUEST_OFFLOADS / SET bits` (with CTRL_GUEST_OFFLOADS): bits among the guest offloads the
//!   driver negotiated; the tap's `TUNSETOFFLOAD` follows; OK, or ERR if the tap refuses.
//! - `RX / PROMISC|ALLMULTI|ALLUNI|NOMULTI|NOUNI|NOBCAST on|off`: OK. The device does not
//!   filter: it hands the guest every frame the tap gives it, which every mode allows.
//! - `MAC / TABLE_SET` (well-formed tables), `MAC / ADDR_SET` (6 bytes): OK, for the same
//!   reason (the host side, a bridge, learns the guest's address from its frames).
//! - anything else, or a malformed command: ERR.
//!
//! A chain without a writable byte for the ack, or with writable descriptors before the
//! readable ones end, is returned unused (length 0). At most [`CTRL_MAX`] bytes are read.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::datapath::{QueueError, Round, Stop, BATCH};
use crate::stats::{add, Stats};

/// The most command bytes read from one chain (header and data).
pub const CTRL_MAX: usize = 65536;

/// A parsed control command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_RX`: a receive mode switched on or off.
    RxMode { command: u8, on: bool },
    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET` with this many unicast and multicast entries.
    MacTable { unicast: u32, multicast: u32 },
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
    MacAddr([u8; 6]),
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
    QueuePairs(u16),
    /// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` (virtio feature bits).
    GuestOffloads(u64),
}

/// Parses a command (class, command, data). `None`: unknown or malformed.
pub fn parse(bytes: &[u8]) -> Option<Command> {
    let (&class, rest) = bytes.split_first()?;
    let (&command, data) = rest.split_first()?;
    let (class, command) = (u32::from(class), u32::from(command));
    match class {
        VIRTIO_NET_CTRL_RX if command <= VIRTIO_NET_CTRL_RX_NOBCAST => match data {
            [on] => Some(Command::RxMode {
                command: command as u8,
                on: *on != 0,
            }),
            _ => None,
        },
        VIRTIO_NET_CTRL_MAC if command == VIRTIO_NET_CTRL_MAC_TABLE_SET => {
            let (unicast, rest) = mac_table(data)?;
            let (multicast, rest) = mac_table(rest)?;
            rest.is_empty()
                .then_some(Command::MacTable { unicast, multicast })
        }
        VIRTIO_NET_CTRL_MAC if command == VIRTIO_NET_CTRL_MAC_ADDR_SET => {
            Some(Command::MacAddr(data.try_into().ok()?))
        }
        VIRTIO_NET_CTRL_MQ if command == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => Some(
            Command::QueuePairs(u16::from_le_bytes(data.try_into().ok()?)),
        ),
        VIRTIO_NET_CTRL_GUEST_OFFLOADS if command == VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET => Some(
            Command::GuestOffloads(u64::from_le_bytes(data.try_into().ok()?)),
        ),
        _ => None,
    }
}

/// `struct virtio_net_ctrl_mac`: a little-endian count, then that many 6-byte addresses.
fn mac_table(data: &[u8]) -> Option<(u32, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let len = usize::try_from(count).ok()?.checked_mul(6)?;
    let rest = data.get(4..)?;
    Some((count, rest.get(len..)?))
}

/// One round of the control queue: each command is parsed and handed to `execute`, whose
/// verdict (true: OK) is the ack.
pub fn process_ctrl(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    stats: &Stats,
    mut execute: impl FnMut(Option<Command>) -> bool,
) -> Result<Round, QueueError> {
    let mut round = Round {
        used: false,
        stop: Stop::Budget,
    };
    let size = q.size();
    let mut bytes = Vec::new();
    for _ in 0..BATCH {
        let chain = {
            let mut iter = q.iter(mem).map_err(QueueError::AvailRing)?;
            iter.next()
        };
        let Some(chain) = chain else {
            round.stop = Stop::Idle;
            return Ok(round);
        };
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError::HeadIndex(head));
        }
        bytes.clear();
        let mut too_long = false;
        let mut ack_at = None;
        let mut bad = false;
        for desc in chain {
            if desc.is_write_only() {
                if ack_at.is_none() && desc.len() > 0 {
                    ack_at = Some(desc.addr());
                }
                continue;
            }
            if ack_at.is_some() {
                // Readable after writable.
                bad = true;
                break;
            }
            let n = desc.len() as usize;
            if bytes.len() + n > CTRL_MAX {
                too_long = true;
                continue;
            }
            let at = bytes.len();
            bytes.resize(at + n, 0);
            let Some(dst) = bytes.get_mut(at..) else {
                bad = true;
                break;
            };
            if mem.read_slice(dst, desc.addr()).is_err() {
                bad = true;
                break;
            }
        }
        let Some(ack_at) = ack_at.filter(|_| !bad) else {
            add(&stats.bad_chains, 1);
            q.add_used(mem, head, 0).map_err(QueueError::AddUsed)?;
            round.used = true;
            continue;
        };
        let command = if too_long { None } else { parse(&bytes) };
        let ok = execute(command);
        add(&stats.ctrl_commands, 1);
        let ack = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
        let len = if mem.write_obj(ack, ack_at).is_ok() {
            1
        } else {
            0
        };
        q.add_used(mem, head, len).map_err(QueueError::AddUsed)?;
        round.used = true;
    }
    Ok(round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_commands() {
        assert_eq!(
            parse(&[4, 0, 2, 0]),
            Some(Command::QueuePairs(2)),
            "VQ_PAIRS_SET 2"
        );
        assert_eq!(parse(&[4, 0, 2]), None, "short data");
        assert_eq!(parse(&[4, 1, 2, 0]), None, "RSS config is not offered");
        assert_eq!(
            parse(&[5, 0, 0x83, 0, 0, 0, 0, 0, 0, 0]),
            Some(Command::GuestOffloads(0x83))
        );
        assert_eq!(
            parse(&[0, 0, 1]),
            Some(Command::RxMode {
                command: 0,
                on: true
            })
        );
        assert_eq!(parse(&[0, 6, 1]), None, "no such rx mode");
        assert_eq!(parse(&[0, 1, 1, 1]), None, "rx mode data is one byte");
        assert_eq!(
            parse(&[1, 1, 2, 0, 0, 0, 0, 1]),
            Some(Command::MacAddr([2, 0, 0, 0, 0, 1]))
        );
        let mut table = vec![1, 0];
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        table.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            parse(&table),
            Some(Command::MacTable {
                unicast: 1,
                multicast: 0
            })
        );
        table.push(0);
        assert_eq!(parse(&table), None, "trailing byte");
        let mut huge = vec![1, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&huge), None, "count past the data");
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[3]), None);
        assert_eq!(parse(&[3, 0]), None, "announce is not offered");
    }
}
