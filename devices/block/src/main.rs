//! The `bulkhead-block` binary: [`Args`] (clap) -> [`Config`] (`TryFrom`) -> the device runtime.

use std::process::ExitCode;

use bulkhead_block::args::Args;
use bulkhead_block::Config;

fn main() -> ExitCode {
    bulkhead_device_runtime::main::<Args, Config>()
}
