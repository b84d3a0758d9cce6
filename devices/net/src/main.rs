//! The `bulkhead-net` binary: `Args` (clap) -> [`Config`] (`TryFrom`) -> the device runtime.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::process::ExitCode;

use bulkhead_device_runtime::args::check_fd;
use bulkhead_device_runtime::{ArgsError, RuntimeArgs, RuntimeConfig};
use bulkhead_net::backend::{MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE};
use bulkhead_net::{BucketConfig, Config, LimiterConfig, NetParams, TapSource};
use clap::Parser;

/// virtio-net device process: serves a tap device to one vhost-user frontend.
#[derive(Parser, Debug, PartialEq, Eq)]
#[command(name = "bulkhead-net", version)]
struct Args {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// A tap queue inherited as descriptor N (5, 6, ... from the VMM, which opened it with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, a 12-byte vnet header, non-blocking). One per queue
    /// pair, in order.
    #[arg(long = "tap-fd", value_name = "N")]
    tap_fd: Vec<i32>,
    /// Open the tap NAME (created if it does not exist) instead: hand runs only.
    #[arg(long, value_name = "NAME", conflicts_with = "tap_fd")]
    tap: Option<String>,
    /// The guest's MAC address (unicast), XX:XX:XX:XX:XX:XX.
    #[arg(long, value_name = "MAC")]
    mac: String,
    /// Advertise this MTU to the guest (68..=65535; VIRTIO_NET_F_MTU).
    #[arg(long, value_name = "N")]
    mtu: Option<u32>,
    /// Number of queue pairs (default: one per --tap-fd, or 1 with --tap).
    #[arg(long, value_name = "P")]
    queue_pairs: Option<u16>,
    /// Largest size of each queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// rx (tap → guest) bandwidth bucket size, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    rx_bw_size: u64,
    /// rx bandwidth one-time burst, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    rx_bw_one_time_burst: u64,
    /// rx bandwidth refill time, ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    rx_bw_refill_time: u64,
    /// rx operations (frames) bucket size.
    #[arg(long, value_name = "N", default_value_t = 0)]
    rx_ops_size: u64,
    /// rx operations one-time burst.
    #[arg(long, value_name = "N", default_value_t = 0)]
    rx_ops_one_time_burst: u64,
    /// rx operations refill time, ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    rx_ops_refill_time: u64,
    /// tx (guest → tap) bandwidth bucket size, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    tx_bw_size: u64,
    /// tx bandwidth one-time burst, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    tx_bw_one_time_burst: u64,
    /// tx bandwidth refill time, ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    tx_bw_refill_time: u64,
    /// tx operations (frames) bucket size.
    #[arg(long, value_name = "N", default_value_t = 0)]
    tx_ops_size: u64,
    /// tx operations one-time burst.
    #[arg(long, value_name = "N", default_value_t = 0)]
    tx_ops_one_time_burst: u64,
    /// tx operations refill time, ms.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    tx_ops_refill_time: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ConfigError {
    #[error("--mac {0:?} is not a unicast MAC address (XX:XX:XX:XX:XX:XX)")]
    Mac(String),
    #[error("--mtu must be between 68 and 65535, not {0}")]
    Mtu(u32),
    #[error("--queue-pairs must be between 1 and {MAX_QUEUE_PAIRS}, not {0}")]
    QueuePairs(u16),
    #[error("--queue-pairs {pairs} needs {pairs} --tap-fd, not {fds}")]
    TapFdCount { pairs: u16, fds: usize },
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("one of --tap-fd and --tap is required")]
    Tap,
    #[error("--{direction}-{bucket}-size and --{direction}-{bucket}-refill-time go together (both non-zero, or neither)")]
    Bucket {
        direction: &'static str,
        bucket: &'static str,
    },
    #[error(transparent)]
    Runtime(#[from] ArgsError),
}

/// Parses `XX:XX:XX:XX:XX:XX` into a unicast, non-zero address.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

fn bucket(
    direction: &'static str,
    bucket: &'static str,
    size: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
) -> Result<BucketConfig, ConfigError> {
    BucketConfig::new(size, one_time_burst, refill_time_ms)
        .ok_or(ConfigError::Bucket { direction, bucket })
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        let mac = parse_mac(&args.mac).ok_or_else(|| ConfigError::Mac(args.mac.clone()))?;
        let mtu = args
            .mtu
            .map(|m| {
                u16::try_from(m)
                    .ok()
                    .filter(|m| *m >= 68)
                    .ok_or(ConfigError::Mtu(m))
            })
            .transpose()?;
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let runtime = RuntimeConfig::try_from(args.runtime)?;
        let (taps, default_pairs) = match (args.tap, args.tap_fd.is_empty()) {
            (Some(name), true) => (TapSource::Name(name), 1),
            (None, false) => {
                let fds = args
                    .tap_fd
                    .iter()
                    .map(|fd| check_fd("tap-fd", *fd))
                    .collect::<Result<Vec<_>, _>>()?;
                runtime.check_distinct(&fds)?;
                let n = fds.len();
                (TapSource::Fds(fds), u16::try_from(n).unwrap_or(u16::MAX))
            }
            _ => return Err(ConfigError::Tap),
        };
        let queue_pairs = args.queue_pairs.unwrap_or(default_pairs);
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(queue_pairs));
        }
        if let TapSource::Fds(fds) = &taps {
            if fds.len() != usize::from(queue_pairs) {
                return Err(ConfigError::TapFdCount {
                    pairs: queue_pairs,
                    fds: fds.len(),
                });
            }
        }
        let rx_limit = LimiterConfig {
            bandwidth: bucket(
                "rx",
                "bw",
                args.rx_bw_size,
                args.rx_bw_one_time_burst,
                args.rx_bw_refill_time,
            )?,
            ops: bucket(
                "rx",
                "ops",
                args.rx_ops_size,
                args.rx_ops_one_time_burst,
                args.rx_ops_refill_time,
            )?,
        };
        let tx_limit = LimiterConfig {
            bandwidth: bucket(
                "tx",
                "bw",
                args.tx_bw_size,
                args.tx_bw_one_time_burst,
                args.tx_bw_refill_time,
            )?,
            ops: bucket(
                "tx",
                "ops",
                args.tx_ops_size,
                args.tx_ops_one_time_burst,
                args.tx_ops_refill_time,
            )?,
        };
        Ok(Config {
            runtime,
            taps,
            params: NetParams {
                mac,
                mtu,
                queue_pairs,
                queue_size: args.queue_size,
                rx_limit,
                tx_limit,
            },
        })
    }
}

fn main() -> ExitCode {
    bulkhead_device_runtime::main::<Args, Config>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::SocketSource;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bulkhead-net").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        Config::try_from(parse(args).expect("parse"))
    }

    const MAC: &str = "52:54:00:12:34:56";

    #[test]
    fn test_args_contract_layout_accepted() {
        let c = config(&[
            "--socket-fd",
            "3",
            "--control-fd",
            "4",
            "--tap-fd",
            "5",
            "--tap-fd",
            "6",
            "--mac",
            MAC,
            "--queue-pairs",
            "2",
        ])
        .expect("config");
        assert_eq!(c.runtime.socket, SocketSource::Fd(3));
        assert_eq!(c.taps, TapSource::Fds(vec![5, 6]));
        assert_eq!(c.params.queue_pairs, 2);
        assert_eq!(c.params.queue_size, 256);
        assert_eq!(c.params.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(c.params.mtu, None);
        assert!(!c.params.rx_limit.is_limit() && !c.params.tx_limit.is_limit());
    }

    #[test]
    fn test_args_queue_pairs_default_to_tap_fds() {
        let c = config(&["--socket-fd", "3", "--tap-fd", "5", "--mac", MAC]).expect("config");
        assert_eq!(c.params.queue_pairs, 1);
        let c = config(&["--socket-path", "/s", "--tap", "tap0", "--mac", MAC]).expect("config");
        assert_eq!(c.taps, TapSource::Name("tap0".into()));
        assert_eq!(c.params.queue_pairs, 1);
    }

    #[test]
    fn test_args_rate_limits_converted() {
        let c = config(&[
            "--socket-fd",
            "3",
            "--tap-fd",
            "5",
            "--mac",
            MAC,
            "--tx-bw-size",
            "1048576",
            "--tx-bw-refill-time",
            "100",
            "--tx-bw-one-time-burst",
            "10",
            "--rx-ops-size",
            "1000",
            "--rx-ops-refill-time",
            "1000",
            "--mtu",
            "9000",
            "--queue-size",
            "1024",
        ])
        .expect("config");
        assert_eq!(
            c.params.tx_limit.bandwidth,
            BucketConfig {
                size: 1 << 20,
                one_time_burst: 10,
                refill_time_ms: 100
            }
        );
        assert!(c.params.rx_limit.ops.is_limit() && !c.params.rx_limit.bandwidth.is_limit());
        assert_eq!(c.params.mtu, Some(9000));
        assert_eq!(c.params.queue_size, 1024);
    }

    #[test]
    fn test_args_bad_values_rejected() {
        let base = ["--socket-fd", "3", "--tap-fd", "5"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            config(&v)
        };
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "53:54:00:12:34:56",
            "00:00:00:00:00:00",
            "5254.0012.3456",
            "zz:54:00:12:34:56",
            "2:54:00:12:34:56",
        ] {
            assert_eq!(
                with(&["--mac", bad]),
                Err(ConfigError::Mac(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            with(&["--mac", MAC, "--mtu", "67"]),
            Err(ConfigError::Mtu(67))
        );
        assert_eq!(
            with(&["--mac", MAC, "--mtu", "65536"]),
            Err(ConfigError::Mtu(65536))
        );
        assert_eq!(
            with(&["--mac", MAC, "--queue-pairs", "2"]),
            Err(ConfigError::TapFdCount { pairs: 2, fds: 1 })
        );
        assert_eq!(
            with(&["--mac", MAC, "--queue-pairs", "0"]),
            Err(ConfigError::QueuePairs(0))
        );
        assert_eq!(
            with(&["--mac", MAC, "--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            with(&["--mac", MAC, "--queue-size", "2048"]),
            Err(ConfigError::QueueSize(2048))
        );
        assert_eq!(
            with(&["--mac", MAC, "--rx-bw-size", "100"]),
            Err(ConfigError::Bucket {
                direction: "rx",
                bucket: "bw"
            })
        );
        assert_eq!(
            with(&["--mac", MAC, "--tap-fd", "5"]),
            Err(ConfigError::Runtime(ArgsError::FdTwice(5)))
        );
        assert_eq!(
            with(&["--mac", MAC, "--tap-fd", "3"]),
            Err(ConfigError::Runtime(ArgsError::FdTwice(3)))
        );
        assert!(matches!(
            with(&["--mac", MAC, "--tap-fd", "1"]),
            Err(ConfigError::Runtime(ArgsError::ReservedFd { fd: 1, .. }))
        ));
        assert_eq!(
            config(&["--socket-fd", "3", "--mac", MAC]),
            Err(ConfigError::Tap)
        );
        assert!(
            parse(&["--socket-fd", "3", "--tap-fd", "5"]).is_err(),
            "no --mac"
        );
        assert!(parse(&[
            "--socket-fd",
            "3",
            "--tap-fd",
            "5",
            "--tap",
            "t",
            "--mac",
            MAC
        ])
        .is_err());
    }
}
