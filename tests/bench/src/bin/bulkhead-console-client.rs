//! `bulkhead-console-client SOCKET [--send TEXT] [--after MARK] [--until MARK] [--bytes N]
//! [--rate BYTES_PER_S] [--timeout S]`: a client of a `--console socket=` console, for the
//! nested scenarios (L1's busybox has no Unix-socket client). Connects, sends TEXT (with `\n`
//! for a newline, here and in the marks), then copies what the console sends to stdout: from after the first MARK of
//! `--after` (default: from the start), until `--until` MARK was seen or N bytes were copied,
//! reading at most BYTES_PER_S a second (a slow reader) and for at most S seconds (default 60:
//! then exit 1). A test tool: never shipped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    socket: String,
    #[arg(long)]
    send: Option<String>,
    #[arg(long)]
    after: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    bytes: Option<usize>,
    #[arg(long)]
    rate: Option<usize>,
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    // `\n` in TEXT and the marks is a newline.
    let unescape = |s: &mut Option<String>| {
        if let Some(t) = s.as_mut() {
            *t = t.replace("\\n", "\n");
        }
    };
    unescape(&mut args.send);
    unescape(&mut args.after);
    unescape(&mut args.until);
    let mut s = UnixStream::connect(&args.socket).with_context(|| args.socket.clone())?;
    if let Some(text) = &args.send {
        s.write_all(text.as_bytes())?;
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut pending = Vec::new();
    let mut started = args.after.is_none();
    let mut copied = 0usize;
    let mut out = std::io::stdout().lock();
    let chunk = args.rate.map_or(65536, |r| (r / 10).clamp(1, 65536));
    let mut buf = vec![0u8; chunk];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if args.bytes.is_some_and(|n| copied >= n) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {copied} bytes");
        }
        s.set_read_timeout(Some(left))?;
        let want = args.bytes.map_or(chunk, |n| chunk.min(n - copied).max(1));
        let n = s.read(&mut buf[..want]).context("read")?;
        if n == 0 {
            bail!("the console closed the connection after {copied} bytes");
        }
        let mut data = &buf[..n];
        if !started {
            pending.extend_from_slice(data);
            let mark = args.after.as_deref().unwrap_or("").as_bytes();
            let Some(at) = find(&pending, mark) else {
                continue;
            };
            started = true;
            let rest = pending.split_off(at + mark.len());
            pending = rest;
            data = &pending;
        }
        let take = args
            .bytes
            .map_or(data.len(), |b| data.len().min(b - copied));
        out.write_all(&data[..take])?;
        copied += take;
        if let Some(mark) = &args.until {
            tail.extend_from_slice(&data[..take]);
            if find(&tail, mark.as_bytes()).is_some() {
                break;
            }
            let keep = tail.len().saturating_sub(mark.len());
            tail.drain(..keep);
        }
        pending.clear();
        if args.rate.is_some() {
            // At most `rate` bytes a second: a chunk each tenth of a second.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    out.flush()?;
    Ok(())
}
