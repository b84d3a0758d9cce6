//! Tap devices for `--net`: the VMM opens (or creates) the tap, one queue descriptor per queue
//! pair, configures the host side, and hands the queue descriptors to the `bulkhead-net`
//! process, which never opens anything by path (docs/net.md).
//!
//! Everything here runs in the main thread while the VM is created, before the main thread's
//! seccomp filter, so the VMM's filters allow none of it.
//!
//! The ioctls are made with `libc` directly: `vmm-sys-util` 0.15 has no tap or interface
//! code (its `net` module left it for Cloud Hypervisor's `net_util`, which is not published on
//! crates.io), and its ioctl helpers would only wrap the same `libc::ioctl` calls.

use std::ffi::CStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The virtio-net header the device exchanges with the tap: `virtio_net_hdr_v1`, with
/// `num_buffers` (MRG_RXBUF and VERSION_1 both use the 12-byte form).
pub const VNET_HDR_SIZE: libc::c_int = 12;

/// The flags every queue of a Bulkhead tap has.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// Errors opening, checking or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] std::io::Error),
    /// TUNSETIFF was refused.
    #[error("tap {name}: {why}")]
    Attach {
        /// The interface.
        name: String,
        /// What it means, in words.
        why: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// A tap ioctl failed on an attached queue.
    #[error("tap {name}: {what}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor given with `fd=` is not a usable tap queue.
    #[error("fd={fd}: {why}")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
    /// Configuring the host side (address, netmask, MTU, up) failed.
    #[error("tap {name}: {what}")]
    Host {
        /// The interface.
        name: String,
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and sockaddrs); all
    // zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME)) {
        *dst = src as libc::c_char;
    }
    req
}

fn ifreq_name(req: &libc::ifreq) -> String {
    // SAFETY: the kernel NUL-terminates ifr_name (IFNAMSIZ bytes, the name at most 15), and
    // ifreq() leaves at least the last byte zero.
    unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether `name` is acceptable as an interface name (what the kernel's `dev_valid_name`
/// accepts, minus the characters that would be awkward on a command line).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// What the kernel's flags of an existing tun/tap interface say, for an error message: the
/// interface's `tun_flags` in sysfs, or that it is not a tun/tap device at all.
fn existing_kind(name: &str, want_multi: bool) -> String {
    let path = format!("/sys/class/net/{name}/tun_flags");
    let Ok(text) = std::fs::read_to_string(&path) else {
        if std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
            return "an interface of that name exists and is not a tun/tap device".into();
        }
        return "the kernel refused the flags IFF_TAP|IFF_NO_PI|IFF_VNET_HDR".into();
    };
    let flags = i64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    let flags = flags as libc::c_int;
    if flags & libc::IFF_TUN != 0 {
        return "it exists as a tun (layer 3) device, not a tap; delete it or pick another name"
            .into();
    }
    let multi = flags & libc::IFF_MULTI_QUEUE != 0;
    match (multi, want_multi) {
        (false, true) => "it exists as a single-queue tap, and num_queues > 2 needs a \
                          multi-queue one (IFF_MULTI_QUEUE); recreate it with multi_queue or \
                          use num_queues=2"
            .into(),
        (true, false) => "it exists as a multi-queue tap, and num_queues=2 opens a single-queue \
                          one; recreate it without multi_queue or raise num_queues"
            .into(),
        _ => format!("it exists with flags {flags:#x}, which do not match"),
    }
}

/// Opens `queue_pairs` queues of tap `name` (created if it does not exist; non-persistent
/// then, so it goes away with the last queue), each with [`TAP_FLAGS`] (plus
/// `IFF_MULTI_QUEUE` when `queue_pairs` > 1), non-blocking and close-on-exec, with a
/// [`VNET_HDR_SIZE`]-byte virtio-net header.
pub fn open_queues(name: &str, queue_pairs: u16) -> Result<Vec<File>, TapError> {
    let multi = queue_pairs > 1;
    let flags = TAP_FLAGS | if multi { libc::IFF_MULTI_QUEUE } else { 0 };
    let mut queues = Vec::with_capacity(usize::from(queue_pairs));
    for _ in 0..queue_pairs.max(1) {
        // SAFETY: open with a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back the name into) the ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } < 0 {
            let source = std::io::Error::last_os_error();
            let why = match source.raw_os_error() {
                Some(libc::EPERM) => "creating or attaching a tap needs CAP_NET_ADMIN (and the \
                                      tap's owner, if it has one)"
                    .into(),
                Some(libc::EBUSY) => {
                    "it is in use (a single-queue tap has one user: another VM?)".into()
                }
                Some(libc::EINVAL) => existing_kind(name, multi),
                _ => "cannot attach to it".into(),
            };
            return Err(TapError::Attach {
                name: name.into(),
                why,
                source,
            });
        }
        set_vnet_hdr_size(&file).map_err(|source| TapError::Ioctl {
            name: name.into(),
            what: "TUNSETVNETHDRSZ",
            source,
        })?;
        queues.push(file);
    }
    Ok(queues)
}

fn set_vnet_hdr_size(file: &File) -> std::io::Result<()> {
    let size: libc::c_int = VNET_HDR_SIZE;
    // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer we pass.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The interface name and tun flags behind a tap queue descriptor (TUNGETIFF).
pub fn queue_info(fd: RawFd) -> Result<(String, libc::c_int), TapError> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TapError::NotTap {
            fd,
            why: "not an open descriptor of this process".into(),
        });
    }
    let mut req = ifreq("");
    // SAFETY: TUNGETIFF writes the name and flags into the ifreq we own.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF as _, &mut req) } < 0 {
        return Err(TapError::NotTap {
            fd,
            why: format!(
                "not an attached tap queue (TUNGETIFF: {})",
                std::io::Error::last_os_error()
            ),
        });
    }
    // SAFETY: TUNGETIFF filled in ifru_flags.
    let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff;
    Ok((ifreq_name(&req), flags))
}

/// Checks descriptors handed in with `fd=`: each an attached queue of the same tap, with
/// [`TAP_FLAGS`] (and `IFF_MULTI_QUEUE` when more than one); marks them close-on-exec.
/// Returns the tap's name.
pub fn check_queue_fds(fds: &[RawFd]) -> Result<String, TapError> {
    let mut name: Option<String> = None;
    for &fd in fds {
        let (n, flags) = queue_info(fd)?;
        let missing: Vec<&str> = [
            (libc::IFF_TAP, "IFF_TAP (it is a tun)"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
        ]
        .iter()
        .filter(|(f, _)| flags & f == 0)
        .map(|(_, s)| *s)
        .collect();
        if !missing.is_empty() {
            return Err(TapError::NotTap {
                fd,
                why: format!(
                    "tap {n} was opened without {}; open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                    missing.join(", ")
                ),
            });
        }
        if fds.len() > 1 && flags & libc::IFF_MULTI_QUEUE == 0 {
            return Err(TapError::NotTap {
                fd,
                why: format!(
                    "{} descriptors of tap {n}, which is not multi-queue",
                    fds.len()
                ),
            });
        }
        match &name {
            Some(first) if *first != n => {
                return Err(TapError::NotTap {
                    fd,
                    why: format!("a queue of tap {n}, the others are of tap {first}"),
                })
            }
            _ => name = Some(n),
        }
        // SAFETY: F_SETFD on a descriptor checked open above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    name.ok_or(TapError::NotTap {
        fd: -1,
        why: "no descriptor".into(),
    })
}

/// Copies of descriptors handed in with `fd=` for the device process: close-on-exec,
/// non-blocking, with the [`VNET_HDR_SIZE`]-byte header. The caller's descriptors stay
/// open (they belong to whoever handed them in).
pub fn dup_queues(fds: &[RawFd]) -> Result<Vec<File>, TapError> {
    let mut out = Vec::with_capacity(fds.len());
    for &fd in fds {
        let (name, _) = queue_info(fd)?;
        // SAFETY: F_DUPFD_CLOEXEC on a checked descriptor; the result is checked.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if copy < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "duplicating the queue descriptor",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: copy was just created and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(copy) });
        // SAFETY: F_GETFL / F_SETFL on our descriptor (O_NONBLOCK is the open file
        // description's: the caller's descriptor becomes non-blocking too).
        let fl = unsafe { libc::fcntl(copy, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(copy, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Ioctl {
                name,
                what: "making the queue non-blocking",
                source: std::io::Error::last_os_error(),
            });
        }
        set_vnet_hdr_size(&file).map_err(|source| TapError::Ioctl {
            name: name.clone(),
            what: "TUNSETVNETHDRSZ",
            source,
        })?;
        out.push(file);
    }
    Ok(out)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads the
    // family first and then the sockaddr_in layout.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The host side of tap `name`, as Cloud Hypervisor's `open_tap` sets it: the address and
/// netmask when given, the MTU when given, then the interface up.
pub fn configure_host(
    name: &str,
    addr: Option<(Ipv4Addr, Ipv4Addr)>,
    mtu: Option<u16>,
) -> Result<(), TapError> {
    let host = |what: &'static str| {
        let source = std::io::Error::last_os_error();
        TapError::Host {
            name: name.into(),
            what,
            source,
        }
    };
    // The SIOCSIF* requests need a socket of a family that has them; AF_INET has them all.
    // SAFETY: socket() with constant arguments; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(host("creating a socket for its configuration"));
    }
    // SAFETY: s was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let ioctl = |request: libc::c_ulong, req: &mut libc::ifreq| {
        // SAFETY: SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU, SIOCGIFFLAGS and SIOCSIFFLAGS read
        // (or fill in) the ifreq we own, and nothing else.
        unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) }
    };
    if let Some((ip, mask)) = addr {
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr_in(ip);
        if ioctl(libc::SIOCSIFADDR, &mut req) < 0 {
            return Err(host("setting its address (SIOCSIFADDR)"));
        }
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        if ioctl(libc::SIOCSIFNETMASK, &mut req) < 0 {
            return Err(host("setting its netmask (SIOCSIFNETMASK)"));
        }
    }
    if let Some(mtu) = mtu {
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        if ioctl(libc::SIOCSIFMTU, &mut req) < 0 {
            return Err(host("setting its MTU (SIOCSIFMTU)"));
        }
    }
    let mut req = ifreq(name);
    if ioctl(libc::SIOCGIFFLAGS, &mut req) < 0 {
        return Err(host("reading its flags (SIOCGIFFLAGS)"));
    }
    // SAFETY: SIOCGIFFLAGS filled in ifru_flags.
    let up =
        unsafe { req.ifr_ifru.ifru_flags } | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    req.ifr_ifru.ifru_flags = up;
    if ioctl(libc::SIOCSIFFLAGS, &mut req) < 0 {
        return Err(host("bringing it up (SIOCSIFFLAGS)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_valid_name_rules() {
        assert!(valid_name("bh0"));
        assert!(valid_name("tap-vm_1.a"));
        assert!(!valid_name(""));
        assert!(!valid_name("."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("sixteen-chars-xx"));
        assert!(valid_name("fifteen-chars-x"));
    }

    #[test]
    fn test_queue_info_non_tap_descriptor_refused() {
        let f = File::open("/dev/null").expect("/dev/null");
        let e = queue_info(f.as_raw_fd()).expect_err("not a tap");
        assert!(e.to_string().contains("not an attached tap queue"), "{e}");
        let e = queue_info(9999).expect_err("not open");
        assert!(e.to_string().contains("not an open descriptor"), "{e}");
        assert!(check_queue_fds(&[f.as_raw_fd()]).is_err());
    }

    /// With CAP_NET_ADMIN and /dev/net/tun: a two-pair tap, its queues' flags, a second
    /// single-queue open of it refused with words. Skipped otherwise.
    #[test]
    fn test_open_queues_multi_queue_then_single_refused() {
        let name = format!("bhtest{}", std::process::id() % 100_000);
        let queues = match open_queues(&name, 2) {
            Ok(q) => q,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        assert_eq!(queues.len(), 2);
        let fds: Vec<RawFd> = queues.iter().map(|q| q.as_raw_fd()).collect();
        assert_eq!(check_queue_fds(&fds).expect("queues"), name);
        let (_, flags) = queue_info(fds[0]).expect("info");
        assert_eq!(flags & TAP_FLAGS, TAP_FLAGS);
        assert_ne!(flags & libc::IFF_MULTI_QUEUE, 0);
        let e = open_queues(&name, 1).expect_err("single-queue open of a multi-queue tap");
        assert!(e.to_string().contains("multi-queue tap"), "{e}");
        let copies = dup_queues(&fds).expect("dup");
        assert_eq!(copies.len(), 2);
        // The host side: an address of a test range, the MTU, up. The tap goes away with its
        // queues at the end of the test.
        let addr = (
            Ipv4Addr::new(198, 18, 254, 1),
            Ipv4Addr::new(255, 255, 255, 252),
        );
        configure_host(&name, Some(addr), Some(1400)).expect("host side");
        let sys = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{f}"));
        assert_eq!(sys("mtu").expect("mtu").trim(), "1400");
        let flags = sys("flags").expect("flags");
        let flags = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("hex");
        assert_ne!(flags & i64::from(libc::IFF_UP), 0, "tap is not up");
    }
}
