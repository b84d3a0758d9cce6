//! The VMM's end of a device process's control channel (descriptor 4 in the device): a
//! connected `SOCK_SEQPACKET` unix socket, one request per message (`COMMAND [ARGS]`, UTF-8, at
//! most 4096 bytes), one reply per request (`ok [PAYLOAD]` or `err REASON`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Longest request or reply.
pub const MAX_MESSAGE: usize = 4096;
/// How long a request may take, sent and answered, before it fails.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// Errors of a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is longer than [`MAX_MESSAGE`] bytes.
    #[error("control request of {0} bytes (at most {MAX_MESSAGE})")]
    TooLong(usize),
    /// Sending the request failed (or timed out).
    #[error("sending the control request")]
    Send(#[source] std::io::Error),
    /// No reply within the deadline, or the socket failed.
    #[error("waiting for the control reply")]
    Receive(#[source] std::io::Error),
    /// The device hung up.
    #[error("the device closed its control channel")]
    HungUp,
    /// The reply is neither `ok ...` nor `err ...`.
    #[error("malformed control reply {0:?}")]
    Malformed(String),
    /// The device answered `err REASON`.
    #[error("the device refused: {0}")]
    Refused(String),
}

/// The VMM's end of one device's control channel.
#[derive(Debug)]
pub struct ControlChannel {
    socket: UnixDatagram,
    /// One request at a time: replies come in order, so two requesters (the API, the device
    /// monitor's liveness probe) must not interleave.
    turn: std::sync::Mutex<()>,
}

impl ControlChannel {
    /// Wraps the VMM's end of the socket pair; requests time out after `deadline`.
    pub fn new(socket: OwnedFd, deadline: Duration) -> std::io::Result<Self> {
        // A SOCK_SEQPACKET socket: send and recv keep message boundaries, as on a datagram
        // socket, and UnixDatagram's calls are the ones it needs.
        let socket = UnixDatagram::from(socket);
        socket.set_read_timeout(Some(deadline))?;
        socket.set_write_timeout(Some(deadline))?;
        Ok(Self {
            socket,
            turn: std::sync::Mutex::new(()),
        })
    }

    /// Sends `request` and returns the payload of its `ok` reply.
    pub fn request(&self, request: &str) -> Result<String, ControlError> {
        if request.len() > MAX_MESSAGE {
            return Err(ControlError::TooLong(request.len()));
        }
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // A reply that came after its request's deadline is still queued: dropped here, so
        // that it is not taken for this request's.
        let mut stale = [0u8; 64];
        // SAFETY: a non-blocking recv into a local buffer, on our socket.
        while unsafe {
            libc::recv(
                self.socket.as_raw_fd(),
                stale.as_mut_ptr().cast(),
                stale.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
        self.socket
            .send(request.as_bytes())
            .map_err(ControlError::Send)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = self.socket.recv(&mut buf).map_err(ControlError::Receive)?;
        if n == 0 {
            return Err(ControlError::HungUp);
        }
        parse_reply(&buf[..n])
    }
}

fn parse_reply(reply: &[u8]) -> Result<String, ControlError> {
    let text = String::from_utf8_lossy(reply);
    if text == "ok" {
        return Ok(String::new());
    }
    if let Some(payload) = text.strip_prefix("ok ") {
        return Ok(payload.to_string());
    }
    if let Some(reason) = text.strip_prefix("err ") {
        return Err(ControlError::Refused(reason.to_string()));
    }
    Err(ControlError::Malformed(text.chars().take(80).collect()))
}

/// A connected `SOCK_SEQPACKET` socket pair, close-on-exec.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the local array; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_control_request_ok_err_and_timeout() {
        let (ours, theirs) = seqpacket_pair().expect("pair");
        let chan = ControlChannel::new(ours, Duration::from_millis(200)).expect("chan");
        let dev = UnixDatagram::from(theirs);
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_MESSAGE];
            let n = dev.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], b"ping");
            dev.send(b"ok pong").expect("send");
            let n = dev.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], b"frob");
            dev.send(b"err unknown command").expect("send");
            // The third request gets no answer.
            let _ = dev.recv(&mut buf);
            std::thread::sleep(Duration::from_millis(400));
        });
        assert_eq!(chan.request("ping").expect("ping"), "pong");
        assert!(matches!(
            chan.request("frob"),
            Err(ControlError::Refused(r)) if r == "unknown command"
        ));
        assert!(matches!(
            chan.request("stats"),
            Err(ControlError::Receive(_))
        ));
        assert!(matches!(
            chan.request(&"x".repeat(MAX_MESSAGE + 1)),
            Err(ControlError::TooLong(_))
        ));
        t.join().expect("peer");
    }

    #[test]
    fn test_control_parse_reply_forms() {
        assert_eq!(parse_reply(b"ok").expect("ok"), "");
        assert_eq!(parse_reply(b"ok a=1 b=2").expect("ok"), "a=1 b=2");
        assert!(matches!(
            parse_reply(b"okay"),
            Err(ControlError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply(b"err no"),
            Err(ControlError::Refused(_))
        ));
    }
}
