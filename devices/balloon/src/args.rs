//! The options of `bulkhead-balloon` and their validated form, [`Config`].

use bulkhead_device_runtime::{ArgsError, RuntimeArgs, RuntimeConfig};
use clap::Parser;

use crate::backend::{BalloonParams, MAX_QUEUE_SIZE, MAX_STATS_INTERVAL_S};
use crate::Config;

/// virtio-balloon device process: gives a vhost-user frontend's guest RAM back to the host.
#[derive(Parser, Debug, PartialEq, Eq)]
#[command(name = "bulkhead-balloon", version)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// The first target: how much of guest RAM the guest should give back, in bytes (a
    /// K, M or G suffix multiplies by 1024, 1024^2, 1024^3). Changed at run time on the
    /// control channel (`resize BYTES`).
    #[arg(long, value_name = "SIZE", default_value = "0")]
    pub size: String,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest takes pages back from the balloon
    /// before its OOM killer runs.
    #[arg(long)]
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING: free guest pages the guest reports are released.
    #[arg(long)]
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ and ask the guest for its memory statistics every N
    /// seconds (0: no statistics queue).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub stats_polling_interval_s: u32,
    /// Largest size of each queue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--size {0:?} is not a size (bytes, or a number with a K, M or G suffix)")]
    Size(String),
    #[error("--size {0} is not a multiple of 4096 (the balloon's page)")]
    SizeAlignment(u64),
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    #[error("--stats-polling-interval-s must be at most {MAX_STATS_INTERVAL_S}, not {0}")]
    StatsInterval(u32),
    #[error(transparent)]
    Runtime(#[from] ArgsError),
}

/// `N`, `NK`, `NM`, `NG` (powers of 1024), as bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'k' | 'K') => (&t[..i], 10),
        (i, 'm' | 'M') => (&t[..i], 20),
        (i, 'g' | 'G') => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Config, ConfigError> {
        let size = parse_size(&args.size).ok_or_else(|| ConfigError::Size(args.size.clone()))?;
        if size % crate::ram::BALLOON_PAGE != 0 {
            return Err(ConfigError::SizeAlignment(size));
        }
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(ConfigError::QueueSize(args.queue_size));
        }
        if args.stats_polling_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::StatsInterval(args.stats_polling_interval_s));
        }
        let runtime = RuntimeConfig::try_from(args.runtime)?;
        Ok(Config {
            runtime,
            params: BalloonParams {
                size,
                deflate_on_oom: args.deflate_on_oom,
                free_page_reporting: args.free_page_reporting,
                stats_interval_s: args.stats_polling_interval_s,
                queue_size: args.queue_size,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let a = Args::try_parse_from(
            ["bulkhead-balloon", "--socket-fd", "3"]
                .iter()
                .chain(args.iter()),
        )
        .map_err(|e| e.to_string())?;
        Config::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn test_args_defaults() {
        let c = parse(&[]).expect("config");
        assert_eq!(
            c.params,
            BalloonParams {
                size: 0,
                deflate_on_oom: false,
                free_page_reporting: false,
                stats_interval_s: 0,
                queue_size: 256,
            }
        );
        assert_eq!(c.params.num_queues(), 2);
    }

    #[test]
    fn test_args_all_options() {
        let c = parse(&[
            "--size",
            "512M",
            "--deflate-on-oom",
            "--free-page-reporting",
            "--stats-polling-interval-s",
            "2",
            "--queue-size",
            "64",
        ])
        .expect("config");
        assert_eq!(c.params.size, 512 << 20);
        assert!(c.params.deflate_on_oom && c.params.free_page_reporting);
        assert_eq!(c.params.stats_interval_s, 2);
        assert_eq!(c.params.queue_size, 64);
        assert_eq!(c.params.num_queues(), 4);
    }

    #[test]
    fn test_args_bad_input_rejected() {
        for (args, want) in [
            (&["--size", "12x"][..], "is not a size"),
            (&["--size", "100"][..], "multiple of 4096"),
            (&["--size", "99999999999G"][..], "is not a size"),
            (&["--queue-size", "100"][..], "power of two"),
            (&["--queue-size", "2048"][..], "power of two"),
            (&["--stats-polling-interval-s", "100000"][..], "at most"),
            (&["--stats-polling-interval-s", "-1"][..], ""),
        ] {
            let e = parse(args).expect_err("refused");
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn test_parse_size_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
    }
}
