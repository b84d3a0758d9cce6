//! The command line of `bulkhead-block`: `Args` (clap) -> [`Config`] (`TryFrom`). In the
//! library so that the test-only jail probe can run the real device behind a fault of its own
//! (`tests/jail-probe`, its `bulkhead-block` mode).

use std::path::PathBuf;

use crate::backend::{MAX_POLL_US, MAX_QUEUES, MAX_QUEUE_SIZE};
use crate::request::ID_BYTES;
use crate::{Config, ImageSource, Serial};
use bulkhead_device_runtime::args::check_fd;
use bulkhead_device_runtime::rate::{BucketConfig, LimiterConfig};
use bulkhead_device_runtime::{ArgsError, RuntimeArgs, RuntimeConfig};
use clap::Parser;

/// virtio-blk device process: serves a raw disk image to one vhost-user frontend.
#[derive(Parser, Debug, PartialEq, Eq)]
#[command(name = "bulkhead-block", version)]
pub struct Args {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// The raw disk image (regular file or block device). With --image-fd, only its name in logs.
    #[arg(long, value_name = "IMG")]
    path: Option<PathBuf>,
    /// Serve the image inherited as descriptor N (5 from the VMM, which opened and locked it;
    /// the jailed process opens no path).
    #[arg(long, value_name = "N")]
    image_fd: Option<i32>,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    num_queues: u16,
    /// Largest size of each queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (ASCII, up to 20 bytes).
    #[arg(long, value_name = "S")]
    serial: Option<String>,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// Bandwidth bucket size, bytes (with --bw-refill-time; 0: no bandwidth limit).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    bw_size: u64,
    /// Bandwidth one-time burst, bytes, spent before the bucket.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    bw_one_time_burst: u64,
    /// Bandwidth refill time, ms: the bucket refills --bw-size bytes in this long.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    bw_refill_time: u64,
    /// Operations (requests) bucket size (with --ops-refill-time; 0: no operations limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    ops_size: u64,
    /// Operations one-time burst, spent before the bucket.
    #[arg(long, value_name = "N", default_value_t = 0)]
    ops_one_time_burst: u64,
    /// Operations refill time, ms: the bucket refills --ops-size operations in this long.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    ops_refill_time: u64,
    /// After its queue runs empty, a worker keeps looking at the ring for this many
    /// microseconds (the driver's notifications off) before it sleeps: lower latency for a
    /// CPU that spins. 0 (the default): no polling.
    #[arg(long, value_name = "US", default_value_t = 0)]
    poll_us: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    NumQueues(u16),
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("--serial must be printable ASCII of at most {ID_BYTES} bytes")]
    Serial,
    #[error(transparent)]
    Runtime(#[from] ArgsError),
    #[error("one of --path and --image-fd is required")]
    Image,
    #[error("--{0}-size and --{0}-refill-time go together (both non-zero, or neither)")]
    Bucket(&'static str),
    #[error("--poll-us must be at most {MAX_POLL_US}, not {0}")]
    PollUs(u32),
}

fn bucket(
    name: &'static str,
    size: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
) -> Result<BucketConfig, ConfigError> {
    BucketConfig::new(size, one_time_burst, refill_time_ms).ok_or(ConfigError::Bucket(name))
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        if args.num_queues == 0 || args.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(args.num_queues));
        }
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        let mut serial = Serial::default();
        if let Some(s) = &args.serial {
            let bytes = s.as_bytes();
            if bytes.len() > ID_BYTES || !bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                return Err(ConfigError::Serial);
            }
            serial
                .0
                .get_mut(..bytes.len())
                .ok_or(ConfigError::Serial)?
                .copy_from_slice(bytes);
        }
        let rate_limit = LimiterConfig {
            bandwidth: bucket(
                "bw",
                args.bw_size,
                args.bw_one_time_burst,
                args.bw_refill_time,
            )?,
            ops: bucket(
                "ops",
                args.ops_size,
                args.ops_one_time_burst,
                args.ops_refill_time,
            )?,
        };
        if args.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(args.poll_us));
        }
        let runtime = RuntimeConfig::try_from(args.runtime)?;
        let image = match (args.image_fd, args.path) {
            (Some(fd), name) => ImageSource::Fd {
                fd: check_fd("image-fd", fd)?,
                name: name.unwrap_or_else(|| PathBuf::from(format!("fd {fd}"))),
            },
            (None, Some(path)) => ImageSource::Path(path),
            (None, None) => return Err(ConfigError::Image),
        };
        if let ImageSource::Fd { fd, .. } = image {
            runtime.check_distinct(&[fd])?;
        }
        Ok(Config {
            runtime,
            image,
            read_only: args.readonly,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            serial,
            direct: args.direct,
            rate_limit,
            poll_us: args.poll_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::SocketSource;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bulkhead-block").chain(args.iter().copied()))
    }

    #[test]
    fn test_args_socket_path_defaults_accepted() {
        let args = parse(&["--socket-path", "/tmp/s", "--path", "/img"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(config.runtime.socket, SocketSource::Path("/tmp/s".into()));
        assert_eq!(config.num_queues, 1);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.serial, Serial::default());
        assert!(!config.read_only && !config.direct);
        assert_eq!(config.image, ImageSource::Path("/img".into()));
        assert!(config.runtime.seccomp, "seccomp is on by default");
        assert!(config.runtime.landlock, "landlock is on by default");
    }

    #[test]
    fn test_args_rate_limits_converted() {
        let args = parse(&[
            "--socket-fd",
            "3",
            "--path",
            "/img",
            "--bw-size",
            "1048576",
            "--bw-one-time-burst",
            "4096",
            "--bw-refill-time",
            "100",
            "--ops-size",
            "1000",
            "--ops-refill-time",
            "1000",
        ])
        .expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(
            config.rate_limit,
            LimiterConfig {
                bandwidth: BucketConfig {
                    size: 1 << 20,
                    one_time_burst: 4096,
                    refill_time_ms: 100,
                },
                ops: BucketConfig {
                    size: 1000,
                    one_time_burst: 0,
                    refill_time_ms: 1000,
                },
            }
        );
        let args = parse(&["--socket-fd", "3", "--path", "/img"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert!(!config.rate_limit.is_limit(), "no limit by default");
    }

    #[test]
    fn test_args_rate_limit_size_without_refill_time_rejected() {
        for (options, name) in [
            (["--bw-size", "4096"], "bw"),
            (["--bw-refill-time", "100"], "bw"),
            (["--ops-size", "10"], "ops"),
            (["--ops-refill-time", "100"], "ops"),
        ] {
            let mut all = vec!["--socket-fd", "3", "--path", "/img"];
            all.extend(options);
            let args = parse(&all).expect("parse");
            let error = Config::try_from(args).expect_err("size and refill time go together");
            assert_eq!(error, ConfigError::Bucket(name));
        }
    }

    #[test]
    fn test_args_image_fd_names_image_by_path() {
        let args =
            parse(&["--socket-fd", "3", "--image-fd", "5", "--path", "/a.img"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(
            config.image,
            ImageSource::Fd {
                fd: 5,
                name: "/a.img".into()
            }
        );
        let args =
            parse(&["--socket-fd", "3", "--image-fd", "5", "--seccomp", "off"]).expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(
            config.image,
            ImageSource::Fd {
                fd: 5,
                name: "fd 5".into()
            }
        );
        assert!(!config.runtime.seccomp);
    }

    #[test]
    fn test_args_no_image_rejected() {
        let args = parse(&["--socket-fd", "3"]).expect("parse");
        assert_eq!(Config::try_from(args), Err(ConfigError::Image));
        let args = parse(&["--socket-fd", "3", "--image-fd=-2"]).expect("parse");
        assert!(matches!(
            Config::try_from(args),
            Err(ConfigError::Runtime(ArgsError::ReservedFd { fd: -2, .. }))
        ));
        let args = parse(&["--socket-fd", "3", "--image-fd=3"]).expect("parse");
        assert_eq!(
            Config::try_from(args),
            Err(ConfigError::Runtime(ArgsError::FdTwice(3)))
        );
        assert!(parse(&["--socket-fd", "3", "--path", "/i", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn test_args_both_sockets_rejected() {
        let err = parse(&["--socket-path", "/s", "--socket-fd", "3", "--path", "/i"])
            .expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_args_no_socket_rejected() {
        let err = parse(&["--path", "/i"]).expect_err("missing socket");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_args_unparsable_queue_count_rejected() {
        let err = parse(&["--socket-fd", "3", "--path", "/i", "--num-queues", "x"])
            .expect_err("bad number");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn test_args_poll_us_converted_and_bounded() {
        let base = ["--socket-fd", "3", "--path", "/i"];
        let config = Config::try_from(parse(&base).expect("parse")).expect("config");
        assert_eq!(config.poll_us, 0, "polling is off by default");
        let with = |v: &str| {
            let mut a = base.to_vec();
            a.extend(["--poll-us", v]);
            Config::try_from(parse(&a).expect("parse"))
        };
        assert_eq!(with("50").expect("config").poll_us, 50);
        assert_eq!(with("10000").expect("config").poll_us, MAX_POLL_US);
        assert_eq!(
            with("10001").expect_err("too long"),
            ConfigError::PollUs(10001)
        );
    }

    #[test]
    fn test_config_all_options_converted() {
        let args = parse(&[
            "--socket-fd",
            "3",
            "--path",
            "/i",
            "--readonly",
            "--num-queues",
            "4",
            "--queue-size",
            "128",
            "--serial",
            "disk-0",
            "--direct",
        ])
        .expect("parse");
        let config = Config::try_from(args).expect("config");
        assert_eq!(config.runtime.socket, SocketSource::Fd(3));
        assert_eq!(&config.serial.0[..7], b"disk-0\0");
        assert!(config.read_only && config.direct);
        assert_eq!((config.num_queues, config.queue_size), (4, 128));
    }

    #[test]
    fn test_config_bad_values_rejected() {
        let base = ["--socket-fd", "3", "--path", "/i"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            Config::try_from(parse(&v).expect("parse"))
        };
        assert_eq!(with(&["--num-queues", "0"]), Err(ConfigError::NumQueues(0)));
        assert_eq!(
            with(&["--num-queues", "65"]),
            Err(ConfigError::NumQueues(65))
        );
        assert_eq!(
            with(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            with(&["--queue-size", "2048"]),
            Err(ConfigError::QueueSize(2048))
        );
        assert_eq!(
            with(&["--serial", "012345678901234567890"]),
            Err(ConfigError::Serial)
        );
        assert_eq!(with(&["--serial", "tab\there"]), Err(ConfigError::Serial));
        let args = parse(&["--socket-fd=-1", "--path", "/i"]).expect("parse");
        assert!(matches!(
            Config::try_from(args),
            Err(ConfigError::Runtime(ArgsError::ReservedFd { fd: -1, .. }))
        ));
    }
}
