#![allow(dead_code)]
//! For tests and fuzzing: a vhost-user backend that speaks raw messages on a socket pair, honest or
//! malicious as a test scripts it (wrong reply type or size, huge counts, stray descriptors,
//! no reply at all), to drive the VMM's frontend, worker and transport.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Frontend;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_BASE: u32 = 10;
pub const SET_VRING_KICK: u32 = 12;
pub const GET_VRING_BASE: u32 = 11;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const GET_QUEUE_NUM: u32 = 17;
pub const GET_CONFIG: u32 = 24;
pub const RESET_DEVICE: u32 = 34;

const REPLY: u32 = 0x4 | 0x1;
/// VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES.
pub const FEATURES: u64 = (1 << 32) | (1 << 30);
/// MQ | CONFIG | RESET_DEVICE.
pub const PROTOCOL: u64 = 1 | (1 << 9) | (1 << 13);

/// A message the fake received.
#[derive(Clone, Debug)]
pub struct Msg {
    pub code: u32,
    pub body: Vec<u8>,
}

/// What the fake does about a message.
pub enum Action {
    /// Sends these bytes (a whole message, header included), with these descriptors.
    Send(Vec<u8>, Vec<OwnedFd>),
    /// Says nothing.
    Nothing,
}

/// A reply message: header (code, REPLY flags, size) and body.
pub fn reply(code: u32, body: &[u8]) -> Action {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&REPLY.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    Action::Send(m, Vec::new())
}

/// What an honest backend with `config` as configuration space and `queues` queues answers.
pub fn honest(config: &[u8], queues: u64, m: &Msg) -> Action {
    match m.code {
        GET_FEATURES => reply(m.code, &FEATURES.to_le_bytes()),
        GET_PROTOCOL_FEATURES => reply(m.code, &PROTOCOL.to_le_bytes()),
        GET_QUEUE_NUM => reply(m.code, &queues.to_le_bytes()),
        GET_CONFIG if m.body.len() >= 12 => {
            let offset = u32::from_le_bytes(m.body[0..4].try_into().expect("4")) as usize;
            let size = u32::from_le_bytes(m.body[4..8].try_into().expect("4")) as usize;
            let mut b = m.body[..12].to_vec();
            b.extend((offset..offset + size).map(|i| config.get(i).copied().unwrap_or(0)));
            reply(m.code, &b)
        }
        GET_VRING_BASE => reply(m.code, &m.body[..8.min(m.body.len())]),
        _ => Action::Nothing,
    }
}

/// The fake backend: the VMM's `Frontend` and the messages seen so far.
pub struct Fake {
    pub frontend: Option<Frontend>,
    pub seen: Arc<Mutex<Vec<Msg>>>,
}

impl Fake {
    /// Starts a fake that answers each message with `script`.
    pub fn start(script: impl FnMut(&Msg) -> Action + Send + 'static) -> Self {
        let (mut fake, ours) = Self::start_on_stream(script);
        fake.frontend = Some(Frontend::from_stream(ours, 8));
        fake
    }

    /// As [`Fake::start`], returning the VMM's end of the stream instead of a `Frontend` (a
    /// restarted process's connection).
    pub fn start_on_stream(
        script: impl FnMut(&Msg) -> Action + Send + 'static,
    ) -> (Self, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut script = script;
        bulkhead_sandbox::thread_builder()
            .spawn(move || loop {
                let mut hdr = [0u8; 12];
                if theirs.read_exact(&mut hdr).is_err() {
                    return;
                }
                let code = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
                let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4")) as usize;
                let mut body = vec![0u8; size.min(1 << 20)];
                if theirs.read_exact(&mut body).is_err() {
                    return;
                }
                let m = Msg { code, body };
                log.lock().expect("log").push(m.clone());
                match script(&m) {
                    Action::Send(bytes, fds) => {
                        if send_with_fds(&theirs, &bytes, &fds).is_err() {
                            return;
                        }
                    }
                    Action::Nothing => {}
                }
                let _ = theirs.flush();
            })
            .expect("the fake backend's thread");
        (
            Self {
                frontend: None,
                seen,
            },
            ours,
        )
    }

    /// The codes of the messages seen so far.
    pub fn codes(&self) -> Vec<u32> {
        self.seen
            .lock()
            .expect("log")
            .iter()
            .map(|m| m.code)
            .collect()
    }

    /// The messages with `code` seen so far.
    pub fn messages(&self, code: u32) -> Vec<Msg> {
        self.seen
            .lock()
            .expect("log")
            .iter()
            .filter(|m| m.code == code)
            .cloned()
            .collect()
    }

    /// Waits up to 5 s for a message with `code`.
    pub fn wait_for(&self, code: u32) -> bool {
        for _ in 0..500 {
            if self.codes().contains(&code) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let space =
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) } as usize;
    let mut cbuf = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with `raw` after it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: `msg` describes valid buffers.
    if unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A memfd of `len` bytes, unsealed.
pub fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a static name; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"fake".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned and is owned by nothing else.
    let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    unsafe { libc::ftruncate(f.as_raw_fd(), len as libc::off_t) };
    f
}
