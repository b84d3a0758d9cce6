//! vhost-user messages from a hostile frontend into a device process: the runtime's stream
//! server serving the block backend over a socketpair. It must never panic, whatever it is
//! sent; it may refuse and end the connection.
//!
//! Input layout: a sequence of chunks `[fds] [len lo] [len hi] [len bytes]`; each chunk is sent
//! as one `sendmsg` carrying `fds % 5` descriptors: a 1 MiB memfd (guest memory for memory
//! tables and regions) and signalled eventfds (kick, call and err descriptors; a signalled
//! kick makes the queue worker process the ring). The frontend then hangs up.

#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use bulkhead_block::{BlockBackend, BlockDeviceConfig, DiskImage, OpenMode, Serial};
use bulkhead_device_runtime::serve_stream;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const MAX_INPUT: usize = 32 << 10;

fn memfd() -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the descriptor just created.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 20) }, 0);
    fd
}

fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
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
        // SAFETY: the control buffer holds one header and the descriptors.
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
    // SAFETY: sendmsg reads the message and control data prepared above.
    unsafe { libc::sendmsg(stream.as_raw_fd(), &hdr, libc::MSG_DONTWAIT) > 0 }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let image = TempFile::new().expect("temp image");
    image.as_file().write_all(&[0u8; 32 << 10]).expect("fill");
    let disk = DiskImage::open(image.as_path(), OpenMode::default()).expect("open image");
    let backend = BlockBackend::new(BlockDeviceConfig {
        disk,
        num_queues: 2,
        queue_size: 16,
        serial: Serial::default(),
    });
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut rest = data;
    while let [fds, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        let mut owned: Vec<OwnedFd> = Vec::new();
        for i in 0..(fds % 5) {
            if i == 0 && fds & 0x80 != 0 {
                owned.push(memfd());
            } else {
                let event = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                let _ = event.write(1);
                // SAFETY: a fresh descriptor taken out of the EventFd, owned once.
                owned.push(unsafe { OwnedFd::from_raw_fd(event.as_raw_fd()) });
                std::mem::forget(event);
            }
        }
        let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        if !chunk.is_empty() && !send(&ours, chunk, &raw) {
            break;
        }
    }
    let _ = ours.shutdown(std::net::Shutdown::Write);
    // Errors are allowed (a refused message ends the connection); panics are not.
    let _ = serve_stream(theirs, backend);
});
