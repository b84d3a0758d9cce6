//! Entry points for the fuzz targets in `vmm/fuzz` (not part of the VMM's interface): the
//! virtio-pci transport driven by guest accesses, and the VMM's vhost-user frontend fed
//! replies a backend chose. Both run against the in-process fake backend, without KVM.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::fake_backend::{honest, memfd, Action, Fake, Msg};
use super::pci::VirtioPci;
use super::vhost_user::{Job, VhostUserDevice};
use crate::mmio::MmioBus;
use crate::pci::PciDevice;

const CONFIG: [u8; 16] = [7; 16];

/// As in the `bulkhead` binary (Rust's runtime sets it before `main`, which a libFuzzer
/// target does not run): a write to a socket whose peer is gone is an EPIPE error, not a
/// SIGPIPE that ends the process.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN, before any handler could matter.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

fn memory() -> GuestMemoryMmap {
    let file = std::fs::File::from(memfd(0x10000));
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        0x10000,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("64 KiB of memfd-backed memory")
}

/// Interprets `data` as guest accesses to one virtio-pci function (fronting an honest
/// backend): each access is 4 bytes of header (kind, size, offset) and the value. Kinds:
/// PCI configuration read/write, BAR 0 read/write (common configuration, device
/// configuration, notifications, MSI-X table and PBA, and what lies between).
pub fn transport(data: &[u8]) {
    ignore_sigpipe();
    let mut fake = Fake::start(|m| honest(&CONFIG, 2, m));
    let Some(frontend) = fake.frontend.take() else {
        return;
    };
    let Ok(backend) = VhostUserDevice::handshake_with_timeout(
        "fuzz".into(),
        frontend,
        2,
        Duration::from_millis(200),
    ) else {
        return;
    };
    let Ok(mut pci) = VirtioPci::new(
        2,
        0x01_80_00,
        64,
        backend,
        memory(),
        Arc::new(MmioBus::default()),
    ) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 4 {
        let (kind, size_code, off) = (rest[0], rest[1], u16::from_le_bytes([rest[2], rest[3]]));
        rest = &rest[4..];
        let size = [1usize, 2, 4, 8][usize::from(size_code & 3)];
        let value: Vec<u8> = rest.iter().copied().take(size).collect();
        rest = &rest[value.len()..];
        let mut buf = vec![0u8; size];
        buf[..value.len()].copy_from_slice(&value);
        match kind % 4 {
            0 => pci.config_read(1, usize::from(off) & 0xfff, &mut buf[..size.min(4)]),
            1 => pci.config_write(1, usize::from(off) & 0xfff, &buf[..size.min(4)]),
            // BAR 0 is 64 KiB: spread the 16-bit offset over it with a bias to the start.
            2 => pci.bar_read_for_fuzzing(u64::from(off), &mut buf),
            _ => pci.bar_write_for_fuzzing(u64::from(off), &buf),
        }
    }
}

/// Runs the VMM's handshake and jobs against a backend whose replies come from `data`: each
/// reply is a length byte and that many bytes (header and body as the backend sends them);
/// when `data` runs out the backend is honest. Nothing here may panic or hang.
pub fn replies(data: &[u8]) {
    ignore_sigpipe();
    let mut rest = data.to_vec();
    let mut take = move |m: &Msg| -> Action {
        if rest.is_empty() {
            return honest(&CONFIG, 1, m);
        }
        let n = usize::from(rest[0]).min(rest.len() - 1);
        let bytes = rest[1..1 + n].to_vec();
        rest.drain(..1 + n);
        if bytes.is_empty() {
            Action::Nothing
        } else {
            Action::Send(bytes, Vec::new())
        }
    };
    let mut fake = Fake::start(move |m| take(m));
    let Some(frontend) = fake.frontend.take() else {
        return;
    };
    let Ok(dev) = VhostUserDevice::handshake_with_timeout(
        "fuzz".into(),
        frontend,
        1,
        Duration::from_millis(50),
    ) else {
        return;
    };
    dev.submit(Job::WriteConfig {
        offset: 0,
        data: vec![1, 2],
    });
    dev.submit(Job::RefreshConfig);
    dev.submit(Job::Activate {
        memory: memory(),
        features: 1 << 32,
        rings: vec![None],
        kicks: Vec::new(),
        calls: Vec::new(),
    });
    dev.shared.reset_started();
    dev.submit(Job::Deactivate);
    for _ in 0..100 {
        if !dev.shared.resetting() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
