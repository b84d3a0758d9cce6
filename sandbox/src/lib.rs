//! Jails for Bulkhead's device processes: namespaces, pivot_root, seccomp, landlock and rlimits.
//!
//! Empty until the sandboxing work lands; see `docs/` and SECURITY.md for the plan.
