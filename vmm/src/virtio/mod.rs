//! Virtio devices as the guest sees them: the PCI transport, fronting device processes that
//! speak vhost-user.

pub mod pci;
pub mod vhost_user;
