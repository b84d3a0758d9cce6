//! What differs between host architectures. Each submodule exports the same names; callers
//! never see `cfg(target_arch)`.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(not(target_arch = "aarch64"))]
mod unsupported;
#[cfg(not(target_arch = "aarch64"))]
pub use unsupported::*;
