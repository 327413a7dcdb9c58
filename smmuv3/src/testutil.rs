//! Memory for unit tests.

use std::sync::atomic::{AtomicU64, Ordering};
use vsva_vtd::{MemError, PhysMem};

/// Zero-filled memory of 64-bit words, with real atomics for the 64-bit operations.
pub(crate) struct TestMemory {
    words: Vec<AtomicU64>,
}

impl TestMemory {
    pub fn new(bytes: u64) -> Self {
        TestMemory {
            words: (0..bytes / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn word(&self, addr: u64) -> Result<&AtomicU64, MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        self.words
            .get((addr / 8) as usize)
            .ok_or(MemError::OutOfRange { addr, len: 8 })
    }

    fn check(&self, addr: u64, len: usize) -> Result<(), MemError> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.words.len() as u64 * 8 => Ok(()),
            _ => Err(MemError::OutOfRange {
                addr,
                len: len as u64,
            }),
        }
    }
}

impl PhysMem for TestMemory {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        Ok(self.word(addr)?.load(Ordering::SeqCst))
    }

    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        Ok(self.word(addr)?.fetch_or(bits, Ordering::SeqCst))
    }

    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        let w = self.word(addr)?;
        Ok(
            match w.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.word(addr)?.store(value, Ordering::SeqCst);
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(addr, buf.len())?;
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr + i as u64;
            let w = self.words[(a / 8) as usize].load(Ordering::SeqCst);
            *b = (w >> ((a % 8) * 8)) as u8;
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.check(addr, buf.len())?;
        for (i, &b) in buf.iter().enumerate() {
            let a = addr + i as u64;
            let shift = (a % 8) * 8;
            let w = &self.words[(a / 8) as usize];
            let old = w.load(Ordering::SeqCst);
            w.store(
                (old & !(0xff << shift)) | (b as u64) << shift,
                Ordering::SeqCst,
            );
        }
        Ok(())
    }
}

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
