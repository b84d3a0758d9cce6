//! Helpers for tests and fuzz targets of device processes (feature `test-utils`; never in a
//! device binary): guest-memory memfds, raw vhost-user messages sent with descriptors (for
//! what `vhost::vhost_user::Frontend` refuses to send), and the VMM's side of the control
//! channel.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::MAX_MESSAGE;

/// A memfd of `size` bytes, as a frontend's guest memory.
pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size memfd");
    file
}

/// A vhost-user message: header (request code, `flags` (1: version 1, no reply wanted), body
/// size) and body.
pub fn vhost_user_message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// `sendmsg` of `bytes` with `fds` as SCM_RIGHTS on socket `socket`, with `flags`
/// (MSG_DONTWAIT...); the raw result (bytes sent, or -1).
pub fn send_with_fds(socket: &impl AsRawFd, bytes: &[u8], fds: &[RawFd], flags: i32) -> isize {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE computes a size from an integer.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, enough for one header
        // and the descriptors, which are copied in below.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: sendmsg reads the message and control data prepared above (the iovec's
    // pointer is only read).
    unsafe { libc::sendmsg(socket.as_raw_fd(), &hdr, flags) }
}

/// A connected `SOCK_SEQPACKET` pair, as the VMM makes for a control channel.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "socketpair");
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one control request on the VMM's end `fd` and returns the reply.
pub fn ask(fd: &OwnedFd, request: &[u8]) -> String {
    // SAFETY: write from a valid slice on an open descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), request.as_ptr().cast(), request.len()) };
    assert_eq!(n, request.len() as isize, "control request not sent");
    let mut buf = vec![0u8; 2 * MAX_MESSAGE];
    // SAFETY: read into a valid buffer on an open descriptor.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0, "no reply to the control request");
    buf.truncate(n as usize);
    String::from_utf8(buf).expect("UTF-8 reply")
}
