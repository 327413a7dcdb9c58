//! vsva's test bed: what sits on top of the library crates to exercise them whole.
//!
//! The library crates (`vsva-vtd`, `vsva-hw`, `vsva-host`, `vsva-vmm`, `vsva-guest`) hold
//! only what a host or a VMM would embed; scenarios that assemble them and measure them
//! live here.
//!
//! - [`scale`]: the PASID space full of VMs, thousands of bound PASIDs, timed and checked
//!   for leaks.

pub mod scale;
