//! The `vsva` command's library: what the binary and the benchmarks share.

pub mod bench;
pub mod demo;
pub mod holdings;
pub mod scenario;
pub mod stack;
