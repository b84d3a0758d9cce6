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
use bulkhead_device_runtime::testing::{memfd, send_with_fds};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const MAX_INPUT: usize = 32 << 10;

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
        rate_limit: Default::default(),
        poll: Default::default(),
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
                owned.push(OwnedFd::from(memfd(1 << 20)));
            } else {
                let event = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                let _ = event.write(1);
                // SAFETY: a fresh descriptor taken out of the EventFd, owned once.
                owned.push(unsafe { OwnedFd::from_raw_fd(event.as_raw_fd()) });
                std::mem::forget(event);
            }
        }
        let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        if !chunk.is_empty() && send_with_fds(&ours, chunk, &raw, libc::MSG_DONTWAIT) <= 0 {
            break;
        }
    }
    let _ = ours.shutdown(std::net::Shutdown::Write);
    // Errors are allowed (a refused message ends the connection); panics are not.
    let _ = serve_stream(theirs, backend);
});
