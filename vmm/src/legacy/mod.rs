//! Small devices emulated in the VMM itself.

pub mod cfi_flash;
pub mod pl011;
pub mod pl031;
pub mod pl061;
