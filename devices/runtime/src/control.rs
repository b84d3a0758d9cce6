//! The control channel: a connected `SOCK_SEQPACKET` socket from the VMM, beside the
//! vhost-user socket. One request per message, UTF-8 text of at most [`MAX_MESSAGE`] bytes,
//! `COMMAND [ARGS]`; one reply per request, `ok [PAYLOAD]` or `err REASON`.
//!
//! The runtime answers `ping`, `stats` and `fault FAULT` (fault injection, crate::fault:
//! `crash`, `seccomp`, `crash_after=N`); every other command goes to the device's
//! [`ControlHandler`]. The channel is served by its own thread, which ends when the VMM hangs
//! up; the device keeps serving its frontend.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use log::{debug, warn};

/// The largest request or reply, in bytes.
pub const MAX_MESSAGE: usize = 4096;

/// What a device answers on its control channel.
pub trait ControlHandler: Send + Sync {
    /// What the device served so far, as `key=value` pairs separated by spaces.
    fn stats(&self) -> String;

    /// A device-specific command: `Some(Ok(payload))`, `Some(Err(reason))`, or `None` when the
    /// device has no such command.
    fn command(&self, name: &str, args: &str) -> Option<Result<String, String>> {
        let _ = (name, args);
        None
    }
}

/// The reply to one request (without the size bound, which [`bounded`] applies).
pub fn reply(handler: &dyn ControlHandler, request: &[u8]) -> String {
    if request.len() > MAX_MESSAGE {
        return "err message too long".into();
    }
    let Ok(text) = std::str::from_utf8(request) else {
        return "err not UTF-8".into();
    };
    let text = text.trim_end_matches(['\n', '\0']);
    let (name, args) = text.split_once(' ').unwrap_or((text, ""));
    let answer = match name {
        "" => Err("empty request".to_string()),
        "ping" => Ok("pong".to_string()),
        "stats" => Ok(handler.stats()),
        "fault" => crate::fault::inject(args),
        _ => handler
            .command(name, args)
            .unwrap_or_else(|| Err("unknown command".to_string())),
    };
    match answer {
        Ok(payload) if payload.is_empty() => "ok".into(),
        Ok(payload) => format!("ok {payload}"),
        Err(reason) => format!("err {reason}"),
    }
}

/// Cuts a reply to [`MAX_MESSAGE`] bytes at a character boundary.
fn bounded(mut reply: String) -> String {
    if reply.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !reply.is_char_boundary(end) {
            end -= 1;
        }
        reply.truncate(end);
    }
    reply
}

/// Serves requests on `socket` until the peer hangs up or the socket fails.
pub fn serve_control(socket: OwnedFd, handler: Arc<dyn ControlHandler>) {
    // One byte more than the limit, so an oversized request is seen as such (the kernel
    // discards the rest of a SEQPACKET message that does not fit).
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        // SAFETY: read into `buf`, which is valid for `buf.len()` bytes; `socket` is open.
        let n = unsafe { libc::read(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => {
                debug!("control channel: peer hung up");
                return;
            }
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("control channel: cannot read: {e}");
                return;
            }
        };
        let answer = bounded(reply(handler.as_ref(), buf.get(..n).unwrap_or_default()));
        // SAFETY: write from `answer`, valid for its length; `socket` is open. Rust programs
        // ignore SIGPIPE, so a vanished peer gives EPIPE.
        let written =
            unsafe { libc::write(socket.as_raw_fd(), answer.as_ptr().cast(), answer.len()) };
        // `fault crash`: SIGABRT, as a crash of the device would be (the VMM restarts it).
        crate::fault::after_reply();
        if written < 0 {
            warn!(
                "control channel: cannot reply: {}",
                io::Error::last_os_error()
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ask, seqpacket_pair};

    struct Fake;

    impl ControlHandler for Fake {
        fn stats(&self) -> String {
            "reads=1 writes=2".into()
        }

        fn command(&self, name: &str, args: &str) -> Option<Result<String, String>> {
            match name {
                "echo" => Some(Ok(args.to_string())),
                "fail" => Some(Err("as asked".into())),
                "big" => Some(Ok("é".repeat(MAX_MESSAGE))),
                _ => None,
            }
        }
    }

    #[test]
    fn test_reply_builtin_and_device_commands() {
        assert_eq!(reply(&Fake, b"ping"), "ok pong");
        assert_eq!(reply(&Fake, b"stats"), "ok reads=1 writes=2");
        assert_eq!(reply(&Fake, b"echo a b"), "ok a b");
        assert_eq!(reply(&Fake, b"echo"), "ok");
        assert_eq!(reply(&Fake, b"fail"), "err as asked");
        assert_eq!(reply(&Fake, b"balloon 5"), "err unknown command");
        assert!(reply(&Fake, b"fault melt").starts_with("err unknown fault"));
        assert_eq!(reply(&Fake, b""), "err empty request");
        assert_eq!(reply(&Fake, b"\xff\xfe"), "err not UTF-8");
        assert_eq!(
            reply(&Fake, &[b'a'; MAX_MESSAGE + 1]),
            "err message too long"
        );
    }

    #[test]
    fn test_serve_control_replies_bounded_and_ends_on_hangup() {
        let (ours, theirs) = seqpacket_pair();
        let thread = std::thread::spawn(move || serve_control(theirs, Arc::new(Fake)));
        assert_eq!(ask(&ours, b"ping"), "ok pong");
        assert_eq!(ask(&ours, b"nope"), "err unknown command");
        assert_eq!(
            ask(&ours, &vec![b'x'; 3 * MAX_MESSAGE]),
            "err message too long"
        );
        let big = ask(&ours, b"big");
        assert!(big.len() <= MAX_MESSAGE && big.starts_with("ok é"));
        assert_eq!(ask(&ours, b"stats"), "ok reads=1 writes=2");
        drop(ours);
        thread.join().expect("control thread ends on hang-up");
    }
}
