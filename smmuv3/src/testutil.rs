//! Helpers for unit tests.

pub(crate) use vsva_mem::testutil::TestMemory;

/// Runs `check` on `cases` values of `strategy` and returns how many it reported as
/// reaching the path under test (`Ok(true)`), so a property test can show it is not
/// vacuous. Panics on the first failing case, with proptest's shrunk input.
pub(crate) fn count_hits<S, F>(cases: u32, strategy: &S, check: F) -> u32
where
    S: proptest::strategy::Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<bool, proptest::test_runner::TestCaseError>,
{
    use proptest::test_runner::{Config, TestRunner};
    let hits = std::cell::Cell::new(0);
    TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    })
    .run(strategy, |v| {
        if check(v)? {
            hits.set(hits.get() + 1);
        }
        Ok(())
    })
    .unwrap();
    hits.get()
}
