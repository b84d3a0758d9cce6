//! HTTP/1.1 framing for the API: one request read from a connection within bounds (head size,
//! header count, body size, time), one response written. Parsing is httparse's; this module
//! adds only the limits, Content-Length framing, keep-alive and `Expect: 100-continue`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 32;
/// Largest request body (a disk or NIC configuration is a few hundred bytes).
pub const MAX_BODY: usize = 64 << 10;
/// A request must arrive in full within this time from its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A kept-alive connection may stay idle this long between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A response must be taken by the client within this time.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request as the router sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (Content-Length bytes).
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// A response.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// A JSON body, or none.
    pub body: Option<String>,
}

impl HttpResponse {
    /// A response with a JSON body.
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// An error, in Cloud Hypervisor's shape: a JSON array of messages, the outermost first.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let messages = vec![message.into()];
        Self::json(
            status,
            serde_json::to_string(&messages).unwrap_or_else(|_| "[]".into()),
        )
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The bytes of a response; `close` adds `Connection: close`.
pub fn encode(response: &HttpResponse, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: Bulkhead API\r\n",
        response.status,
        reason(response.status)
    );
    if let Some(body) = &response.body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    } else if response.status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(body) = &response.body {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

/// What the head of a request says.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Content-Length (0 without one).
    pub content_length: usize,
    /// Keep the connection after this request.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// Bytes of the head, the blank line included.
    pub len: usize,
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete (and within
/// [`MAX_HEAD`]), an error response for anything malformed or over a limit.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpResponse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HttpResponse::error(
                    431,
                    format!("the request head is larger than {MAX_HEAD} bytes"),
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpResponse::error(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => {
            return Err(HttpResponse::error(
                400,
                format!("malformed HTTP request: {e}"),
            ))
        }
    };
    if len > MAX_HEAD {
        return Err(HttpResponse::error(
            431,
            format!("the request head is larger than {MAX_HEAD} bytes"),
        ));
    }
    // Complete: every field is present.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpResponse::error(400, "malformed HTTP request line"));
    };
    let mut content_length: Option<usize> = None;
    let mut connection: Option<String> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpResponse::error(400, format!("header {}: not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    HttpResponse::error(400, format!("Content-Length {value:?}: not a number"))
                })?;
            if content_length.is_some_and(|c| c != n) {
                return Err(HttpResponse::error(
                    400,
                    "two different Content-Length headers",
                ));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpResponse::error(
                400,
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection = Some(value.to_ascii_lowercase());
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpResponse::error(
                    400,
                    format!("Expect: {value:?} is not supported"),
                ));
            }
            expect_continue = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(HttpResponse::error(
            413,
            format!("the body is {content_length} bytes, more than the {MAX_BODY} allowed"),
        ));
    }
    let keep_alive = match (version, connection.as_deref()) {
        (_, Some("close")) => false,
        (1, _) => true,
        (_, Some("keep-alive")) => true,
        _ => false,
    };
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Some(Head {
        method: method.to_string(),
        path,
        content_length,
        keep_alive,
        expect_continue,
        len,
    }))
}

/// A connection the server reads requests from, with a settable read timeout.
pub trait Connection: Read + Write {
    /// Sets the timeout of the next reads.
    fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()>;
}

impl Connection for std::os::unix::net::UnixStream {
    fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// Why no request was read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests, or it stayed idle too long.
    Closed,
    /// The request is bad or over a limit: answer this and close.
    Respond(HttpResponse),
}

/// Reads one request from `conn`; `buf` keeps bytes already read past the previous request
/// (pipelining). Bounded in size and time: [`MAX_HEAD`], [`MAX_HEADERS`], [`MAX_BODY`], the
/// whole request within [`REQUEST_TIMEOUT`] of its first byte, and at most [`IDLE_TIMEOUT`]
/// of waiting before it.
pub fn read_request<C: Connection>(
    conn: &mut C,
    buf: &mut Vec<u8>,
) -> Result<HttpRequest, ReadError> {
    let mut started = (!buf.is_empty()).then(Instant::now);
    let head = loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf).map_err(ReadError::Respond)? {
                break head;
            }
        }
        fill(conn, buf, &mut started)?;
    };
    let end = head.len + head.content_length;
    if head.expect_continue && buf.len() < end {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ReadError::Closed)?;
    }
    while buf.len() < end {
        fill(conn, buf, &mut started)?;
    }
    let body = buf[head.len..end].to_vec();
    buf.drain(..end);
    Ok(HttpRequest {
        method: head.method,
        path: head.path,
        body,
        keep_alive: head.keep_alive,
    })
}

fn timed_out() -> ReadError {
    ReadError::Respond(HttpResponse::error(408, "the request came too slowly"))
}

/// Reads more bytes into `buf`, within the request's deadline (from `started`, its first
/// byte), or the idle bound before it starts.
fn fill<C: Connection>(
    conn: &mut C,
    buf: &mut Vec<u8>,
    started: &mut Option<Instant>,
) -> Result<(), ReadError> {
    let timeout = match started {
        None => IDLE_TIMEOUT,
        Some(t) => REQUEST_TIMEOUT
            .checked_sub(t.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?,
    };
    conn.set_timeout(timeout).map_err(|_| ReadError::Closed)?;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) if started.is_none() => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Respond(HttpResponse::error(
                    400,
                    "the connection was closed in the middle of a request",
                )))
            }
            Ok(n) => {
                started.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(if started.is_none() {
                    ReadError::Closed
                } else {
                    timed_out()
                })
            }
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection fed from chunks; an empty chunk is a read timeout.
    struct Fake {
        chunks: std::collections::VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Fake {
        fn new(chunks: &[&[u8]]) -> Self {
            Self {
                chunks: chunks.iter().map(|c| c.to_vec()).collect(),
                written: Vec::new(),
            }
        }
    }

    impl Read for Fake {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            match self.chunks.pop_front() {
                None => Ok(0),
                Some(c) if c.is_empty() => Err(std::io::ErrorKind::WouldBlock.into()),
                Some(mut c) => {
                    let n = c.len().min(out.len());
                    out[..n].copy_from_slice(&c[..n]);
                    if n < c.len() {
                        self.chunks.push_front(c.split_off(n));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Fake {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Connection for Fake {
        fn set_timeout(&mut self, _: Duration) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn status(r: Result<HttpRequest, ReadError>) -> u16 {
        match r {
            Err(ReadError::Respond(resp)) => resp.status,
            other => panic!("expected an error response, got {other:?}"),
        }
    }

    #[test]
    fn test_http_request_in_pieces_then_pipelined() {
        let mut c = Fake::new(&[
            b"PUT /api/v1/vm.add-disk?x=1 HTTP/1.1\r\nHost: x\r\nContent-Le",
            b"ngth: 4\r\n\r\n{}",
            b"{}GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        ]);
        let mut buf = Vec::new();
        let r = read_request(&mut c, &mut buf).expect("request");
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.add-disk");
        assert_eq!(r.body, b"{}{}");
        assert!(r.keep_alive);
        let r = read_request(&mut c, &mut buf).expect("pipelined request");
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vmm.ping")
        );
        assert!(r.body.is_empty());
        assert!(matches!(
            read_request(&mut c, &mut buf),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn test_http_keep_alive_rules() {
        for (req, keep) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
        ] {
            let head = parse_head(req).expect("valid").expect("complete");
            assert_eq!(head.keep_alive, keep, "{}", String::from_utf8_lossy(req));
        }
    }

    #[test]
    fn test_http_expect_continue_answered_before_body() {
        let mut c = Fake::new(&[
            b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"{}",
        ]);
        let r = read_request(&mut c, &mut Vec::new()).expect("request");
        assert_eq!(r.body, b"{}");
        assert_eq!(c.written, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn test_http_bad_input_each_answered() {
        let long_head = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        let many_headers = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..=MAX_HEADERS)
                .map(|i| format!("H{i}: v\r\n"))
                .collect::<String>()
        );
        let big_body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let cases: Vec<(&[u8], u16)> = vec![
            (long_head.as_bytes(), 431),
            (many_headers.as_bytes(), 431),
            (big_body.as_bytes(), 413),
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
        ];
        for (bytes, want) in cases {
            let mut c = Fake::new(&[bytes]);
            let got = status(read_request(&mut c, &mut Vec::new()));
            assert_eq!(
                got,
                want,
                "{}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
            );
        }
    }

    #[test]
    fn test_http_truncated_and_slow_requests() {
        // Closed in the middle of the body.
        let mut c = Fake::new(&[b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"]);
        assert_eq!(status(read_request(&mut c, &mut Vec::new())), 400);
        // A request started and then stalled past its deadline: 408.
        let mut c = Fake::new(&[b"PUT / HTTP/1.1\r\n", b""]);
        assert_eq!(status(read_request(&mut c, &mut Vec::new())), 408);
        // Idle with no request at all: closed quietly.
        let mut c = Fake::new(&[b""]);
        assert!(matches!(
            read_request(&mut c, &mut Vec::new()),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn test_http_encode() {
        let r = encode(&HttpResponse::error(404, "no"), false);
        let s = String::from_utf8(r).expect("utf8");
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"), "{s}");
        assert!(s.contains("Content-Length: 6\r\n"), "{s}");
        assert!(s.ends_with("\r\n\r\n[\"no\"]"), "{s}");
        let s = String::from_utf8(encode(&HttpResponse::no_content(), true)).expect("utf8");
        assert!(!s.contains("Content-Length"), "{s}");
        assert!(s.contains("Connection: close\r\n"), "{s}");
    }
}
