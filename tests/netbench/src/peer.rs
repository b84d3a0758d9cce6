//! The other side of the tap: this process's own network namespace, the frames, a raw
//! `AF_PACKET` source on the tap, and the tap's counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

pub const DRIVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A MAC nobody in the namespace has: frames from the driver are counted by the tap, seen by
/// the stack as PACKET_OTHERHOST and dropped at once, the same for every backend.
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const SRC_IP: [u8; 4] = [10, 98, 0, 2];
const DST_IP: [u8; 4] = [10, 98, 0, 3];
/// Ethernet + IPv4 + TCP headers of the TSO frames.
pub const TCP_HEADERS: usize = 54;
/// TCP payload of a "64 KiB" segment: the largest an IPv4 total length allows, rounded down.
pub const TSO_PAYLOAD: usize = 65400;
/// Segment size the TSO header asks for (an MTU of 1500).
const MSS: u16 = 1448;

/// Move this process into a network namespace of its own (before any thread starts: the
/// backends it starts, their taps and the packet sockets all live there).
pub fn own_namespace() -> Result<()> {
    // SAFETY: unshare takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (run as root)");
    }
    // No IPv6 chatter (router solicitations, MLD) from the taps into the rx rings.
    for p in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
    }
    Ok(())
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn eth_ip(dst: [u8; 6], src: [u8; 6], proto: u8, l4_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + l4_len) as u16;
    let mut ip = [
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip[12..16].copy_from_slice(&SRC_IP);
    ip[16..20].copy_from_slice(&DST_IP);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// An Ethernet/IPv4/TCP segment of `TSO_PAYLOAD` bytes with the pseudo-header checksum in the
/// TCP checksum field (CHECKSUM_PARTIAL), to be sent with `tso_header`.
pub fn tso_frame(to_driver: bool) -> Vec<u8> {
    let (dst, src) = if to_driver {
        (DRIVER_MAC, OTHER_MAC)
    } else {
        (OTHER_MAC, DRIVER_MAC)
    };
    let tcp_len = 20 + TSO_PAYLOAD;
    let mut f = eth_ip(dst, src, 6, tcp_len);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&5001u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5002u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH | ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = csum_add(0, &SRC_IP);
    pseudo = csum_add(pseudo, &DST_IP);
    pseudo += 6 + tcp_len as u32;
    tcp[16..18].copy_from_slice(&csum_fold(pseudo).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..TSO_PAYLOAD).map(|i| i as u8));
    f
}

/// A 64-byte Ethernet/IPv4/UDP frame (no checksum offload).
pub fn small_frame(to_driver: bool) -> Vec<u8> {
    let (dst, src) = if to_driver {
        (DRIVER_MAC, OTHER_MAC)
    } else {
        (OTHER_MAC, DRIVER_MAC)
    };
    let udp_len = 64 - 34;
    let mut f = eth_ip(dst, src, 17, udp_len);
    let mut udp = vec![0u8; udp_len];
    udp[0..2].copy_from_slice(&5001u16.to_be_bytes());
    udp[2..4].copy_from_slice(&5002u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// `struct virtio_net_hdr` (10 bytes; `num_buffers` follows in the 12-byte v1 form): a TCPv4
/// segment with checksum offload, or nothing.
pub fn vnet_header(tso: bool) -> [u8; 10] {
    let mut h = [0u8; 10];
    if tso {
        h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        h[2..4].copy_from_slice(&(TCP_HEADERS as u16).to_le_bytes());
        h[4..6].copy_from_slice(&MSS.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
    }
    h
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: `c` is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// The tap's counters from the kernel's side: (frames the backend wrote into it, frames
/// the kernel queued to it), from /proc/net/dev of this namespace.
pub fn tap_counters(name: &str) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/net/dev").context("read /proc/self/net/dev")?;
    for line in text.lines() {
        if let Some((n, rest)) = line.split_once(':') {
            if n.trim() == name {
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                if v.len() >= 10 {
                    return Ok((v[1], v[9]));
                }
            }
        }
    }
    bail!("{name} not in /proc/net/dev")
}

/// A thread sending `frame` (after its 10-byte vnet header) into the tap as fast as the
/// kernel takes it, through a raw packet socket with PACKET_VNET_HDR. Through the tap's qdisc:
/// PACKET_QDISC_BYPASS drops what the kernel has to segment (a tap without TSO).
pub struct Source {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) -> Result<()> {
    // SAFETY: `v` is a valid int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt {opt}"));
    }
    Ok(())
}

impl Source {
    pub fn start(ifindex: u32, hdr: [u8; 10], frame: Vec<u8>) -> Result<Self> {
        // Protocol 0: the socket sends only, it never receives a copy of anything.
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `fd` is ours.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind the packet socket");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            const BATCH: usize = 32;
            let mut iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut libc::c_void,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                },
            ];
            // SAFETY: all-zero is a valid mmsghdr.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for m in msgs.iter_mut() {
                m.msg_hdr.msg_iov = iov.as_mut_ptr();
                m.msg_hdr.msg_iovlen = 2;
            }
            while !s.load(Ordering::Relaxed) {
                // SAFETY: `msgs` holds BATCH valid headers pointing at `iov`, which points at
                // `hdr` and `frame`; all outlive the call.
                let r = unsafe { libc::sendmmsg(raw, msgs.as_mut_ptr(), BATCH as u32, 0) };
                if r > 0 {
                    n.fetch_add(r as u64, Ordering::Relaxed);
                } else {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => {
                            std::thread::yield_now()
                        }
                        _ => return Err(e).context("sendmmsg on the packet socket"),
                    }
                }
            }
            drop(fd);
            Ok(())
        });
        Ok(Source {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("source thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_have_their_sizes_and_valid_ip_checksums() {
        for to_driver in [false, true] {
            let s = small_frame(to_driver);
            assert_eq!(s.len(), 64);
            let t = tso_frame(to_driver);
            assert_eq!(t.len(), TCP_HEADERS + TSO_PAYLOAD);
            for f in [&s, &t] {
                // The IPv4 header sums to 0xffff with its checksum in place.
                assert_eq!(csum_fold(csum_add(0, &f[14..34])), 0xffff);
                assert_eq!(&f[12..14], &[0x08, 0x00]);
            }
            let tot = u16::from_be_bytes([t[16], t[17]]) as usize;
            assert_eq!(tot + 14, t.len());
            let dst = if to_driver { DRIVER_MAC } else { OTHER_MAC };
            assert_eq!(&t[0..6], &dst);
        }
    }

    #[test]
    fn test_vnet_header_describes_a_tcpv4_segment() {
        let h = vnet_header(true);
        assert_eq!(h[0], 1);
        assert_eq!(h[1], 1);
        assert_eq!(u16::from_le_bytes([h[2], h[3]]) as usize, TCP_HEADERS);
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34);
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
        assert_eq!(vnet_header(false), [0u8; 10]);
    }
}
