//! `bulkhead image check IMG [--arch aarch64|arm]`: checks a raw disk image against the ARM
//! VM System Specification's rules for a portable image (docs/image-check.md). Prints one line
//! per rule; exits 0 when the image conforms, 1 when it does not, 2 for bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_firmware::image_check::{check, Arch};
use clap::{Parser, Subcommand, ValueEnum};

/// `bulkhead image ...`.
#[derive(Debug, Parser)]
#[command(
    name = "bulkhead image",
    bin_name = "bulkhead image",
    about = "Disk image tools"
)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Checks that a raw image boots on a conforming VM: a valid GPT (both copies), an EFI
    /// System Partition, FAT32, the removable-media boot file, a PE/COFF EFI application for
    /// the architecture.
    Check {
        /// The raw disk image.
        image: PathBuf,
        /// The guest architecture.
        #[arg(long, value_enum, default_value = "aarch64")]
        arch: ArchArg,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ArchArg {
    Aarch64,
    Arm,
}

/// Exit status of an image that does not conform.
const EXIT_NONCONFORMING: u8 = 1;
/// Exit status for bad input (unreadable image, bad arguments).
const EXIT_BAD_INPUT: u8 = 2;

/// Runs `bulkhead image` with `args` (the program name and `image` first).
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = match ImageArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_INPUT)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let ImageCommand::Check { image, arch } = args.command;
    let arch = match arch {
        ArchArg::Aarch64 => Arch::Aarch64,
        ArchArg::Arm => Arch::Arm,
    };
    let report = std::fs::File::open(&image).and_then(|mut f| {
        if f.metadata()?.is_dir() {
            return Err(std::io::Error::other("is a directory"));
        }
        check(&mut f, arch)
    });
    match report {
        Ok(r) => {
            print!("{r}");
            if r.conforms() {
                println!("{}: conforms ({})", image.display(), arch.boot_file());
                ExitCode::SUCCESS
            } else {
                println!("{}: does not conform", image.display());
                ExitCode::from(EXIT_NONCONFORMING)
            }
        }
        Err(e) => {
            eprintln!("bulkhead image check: {}: {e}", image.display());
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}
