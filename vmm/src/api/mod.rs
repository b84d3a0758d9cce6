//! The REST API (docs/api.md): HTTP/1.1 over a Unix socket, Cloud Hypervisor's endpoint and
//! field names. [`WORKERS`] threads, started before the main thread's seccomp filter and each
//! under the `api` filter, accept connections on the one listening socket, so at most that many
//! clients are served at once (the rest wait in the listen backlog). A request is read within
//! the bounds of [`http`], routed by [`routes`], and, when the VM must answer it, sent to the
//! VM's main loop as [`Event::Control`] with a reply channel; the worker waits a bounded time
//! for the answer (504 past it, 503 when the VM is gone).

pub mod http;
pub mod routes;
pub mod vm_config;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::config::ApiSocket;
use crate::vcpu::Event;
use http::{HttpResponse, ReadError};
use routes::Action;

/// Connections served at once: one per worker thread.
pub const WORKERS: usize = 4;

/// Requests read and not yet answered, for [`wait_answered`].
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Errors setting up the API socket; all are the user's to fix (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process serves that path.
    #[error("--api-socket {0:?}: another process is listening there")]
    InUse(PathBuf),
    /// Something else than a socket is at the path.
    #[error("--api-socket {0:?}: exists and is not a socket (not removing it)")]
    NotSocket(PathBuf),
    /// The socket could not be created.
    #[error("--api-socket {0:?}: cannot create the socket")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The inherited descriptor is not a listening Unix stream socket.
    #[error("--api-socket fd={0}: {1}")]
    BadFd(RawFd, String),
    /// A worker thread could not be started.
    #[error("starting the API threads")]
    Thread(#[source] std::io::Error),
}

/// The API's listening socket, before the workers start.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    /// Where it was bound (`--api-socket PATH`); none when inherited.
    path: Option<PathBuf>,
}

impl Listener {
    /// Creates the socket at a path (mode 0600, owned by the VMM's user), replacing a stale
    /// socket nobody listens on, or takes an inherited listening socket.
    pub fn open(config: &ApiSocket) -> Result<Self, ApiError> {
        match config {
            ApiSocket::Path(path) => Self::bind(path),
            ApiSocket::Fd(fd) => Self::inherit(*fd),
        }
    }

    fn bind(path: &Path) -> Result<Self, ApiError> {
        let bind_err = |e| ApiError::Bind(path.to_path_buf(), e);
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ApiError::NotSocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    info!("removing the stale API socket {}", path.display());
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                Err(e) => return Err(bind_err(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        // Mode 0600 from the start: no moment where another user could connect. The umask is
        // the process's; this runs while the VMM has a single thread.
        // SAFETY: umask only sets the file mode creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let socket = bound.map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Self {
            socket,
            path: Some(path.to_path_buf()),
        })
    }

    fn inherit(fd: RawFd) -> Result<Self, ApiError> {
        let bad = |m: String| ApiError::BadFd(fd, m);
        let int_opt = |opt| -> Result<libc::c_int, ApiError> {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(bad(format!(
                    "not a socket ({})",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(v)
        };
        if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX
            || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM
        {
            return Err(bad("not a Unix stream socket".into()));
        }
        if int_opt(libc::SO_ACCEPTCONN)? == 0 {
            return Err(bad(
                "the socket is not listening (call listen() on it first)".into(),
            ));
        }
        // SAFETY: fd is an open socket (getsockopt succeeded) that the caller handed to this
        // process for the API; nothing else in the VMM uses it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not inherited by anything the VMM starts.
        // SAFETY: F_SETFD on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Self {
            socket: UnixListener::from(owned),
            path: None,
        })
    }

    /// Where the socket is, for messages.
    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "an inherited socket".into(),
        }
    }

    /// A listener on a socket made elsewhere (tests).
    pub fn from_listener(socket: UnixListener) -> Self {
        Self { socket, path: None }
    }
}

/// Starts the worker threads; each installs the `api` seccomp filter first. Requests the VM
/// must answer go to `events`.
pub fn start(listener: Listener, events: Sender<Event>) -> Result<(), ApiError> {
    info!("API listening on {}", listener.describe());
    let socket = Arc::new(listener.socket);
    for i in 0..WORKERS {
        let socket = socket.clone();
        let events = events.clone();
        bulkhead_sandbox::thread_builder()
            .name(format!("api{i}"))
            .spawn(move || {
                if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::Api) {
                    return;
                }
                worker(&socket, &events);
            })
            .map_err(ApiError::Thread)?;
    }
    Ok(())
}

fn worker(socket: &UnixListener, events: &Sender<Event>) {
    loop {
        match socket.accept() {
            Ok((conn, _)) => serve(conn, events),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and the like: do not spin.
                warn!("API: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one connection: requests in order until the client closes, asks to close, stalls
/// or sends something bad.
pub fn serve(mut conn: UnixStream, events: &Sender<Event>) {
    if conn.set_write_timeout(Some(http::WRITE_TIMEOUT)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        let request = match http::read_request(&mut conn, &mut buf) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Respond(response)) => {
                info!(
                    "API: bad request: {}",
                    response.body.as_deref().unwrap_or("")
                );
                if std::io::Write::write_all(&mut conn, &http::encode(&response, true)).is_ok() {
                    linger(&mut conn);
                }
                return;
            }
        };
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let response = handle(&request.method, &request.path, &request.body, events);
        info!(
            "API: {} {} -> {}",
            request.method, request.path, response.status
        );
        let written =
            std::io::Write::write_all(&mut conn, &http::encode(&response, !request.keep_alive));
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        if written.is_err() || !request.keep_alive {
            return;
        }
    }
}

/// After an error answer to a request not read in full: ends the writing side and discards
/// what the client still sends (at most [`LINGER_BYTES`], [`LINGER_TIME`]) before closing, so
/// the client reads the answer instead of a reset (closing a Unix socket with unread data
/// makes the peer's next read fail with ECONNRESET).
fn linger(conn: &mut UnixStream) {
    if conn.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let end = Instant::now() + LINGER_TIME;
    let mut left = LINGER_BYTES;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let Some(t) = end
            .checked_duration_since(Instant::now())
            .filter(|t| !t.is_zero())
        else {
            return;
        };
        if conn.set_read_timeout(Some(t)).is_err() {
            return;
        }
        match std::io::Read::read(conn, &mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// What [`linger`] discards at most.
const LINGER_BYTES: usize = 1 << 20;
/// How long [`linger`] waits at most.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Answers one request, asking the VM when it must.
pub fn handle(method: &str, path: &str, body: &[u8], events: &Sender<Event>) -> HttpResponse {
    let (request, timeout) = match routes::route(method, path, body) {
        Action::Respond(r) => return r,
        Action::Control { request, timeout } => (request, timeout),
    };
    debug!("API: asking the VM: {request:?}");
    let (tx, rx) = channel();
    if events.send(Event::Control(request, tx)).is_err() {
        return HttpResponse::error(503, "the VM is not running");
    }
    match rx.recv_timeout(timeout) {
        Ok(reply) => routes::reply_response(reply),
        Err(RecvTimeoutError::Timeout) => HttpResponse::error(
            504,
            format!(
                "the VM did not answer within {} s (busy or stuck); the request may still take effect",
                timeout.as_secs()
            ),
        ),
        Err(RecvTimeoutError::Disconnected) => {
            HttpResponse::error(503, "the VM ended before answering")
        }
    }
}

/// Waits (at most `timeout`) until every request read has been answered: called on the way
/// out, so that the answer to `vm.shutdown` reaches its client before the VMM exits.
pub fn wait_answered(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A connection over bytes in memory, for the fuzz target: reads `input`, keeps what is
/// written; its timeouts are no-ops.
struct MemoryConnection<'a> {
    input: &'a [u8],
}

impl std::io::Read for MemoryConnection<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // Small reads, so that requests arrive in pieces.
        let n = out.len().min(self.input.len()).min(61);
        out[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl std::io::Write for MemoryConnection<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl http::Connection for MemoryConnection<'_> {
    fn set_timeout(&mut self, _: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fuzz target `api_requests` (vmm/fuzz): the first byte picks what the rest is. Even: a
/// byte stream on a connection, read as requests (framing, limits) and each routed. Odd: a
/// JSON body for the endpoint the byte names (add-disk, add-net, remove-device, create: 1, 3,
/// 5, 7, then again). Nothing may panic; every answer must be a valid status.
pub fn fuzz_requests(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let check = |a: Action| match a {
        Action::Respond(r) => assert!((200..600).contains(&r.status)),
        Action::Control { timeout, .. } => assert!(timeout <= routes::PLUG_TIMEOUT),
    };
    if selector % 2 == 1 {
        let endpoint = ["vm.add-disk", "vm.add-net", "vm.remove-device", "vm.create"]
            [usize::from(selector / 2) % 4];
        check(routes::route(
            "PUT",
            &format!("{}{endpoint}", routes::ROOT),
            rest,
        ));
        return;
    }
    let mut conn = MemoryConnection { input: rest };
    let mut buf = Vec::new();
    while let Ok(req) = http::read_request(&mut conn, &mut buf) {
        assert!(req.body.len() <= http::MAX_BODY);
        check(routes::route(&req.method, &req.path, &req.body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Reply, Request, RequestError};
    use std::io::{Read, Write};

    /// A fake VM loop: answers Info with a document, Reboot never (a stuck VM), everything
    /// else 409; ends after `n` requests.
    fn fake_vm(n: usize) -> (Sender<Event>, std::thread::JoinHandle<Vec<String>>) {
        let (tx, rx) = channel::<Event>();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..n {
                let Ok(Event::Control(req, reply)) = rx.recv() else {
                    break;
                };
                seen.push(format!("{req:?}"));
                match req {
                    Request::Info => {
                        drop(reply.send(Ok(Reply::Info("{\"state\":\"Running\"}".into()))))
                    }
                    Request::Reboot => {
                        // Stuck past the API's bound, then gone.
                        std::thread::sleep(routes::REPLY_TIMEOUT + Duration::from_millis(500));
                        drop(reply);
                    }
                    Request::Shutdown => drop(reply.send(Ok(Reply::Done))),
                    _ => drop(reply.send(Err(RequestError::new(409, "busy")))),
                }
            }
            seen
        });
        (tx, h)
    }

    fn exchange(conn: &mut UnixStream, raw: &[u8]) -> String {
        conn.write_all(raw).expect("write");
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read one response: the head, then Content-Length bytes.
        loop {
            let n = conn.read(&mut chunk).expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&chunk[..n]);
            let s = String::from_utf8_lossy(&out).to_string();
            if let Some(end) = s.find("\r\n\r\n") {
                let len = s
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().expect("length"));
                if out.len() >= end + 4 + len {
                    return s;
                }
            }
        }
    }

    /// Through a real Unix socket: a kept-alive connection with several requests, a bad one
    /// that closes it, and the VM loop seeing only the valid requests.
    #[test]
    fn test_api_over_unix_socket_against_fake_vm() {
        let dir = std::env::temp_dir().join(format!("bulkhead-api-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let listener = Listener::open(&ApiSocket::Path(path.clone())).expect("bind");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second VMM on the same path is refused while this one listens.
        assert!(matches!(
            Listener::open(&ApiSocket::Path(path.clone())),
            Err(ApiError::InUse(_))
        ));
        let (events, vm) = fake_vm(3);
        start(listener, events).expect("start");

        let mut c = UnixStream::connect(&path).expect("connect");
        let r = exchange(
            &mut c,
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("\"pid\":"), "{r}");
        let r = exchange(&mut c, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(r.ends_with("{\"state\":\"Running\"}"), "{r}");
        let r = exchange(&mut c, b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = exchange(&mut c, b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = exchange(
            &mut c,
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}",
        );
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("bad JSON body"), "{r}");
        let r = exchange(
            &mut c,
            b"PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"id\":\"d0\"}",
        );
        assert!(r.starts_with("HTTP/1.1 409"), "{r}");
        assert!(r.ends_with("[\"busy\"]"), "{r}");
        // Malformed HTTP: answered, and the connection closed.
        let r = exchange(&mut c, b"NONSENSE\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("Connection: close"), "{r}");
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).expect("eof"), 0);

        // Oversized body: 413 before reading it.
        let mut c = UnixStream::connect(&path).expect("connect");
        let r = exchange(
            &mut c,
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        // ... also when the client sent the body with the head: it reads the answer, not a
        // reset.
        let mut c = UnixStream::connect(&path).expect("connect");
        let mut big =
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec();
        big.resize(big.len() + 100_000, b' ');
        c.write_all(&big).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut all = Vec::new();
        c.read_to_end(&mut all)
            .expect("the answer, then EOF (no ECONNRESET)");
        let r = String::from_utf8_lossy(&all);
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");

        // A VM that does not answer: 504 after the bound, from another connection.
        let mut c = UnixStream::connect(&path).expect("connect");
        let t = Instant::now();
        let r = exchange(&mut c, b"PUT /api/v1/vm.reboot HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 504"), "{r}");
        assert!(t.elapsed() >= routes::REPLY_TIMEOUT, "{:?}", t.elapsed());
        assert_eq!(
            vm.join().expect("vm"),
            ["Info", "Unplug { id: \"d0\" }", "Reboot"]
        );
        // The VM loop ended: 503.
        let r = exchange(&mut c, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A worker's whole path under the real `api` filter, in a forked child (a syscall outside
    /// the filter kills it with SIGSYS): accept, a client that connects and leaves (as a
    /// second VMM probing the socket does), then a kept-alive connection with a ping, a bad
    /// request, a request the VM does not answer (504 after the bound), and an oversized body
    /// (413 and the lingering close).
    #[test]
    fn test_api_worker_under_its_seccomp_filter() {
        use bulkhead_sandbox::seccomp::{apply_thread, enforcement, Enforcement};
        let prog = crate::seccomp::compile(
            crate::seccomp::ThreadKind::Api,
            crate::seccomp::native_arch(),
        )
        .expect("compile");
        if enforcement(&prog) != Enforcement::Enforced {
            println!("seccomp filters are not enforced here; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bulkhead-api-test3-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // Everything the client sends is queued before the filter; the child then serves it.
        let probe = UnixStream::connect(&path).expect("connect");
        drop(probe);
        let mut client = UnixStream::connect(&path).expect("connect");
        let mut req = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/nope HTTP/1.1\r\n\r\n\
            GET /api/v1/vm.info HTTP/1.1\r\n\r\n\
            PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
            .to_vec();
        req.resize(req.len() + 100_000, b' ');
        let (events, _rx) = channel::<Event>();
        // SAFETY: the child only serves sockets it already has and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = match apply_thread(&prog) {
                Err(_) => 125,
                Ok(()) => {
                    for _ in 0..2 {
                        match listener.accept() {
                            Ok((conn, _)) => serve(conn, &events),
                            Err(_) => {
                                // SAFETY: _exit ends the child at once.
                                unsafe { libc::_exit(3) }
                            }
                        }
                    }
                    0
                }
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) }
        }
        drop(listener);
        // Written from here: the child reads as it serves.
        let writer = {
            let mut c = client.try_clone().expect("clone");
            std::thread::spawn(move || {
                let _ = c.write_all(&req);
                let _ = c.shutdown(std::net::Shutdown::Write);
            })
        };
        let mut all = Vec::new();
        let _ = client.read_to_end(&mut all);
        let _ = writer.join();
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let text = String::from_utf8_lossy(&all);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the worker died under its filter: status {status:#x} (signal {}); it answered: {text}",
            libc::WTERMSIG(status)
        );
        let codes: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &text[i + 9..i + 12])
            .collect();
        assert_eq!(codes, ["200", "404", "504", "413"], "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_api_fuzz_entry_on_its_seeds() {
        let seeds =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/api_requests");
        let mut n = 0;
        for e in std::fs::read_dir(seeds).expect("seed corpus") {
            fuzz_requests(&std::fs::read(e.expect("entry").path()).expect("seed"));
            n += 1;
        }
        assert!(n >= 4, "{n} seeds");
    }

    #[test]
    fn test_api_listener_refuses_non_socket_and_bad_fd() {
        let dir = std::env::temp_dir().join(format!("bulkhead-api-test2-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("plain");
        std::fs::write(&file, b"keep me").expect("write");
        assert!(matches!(
            Listener::open(&ApiSocket::Path(file.clone())),
            Err(ApiError::NotSocket(_))
        ));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
        // A stale socket (nobody listening) is replaced.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        Listener::open(&ApiSocket::Path(stale)).expect("stale socket replaced");
        // An inherited descriptor that is a file, or a socket not listening.
        let f = std::fs::File::open(&file).expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert!(matches!(
            Listener::open(&ApiSocket::Fd(fd)),
            Err(ApiError::BadFd(..))
        ));
        let (a, _b) = UnixStream::pair().expect("pair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        assert!(matches!(
            Listener::open(&ApiSocket::Fd(fd)),
            Err(ApiError::BadFd(..))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
