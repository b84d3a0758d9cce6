//! Small devices emulated in the VMM itself.

pub mod pl011;
