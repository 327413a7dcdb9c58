//! Zero-filled memory with real 64-bit atomics.

use crate::{MemError, PhysMem};
use std::sync::atomic::{AtomicU64, Ordering};

/// Zero-filled memory of 64-bit words, with real atomics for the 64-bit operations.
pub struct TestMemory {
    words: Vec<AtomicU64>,
}

impl TestMemory {
    /// `bytes` of zeroed memory (a multiple of 8).
    pub fn new(bytes: u64) -> Self {
        TestMemory {
            words: (0..bytes / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> TestMemory {
        TestMemory {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::SeqCst)))
                .collect(),
        }
    }

    /// The index and values of the words that differ from `other`'s.
    pub fn diff(&self, other: &TestMemory) -> Vec<(usize, u64, u64)> {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .map(|(i, (a, b))| (i, a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)))
            .filter(|&(_, a, b)| a != b)
            .collect()
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
        let end = addr.checked_add(len as u64);
        match end {
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
