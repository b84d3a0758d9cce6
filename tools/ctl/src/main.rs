//! `bulkhead-ctl`: talks to a running `bulkhead --api-socket PATH` (docs/api.md), in the shape
//! of Cloud Hypervisor's `ch-remote`. `add-disk` and `add-net` take the option strings of the
//! VMM's `--disk` and `--net`, sent as Cloud Hypervisor's `DiskConfig` / `NetConfig` JSON.
//!
//! Exit status: 0 when the VMM answered 2xx, 1 when it answered an error (its messages on
//! stderr) or could not be reached, 2 for bad usage (nothing was sent).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};

/// Longest the client waits for an answer: the API's own bounds (30 s for a plug) and margin.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(40);

/// Client of Bulkhead's REST API.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-ctl", version, about)]
struct Cli {
    /// The VMM's API socket: PATH or path=PATH.
    #[arg(long, value_name = "PATH")]
    api_socket: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Is the VMM there (vmm.ping).
    Ping,
    /// Describe the VM to a VMM started without --kernel (vm.create), as ch-remote's
    /// `create`: a file holding Cloud Hypervisor's VmConfig JSON ('-': standard input).
    Create {
        /// The VmConfig JSON file.
        config_json_file: String,
    },
    /// Boot the VM vm.create described (vm.boot).
    Boot,
    /// The VM's configuration, state and devices (vm.info).
    Info,
    /// Add a disk (vm.add-disk): the options of --disk.
    AddDisk {
        /// path=IMG[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=ID][,serial=S]
        /// or socket=PATH; rate limits bw_size, bw_one_time_burst, bw_refill_time, ops_*.
        options: String,
    },
    /// Add a network interface (vm.add-net): the options of --net.
    AddNet {
        /// tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,mtu=N][,num_queues=N][,queue_size=N][,id=ID]
        /// or socket=PATH; rate limits bw_*, ops_*.
        options: String,
    },
    /// Remove a device by id (vm.remove-device).
    RemoveDevice {
        /// The device's id (vm.info lists them).
        id: String,
    },
    /// Inject a fault into a device's process (vm.inject-fault, docs/fault-injection.md).
    InjectFault {
        /// The device's id (vm.info lists them).
        id: String,
        /// crash, seccomp, hang, oom, clear, crash_after=N, eio=N, eio=FIRST-LAST (sectors),
        /// delay_ms=N.
        fault: String,
    },
    /// Set the virtio console's size (vm.resize-console); the guest's hvc0 follows.
    ResizeConsole {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Reset the guest in place (vm.reboot).
    Reboot,
    /// Stop the guest; the VMM exits (vm.shutdown).
    Shutdown,
    /// Stop the guest and the VMM (vmm.shutdown).
    ShutdownVmm,
    /// Pause the vCPUs (vm.pause).
    Pause,
    /// Resume them (vm.resume).
    Resume,
    /// Press the power button (vm.power-button).
    PowerButton,
    /// Per-device counters (vm.counters).
    Counters,
    /// Set the balloon's target (vm.resize with desired_balloon), as ch-remote's `resize
    /// --balloon`.
    Resize {
        /// How much of guest RAM the guest gives back: 512M, 1G, ... or bytes.
        #[arg(long, value_name = "SIZE")]
        balloon: String,
    },
    /// The balloon's target and actual size and the guest's memory statistics
    /// (vm.balloon-statistics, Firecracker's fields).
    BalloonStatistics,
    /// Send a request as given, to test the API: METHOD ENDPOINT [BODY]; ENDPOINT is under
    /// /api/v1/ unless it starts with '/'; BODY is sent as it is (no check that it is JSON).
    Raw {
        /// GET, PUT, ...
        method: String,
        /// vm.info, /api/v1/vm.info, ...
        endpoint: String,
        /// The body.
        body: Option<String>,
    },
}

/// A usage error: nothing was sent.
#[derive(Debug)]
struct Usage(String);

/// `key=value,...` into pairs; a key may appear once.
fn pairs(options: &str) -> Result<Vec<(&str, &str)>, Usage> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in options.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Usage(format!("expected key=value, got {item:?}")))?;
        if out.iter().any(|(key, _)| *key == k) {
            return Err(Usage(format!("option {k:?} given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn number(key: &str, v: &str) -> Result<Value, Usage> {
    v.parse::<u64>()
        .map(Value::from)
        .map_err(|_| Usage(format!("{key}={v:?}: expected a number")))
}

fn on_off(key: &str, v: &str) -> Result<Value, Usage> {
    match v {
        "on" | "true" => Ok(Value::Bool(true)),
        "off" | "false" => Ok(Value::Bool(false)),
        _ => Err(Usage(format!("{key}={v:?}: expected on or off"))),
    }
}

/// `512M`, `1G`, `64K` or bytes.
fn size(key: &str, v: &str) -> Result<Value, Usage> {
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'k' | b'K') => (&v[..v.len() - 1], 10),
        Some(b'm' | b'M') => (&v[..v.len() - 1], 20),
        Some(b'g' | b'G') => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .map(Value::from)
        .ok_or_else(|| Usage(format!("{key}={v:?}: expected a size (512M, 1G, ...)")))
}

/// The token-bucket options, as Cloud Hypervisor's `rate_limiter_config`.
fn rate_limit(body: &mut Map<String, Value>, key: &str, v: &str) -> Result<bool, Usage> {
    let Some((bucket, field)) = key.split_once('_') else {
        return Ok(false);
    };
    let bucket = match bucket {
        "bw" => "bandwidth",
        "ops" => "ops",
        _ => return Ok(false),
    };
    if !matches!(field, "size" | "one_time_burst" | "refill_time") {
        return Ok(false);
    }
    let n = number(key, v)?;
    let limiter = body
        .entry("rate_limiter_config")
        .or_insert_with(|| json!({}));
    limiter[bucket][field] = n;
    Ok(true)
}

/// `--disk` options as a `DiskConfig` body.
fn disk_body(options: &str) -> Result<Value, Usage> {
    let mut b = Map::new();
    for (k, v) in pairs(options)? {
        let value = match k {
            "path" | "id" | "serial" => Value::from(v),
            "readonly" | "direct" => on_off(k, v)?,
            "num_queues" | "queue_size" | "pids_max" => number(k, v)?,
            "memory_max" => size(k, v)?,
            "socket" | "vhost_socket" => {
                b.insert("vhost_user".into(), Value::Bool(true));
                b.insert("vhost_socket".into(), Value::from(v));
                continue;
            }
            _ if rate_limit(&mut b, k, v)? => continue,
            _ => return Err(Usage(format!("unknown disk option {k:?}"))),
        };
        b.insert(k.into(), value);
    }
    Ok(Value::Object(b))
}

/// `--net` options as a `NetConfig` body.
fn net_body(options: &str) -> Result<Value, Usage> {
    let mut b = Map::new();
    for (k, v) in pairs(options)? {
        let value = match k {
            "tap" | "ip" | "mask" | "mac" | "id" => Value::from(v),
            "mtu" | "num_queues" | "queue_size" => number(k, v)?,
            "socket" | "vhost_socket" => {
                b.insert("vhost_user".into(), Value::Bool(true));
                b.insert("vhost_socket".into(), Value::from(v));
                continue;
            }
            "fd" => {
                return Err(Usage(
                    "fd=: passing tap descriptors over the API is not supported yet; give tap=NAME"
                        .into(),
                ))
            }
            _ if k.starts_with("rx_") || k.starts_with("tx_") => {
                return Err(Usage(format!(
                    "{k}: the API takes one limit for both directions (bw_*, ops_*), as Cloud Hypervisor's NetConfig"
                )))
            }
            _ if rate_limit(&mut b, k, v)? => continue,
            _ => return Err(Usage(format!("unknown net option {k:?}"))),
        };
        b.insert(k.into(), value);
    }
    Ok(Value::Object(b))
}

/// `create`'s body: the file's JSON, checked to be JSON (sent as it is).
fn create_body(file: &str) -> Result<String, Usage> {
    let text = if file == "-" {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .map_err(|e| Usage(format!("reading the VmConfig from standard input: {e}")))?;
        t
    } else {
        std::fs::read_to_string(file).map_err(|e| Usage(format!("{file}: {e}")))?
    };
    serde_json::from_str::<Value>(&text).map_err(|e| Usage(format!("{file}: not JSON: {e}")))?;
    Ok(text)
}

/// The method, path and body of a command.
fn request(command: &Command) -> Result<(String, String, Option<String>), Usage> {
    if let Command::Create { config_json_file } = command {
        return Ok((
            "PUT".into(),
            "/api/v1/vm.create".into(),
            Some(create_body(config_json_file)?),
        ));
    }
    if let Command::Raw {
        method,
        endpoint,
        body,
    } = command
    {
        let path = if endpoint.starts_with('/') {
            endpoint.clone()
        } else {
            format!("/api/v1/{endpoint}")
        };
        return Ok((method.clone(), path, body.clone()));
    }
    let (method, endpoint, body) = endpoint(command)?;
    Ok((
        method.into(),
        format!("/api/v1/{endpoint}"),
        body.map(|b| b.to_string()),
    ))
}

/// The method, endpoint and JSON body of a command other than `raw`.
fn endpoint(command: &Command) -> Result<(&'static str, &'static str, Option<Value>), Usage> {
    Ok(match command {
        Command::Ping => ("GET", "vmm.ping", None),
        Command::Boot => ("PUT", "vm.boot", None),
        Command::Info => ("GET", "vm.info", None),
        Command::AddDisk { options } => ("PUT", "vm.add-disk", Some(disk_body(options)?)),
        Command::AddNet { options } => ("PUT", "vm.add-net", Some(net_body(options)?)),
        Command::RemoveDevice { id } => ("PUT", "vm.remove-device", Some(json!({ "id": id }))),
        Command::InjectFault { id, fault } => (
            "PUT",
            "vm.inject-fault",
            Some(json!({ "id": id, "fault": fault })),
        ),
        Command::ResizeConsole { cols, rows } => (
            "PUT",
            "vm.resize-console",
            Some(json!({ "cols": cols, "rows": rows })),
        ),
        Command::Reboot => ("PUT", "vm.reboot", None),
        Command::Shutdown => ("PUT", "vm.shutdown", None),
        Command::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        Command::Pause => ("PUT", "vm.pause", None),
        Command::Resume => ("PUT", "vm.resume", None),
        Command::PowerButton => ("PUT", "vm.power-button", None),
        Command::Counters => ("GET", "vm.counters", None),
        Command::Resize { balloon } => (
            "PUT",
            "vm.resize",
            Some(json!({ "desired_balloon": size("--balloon", balloon)? })),
        ),
        Command::BalloonStatistics => ("GET", "vm.balloon-statistics", None),
        Command::Raw { .. } | Command::Create { .. } => {
            return Err(Usage("raw and create are sent as given".into()))
        }
    })
}

/// Sends one request and returns the status and body.
fn call(
    socket: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    // A reset after a complete answer (the server closed with our body unread) still leaves
    // the answer.
    if let Err(e) = conn.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e);
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .api_socket
        .strip_prefix("path=")
        .unwrap_or(&cli.api_socket);
    let (method, path, body) = match request(&cli.command) {
        Ok(r) => r,
        Err(Usage(m)) => {
            eprintln!("bulkhead-ctl: {m}");
            return ExitCode::from(2);
        }
    };
    match call(socket, &method, &path, body.as_deref()) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_empty() {
                match serde_json::from_str::<Value>(&body) {
                    Ok(v) => println!(
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or(body.clone())
                    ),
                    Err(_) => println!("{body}"),
                }
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let messages = serde_json::from_str::<Vec<String>>(&body)
                .map(|m| m.join(": "))
                .unwrap_or(body);
            eprintln!("bulkhead-ctl: {method} {path}: {status}: {messages}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("bulkhead-ctl: {socket}: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ctl_disk_options_to_ch_body() {
        let b = disk_body(
            "path=/img,readonly=on,num_queues=2,id=d1,bw_size=1000,bw_refill_time=100,ops_size=5,ops_refill_time=10,memory_max=64M",
        )
        .expect("valid");
        assert_eq!(
            b,
            json!({
                "path": "/img", "readonly": true, "num_queues": 2, "id": "d1",
                "memory_max": 64u64 << 20,
                "rate_limiter_config": {
                    "bandwidth": {"size": 1000, "refill_time": 100},
                    "ops": {"size": 5, "refill_time": 10},
                },
            })
        );
        let b = disk_body("socket=/run/b.sock").expect("valid");
        assert_eq!(
            b,
            json!({"vhost_user": true, "vhost_socket": "/run/b.sock"})
        );
        for bad in [
            "path",
            "path=/a,path=/b",
            "readonly=yes",
            "num_queues=x",
            "colour=red",
            "memory_max=lots",
        ] {
            assert!(disk_body(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_ctl_net_options_to_ch_body() {
        let b =
            net_body("tap=tap1,mac=52:54:00:00:00:01,ip=10.0.0.1,mask=255.0.0.0,mtu=1400,id=eth1")
                .expect("valid");
        assert_eq!(
            b,
            json!({"tap": "tap1", "mac": "52:54:00:00:00:01", "ip": "10.0.0.1",
                   "mask": "255.0.0.0", "mtu": 1400, "id": "eth1"})
        );
        for bad in [
            "fd=3",
            "tap=t,rx_bw_size=1",
            "tap=t,mtu=big",
            "tap=t,colour=red",
        ] {
            assert!(net_body(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_ctl_commands_map_to_endpoints() {
        let r = request(&Command::RemoveDevice { id: "d1".into() }).expect("valid");
        assert_eq!(
            (r.0.as_str(), r.1.as_str()),
            ("PUT", "/api/v1/vm.remove-device")
        );
        assert_eq!(r.2.as_deref(), Some(r#"{"id":"d1"}"#));
        assert_eq!(
            request(&Command::ShutdownVmm).expect("v").1,
            "/api/v1/vmm.shutdown"
        );
        assert_eq!(request(&Command::Info).expect("v").0, "GET");
        let r = request(&Command::Resize {
            balloon: "512M".into(),
        })
        .expect("valid");
        assert_eq!(
            (r.0.as_str(), r.1.as_str(), r.2.as_deref()),
            (
                "PUT",
                "/api/v1/vm.resize",
                Some(r#"{"desired_balloon":536870912}"#)
            )
        );
        assert!(request(&Command::Resize {
            balloon: "lots".into()
        })
        .is_err());
        assert_eq!(
            request(&Command::BalloonStatistics).expect("v"),
            ("GET".into(), "/api/v1/vm.balloon-statistics".into(), None)
        );
        let cli = Cli::try_parse_from([
            "bulkhead-ctl",
            "--api-socket",
            "/s",
            "resize",
            "--balloon",
            "1G",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Resize { .. }));
        let raw = Command::Raw {
            method: "PATCH".into(),
            endpoint: "/x".into(),
            body: Some("{".into()),
        };
        assert_eq!(
            request(&raw).expect("raw"),
            ("PATCH".into(), "/x".into(), Some("{".into()))
        );
    }

    #[test]
    fn test_ctl_create_sends_the_file_and_boot() {
        let dir = std::env::temp_dir().join(format!("bulkhead-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("vm.json");
        let config = r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2}}"#;
        std::fs::write(&good, config).expect("write");
        let r = request(&Command::Create {
            config_json_file: good.display().to_string(),
        })
        .expect("valid");
        assert_eq!(
            r,
            (
                "PUT".into(),
                "/api/v1/vm.create".into(),
                Some(config.into())
            )
        );
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{payload").expect("write");
        for file in [bad, dir.join("missing.json")] {
            assert!(request(&Command::Create {
                config_json_file: file.display().to_string()
            })
            .is_err());
        }
        assert_eq!(
            request(&Command::Boot).expect("v"),
            ("PUT".into(), "/api/v1/vm.boot".into(), None)
        );
        let cli = Cli::try_parse_from(["bulkhead-ctl", "--api-socket", "/s", "create", "vm.json"])
            .expect("parses");
        assert!(matches!(cli.command, Command::Create { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
