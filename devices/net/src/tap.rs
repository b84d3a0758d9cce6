//! One tap queue: a descriptor the VMM opened on `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (+ `IFF_MULTI_QUEUE`), attached, with a 12-byte vnet
//! header (`TUNSETVNETHDRSZ`) and `O_NONBLOCK`. Each `read` gives one frame behind its
//! `virtio_net_hdr_v1`, each `write` takes one.
//!
//! The only ioctl the device makes once serving is [`TUNSETOFFLOAD`] (its seccomp filter allows
//! nothing else). [`Tap::check`] (before the filter) reads the queue's flags with `TUNGETIFF`
//! and `TUNGETVNETHDRSZ`, so a descriptor that is not such a tap is refused at start.
//! [`Tap::open_named`] is for hand runs (`--tap NAME`), before the jail.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `_IOW('T', 202, int)`: attach to (or create) a tap by name. Never allowed once serving.
pub const TUNSETIFF: u64 = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`: the queue's name and flags.
pub const TUNGETIFF: u64 = 0x8004_54d2;
/// `_IOW('T', 208, unsigned int)`: which offloads the tap may hand us (rx) — the one ioctl the
/// serving process makes.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `_IOR('T', 211, int)`: the queue's send buffer limit (`INT_MAX`, tun's default: none).
pub const TUNGETSNDBUF: u64 = 0x8004_54d3;
/// `_IOR('T', 215, int)`: the vnet header size.
pub const TUNGETVNETHDRSZ: u64 = 0x8004_54d7;
/// `_IOW('T', 216, int)`: set the vnet header size.
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

/// `TUNSETOFFLOAD` flags.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;

/// The vnet header the VMM configured (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq`: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    pad: [u8; 22],
}

/// Why a descriptor is not a usable tap queue.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("descriptor {fd} is not a tap queue (TUNGETIFF failed)")]
    NotTun {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is a tun queue with flags {flags:#x}; IFF_TAP, IFF_NO_PI and IFF_VNET_HDR are required")]
    Flags { fd: RawFd, flags: i16 },
    #[error("descriptor {fd} has a vnet header of {size} bytes; {VNET_HDR_LEN} is required")]
    VnetHdrSize { fd: RawFd, size: i32 },
    #[error("cannot make descriptor {fd} non-blocking")]
    NonBlocking {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("tap name {0:?} is empty, too long or not ASCII")]
    Name(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the vnet header size of tap {name}")]
    SetVnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// One tap queue (or, in tests, any packet descriptor such as a SOCK_SEQPACKET socket).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Wraps a descriptor without checking it (tests; [`Tap::check`] checks).
    pub fn from_fd(fd: OwnedFd) -> Tap {
        Tap { fd }
    }

    /// Checks that `fd` is a tap queue as the contract says and makes sure it is non-blocking.
    pub fn check(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is one.
        if unsafe { libc::ioctl(raw, TUNGETIFF as _, &mut req) } < 0 {
            return Err(TapError::NotTun {
                fd: raw,
                source: io::Error::last_os_error(),
            });
        }
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & wanted != wanted {
            return Err(TapError::Flags {
                fd: raw,
                flags: req.flags,
            });
        }
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes an int into `size`.
        if unsafe { libc::ioctl(raw, TUNGETVNETHDRSZ as _, &mut size) } < 0
            || size != VNET_HDR_LEN as i32
        {
            return Err(TapError::VnetHdrSize { fd: raw, size });
        }
        set_nonblocking(raw).map_err(|source| TapError::NonBlocking { fd: raw, source })?;
        Ok(Tap { fd })
    }

    /// Opens `queues` queues of the tap `name` (created if it does not exist; hand runs only,
    /// before the jail), configured as the VMM would.
    pub fn open_named(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.is_ascii() {
            return Err(TapError::Name(name.to_string()));
        }
        let path: &CStr = c"/dev/net/tun";
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues {
            // SAFETY: open with a NUL-terminated path and flags; the result is checked.
            let raw = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(TapError::OpenTun(io::Error::last_os_error()));
            }
            // SAFETY: `raw` was just opened and is owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
                pad: [0; 22],
            };
            if queues > 1 {
                req.flags |= IFF_MULTI_QUEUE;
            }
            if let Some(dst) = req.name.get_mut(..name.len()) {
                dst.copy_from_slice(name.as_bytes());
            }
            // SAFETY: TUNSETIFF reads a `struct ifreq`, which `req` is.
            if unsafe { libc::ioctl(raw, TUNSETIFF as _, &req) } < 0 {
                return Err(TapError::Attach {
                    name: name.into(),
                    source: io::Error::last_os_error(),
                });
            }
            let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int.
            if unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ as _, &size) } < 0 {
                return Err(TapError::SetVnetHdr {
                    name: name.into(),
                    source: io::Error::last_os_error(),
                });
            }
            taps.push(Tap { fd });
        }
        Ok(taps)
    }

    /// Reads one frame (with its vnet header) into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`; the descriptor is open.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (with its vnet header) from `buf`.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write reads `buf.len()` bytes from `buf`; the descriptor is open.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame (with its vnet header) from the pieces `iov` describes.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: writev reads the buffers `iov` describes, which the caller keeps valid (guest
        // memory mapped for the call); the descriptor is open.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// The queue's send buffer limit (`TUNGETSNDBUF`): `i32::MAX`, tun's default, is none. A
    /// limited one can refuse a write for room (`EAGAIN`). Before the seccomp filter only.
    pub fn send_buffer(&self) -> io::Result<i32> {
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETSNDBUF writes an int into `size`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETSNDBUF as _, &mut size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }

    /// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the tap may use in frames it hands us.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tap_check_socket_refused() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let fd = OwnedFd::from(a);
        assert!(matches!(Tap::check(fd), Err(TapError::NotTun { .. })));
    }

    #[test]
    fn test_ioctl_numbers_match_linux() {
        // _IOW('T', n, int) = 1 << 30 | 4 << 16 | 'T' << 8 | n
        let iow = |n: u64| (1u64 << 30) | (4 << 16) | (u64::from(b'T') << 8) | n;
        let ior = |n: u64| (2u64 << 30) | (4 << 16) | (u64::from(b'T') << 8) | n;
        assert_eq!(TUNSETIFF, iow(202));
        assert_eq!(TUNSETOFFLOAD, iow(208));
        assert_eq!(TUNSETVNETHDRSZ, iow(216));
        assert_eq!(TUNGETIFF, ior(210));
        assert_eq!(TUNGETVNETHDRSZ, ior(215));
        assert_eq!(TUNGETSNDBUF, ior(211));
    }

    #[test]
    fn test_open_named_bad_name_refused() {
        assert!(matches!(Tap::open_named("", 1), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open_named("a-name-that-is-too-long", 1),
            Err(TapError::Name(_))
        ));
    }
}
