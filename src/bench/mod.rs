//! Measurements of vsva's hot paths, each against a baseline taken in the same run.

mod error;
pub mod loads;
pub mod measure;
pub mod platform;

pub use error::BenchError;
pub use measure::{measure, measure_pair, SampleBudget, Workload};
