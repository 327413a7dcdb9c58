//! A [`RegisterFile`] several threads access: software writes and hardware events under
//! one lock, and reads of the registers software polls (VER, CAP, ECAP, GSTS, IQH, IQT,
//! ICS, PQH, PQT, PRS: §10.4) without it.
//!
//! Reading a register has no side effect in VT-d (§10.4: only writes act), so a read
//! needs the lock only to see a consistent register file. The polled registers are
//! copied, when a holder that could have changed them lets the lock go, into atomic words
//! under a sequence counter (a seqlock whose one writer at a time is the lock holder: no
//! read-modify-write on either side). A read of one of them is a load between two loads of
//! the counter; a read that finds a copy in progress twice takes the lock, as every other
//! read does.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::layout::offset;
use super::{RegError, RegisterFile, VERSION};

/// The registers read without the lock whose value changes: offset and width, in the
/// order of [`SharedRegisterFile::polled`] (and of [`polled_slot`]).
const POLLED: [(u64, usize); 7] = [
    (offset::GSTS, 4),
    (offset::IQH, 8),
    (offset::IQT, 8),
    (offset::ICS, 4),
    (offset::PQH, 8),
    (offset::PQT, 8),
    (offset::PRS, 4),
];

/// The index in [`POLLED`] of the register a read of `size` bytes at `offset` reads
/// whole, if it is one (a match: a few compares rather than a scan).
#[inline]
fn polled_slot(offset: u64, size: usize) -> Option<usize> {
    match (offset, size) {
        (offset::GSTS, 4) => Some(0),
        (offset::IQH, 8) => Some(1),
        (offset::IQT, 8) => Some(2),
        (offset::ICS, 4) => Some(3),
        (offset::PQH, 8) => Some(4),
        (offset::PQT, 8) => Some(5),
        (offset::PRS, 4) => Some(6),
        _ => None,
    }
}

/// Optimistic tries of a polled read before it takes the lock.
const TRIES: usize = 2;

/// A [`RegisterFile`] behind a lock, with the polled registers readable without it.
#[derive(Debug)]
pub struct SharedRegisterFile {
    file: Mutex<RegisterFile>,
    /// Even when the words below are whole; odd while a lock holder copies them.
    seq: AtomicU64,
    /// The [`POLLED`] registers as the last lock holder that could change them left them.
    polled: [AtomicU64; POLLED.len()],
    cap: u64,
    ecap: u64,
    size: u64,
}

/// The register file, locked; the polled registers are republished when it is dropped
/// after a mutable access.
#[derive(Debug)]
pub struct RegisterGuard<'a> {
    file: MutexGuard<'a, RegisterFile>,
    shared: &'a SharedRegisterFile,
    changed: bool,
}

impl SharedRegisterFile {
    /// Shares `file`.
    pub fn new(file: RegisterFile) -> Self {
        let shared = SharedRegisterFile {
            seq: AtomicU64::new(0),
            polled: Default::default(),
            cap: file.cap_raw,
            ecap: file.ecap_raw,
            size: file.size,
            file: Mutex::new(file),
        };
        shared.lock().changed = true;
        shared
    }

    /// Locks the register file. A holder that panicked left it whole (every register
    /// update is complete before the next can panic), so a poisoned lock is taken over.
    #[inline]
    pub fn lock(&self) -> RegisterGuard<'_> {
        RegisterGuard {
            file: self.file.lock().unwrap_or_else(PoisonError::into_inner),
            shared: self,
            changed: false,
        }
    }

    /// Size of the register page in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `size` (4 or 8) bytes at `offset`, as [`RegisterFile::read`] does: a polled
    /// register read with its own width, or VER, CAP or ECAP, without the lock.
    #[inline]
    pub fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        match (offset, size) {
            (offset::VER, 4) => return Ok(VERSION),
            (offset::CAP, 8) => return Ok(self.cap),
            (offset::ECAP, 8) => return Ok(self.ecap),
            _ => {}
        }
        if let Some(slot) = polled_slot(offset, size) {
            for _ in 0..TRIES {
                // Acquire: pairs with the Release store that ended the copy read, so what
                // that holder did before letting the lock go (a descriptor written before
                // PQT moved, the status writes before IQH moved) is seen after this read,
                // as a read under the lock would see it.
                let seq = self.seq.load(Ordering::Acquire);
                if seq & 1 == 0 {
                    // Relaxed: the counter loads around it decide whether it is used.
                    let value = self.polled[slot].load(Ordering::Relaxed);
                    // Acquire fence: if the load above saw a store of a copy begun after
                    // `seq`, the counter's odd store before it is seen by the load below.
                    fence(Ordering::Acquire);
                    if self.seq.load(Ordering::Relaxed) == seq {
                        return Ok(value);
                    }
                }
                std::hint::spin_loop();
            }
        }
        self.read_locked(offset, size)
    }

    /// A read under the lock: of a register not polled, or after a copy got in the way.
    #[inline(never)]
    fn read_locked(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.lock().read(offset, size)
    }

    /// Copies the polled registers from `file`, which the caller has locked. Out of line:
    /// one copy of it for every lock site, for the instruction cache.
    #[inline(never)]
    fn publish(&self, file: &RegisterFile) {
        let qi = if file.ecap.qi { u64::MAX } else { 0 };
        let prs = if file.ecap.prs { u64::MAX } else { 0 };
        // Registers of a capability the unit lacks are reserved and read 0.
        let values = [
            file.gsts as u64,
            file.iqh & qi,
            file.iqt & qi,
            file.ics as u64 & qi,
            file.pqh & prs,
            file.pqt & prs,
            file.prs as u64 & prs,
        ];
        // The lock holder is the only writer of the counter: a load and two stores.
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        // Release fence: a reader whose load sees one of the stores below sees the odd
        // counter too, and retries.
        fence(Ordering::Release);
        for (word, value) in self.polled.iter().zip(values) {
            word.store(value, Ordering::Relaxed);
        }
        // Release: the words, and what the holder did before, for the reader that sees
        // the even counter.
        self.seq.store(seq + 2, Ordering::Release);
    }
}

impl Deref for RegisterGuard<'_> {
    type Target = RegisterFile;

    #[inline]
    fn deref(&self) -> &RegisterFile {
        &self.file
    }
}

impl DerefMut for RegisterGuard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut RegisterFile {
        self.changed = true;
        &mut self.file
    }
}

impl Drop for RegisterGuard<'_> {
    /// Publishes the polled registers before the lock is let go (the fields drop after
    /// this), so the next holder's copy follows this one.
    #[inline]
    fn drop(&mut self) {
        if self.changed {
            self.shared.publish(&self.file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{gcmd, pq};
    use super::super::{Cap, Ecap, RegEffects};
    use super::*;

    fn caps(qi: bool, prs: bool) -> (Cap, Ecap) {
        let cap = Cap {
            nd: 6,
            sagaw: 0b100,
            mgaw: 47,
            fro: 0x22,
            nfr: 3,
            ..Cap::default()
        };
        let ecap = Ecap {
            qi,
            prs,
            iro: 0xf,
            smts: true,
            pasid: prs,
            pss: if prs { 19 } else { 0 },
            srs: prs,
            ..Ecap::default()
        };
        (cap, ecap)
    }

    fn shared(qi: bool, prs: bool) -> SharedRegisterFile {
        let (cap, ecap) = caps(qi, prs);
        SharedRegisterFile::new(RegisterFile::new(cap, ecap).unwrap())
    }

    fn write(regs: &SharedRegisterFile, offset: u64, size: usize, value: u64) {
        regs.lock()
            .write(offset, size, value, &mut RegEffects::new())
            .unwrap();
    }

    /// Every register read without the lock reads what the locked file reads, after each
    /// step of a sequence that changes all of them (software writes and hardware events).
    fn assert_reads_agree(regs: &SharedRegisterFile, step: &str) {
        let fixed = [(offset::VER, 4), (offset::CAP, 8), (offset::ECAP, 8)];
        for (offset, size) in fixed.into_iter().chain(POLLED) {
            let locked = regs.lock().read(offset, size).unwrap();
            assert_eq!(
                regs.read(offset, size).unwrap(),
                locked,
                "{offset:#x}/{size} after {step}"
            );
        }
    }

    #[test]
    fn polled_slots_follow_the_table() {
        for (slot, &(offset, size)) in POLLED.iter().enumerate() {
            assert_eq!(polled_slot(offset, size), Some(slot));
        }
        assert_eq!(polled_slot(offset::PQT, 4), None);
    }

    #[test]
    fn lock_free_reads_equal_locked_reads() {
        for (qi, prs) in [(true, true), (true, false), (false, true), (false, false)] {
            let regs = shared(qi, prs);
            assert_reads_agree(&regs, "reset");
            write(&regs, offset::IQA, 8, 0x10_0000);
            write(&regs, offset::GCMD, 4, gcmd::QIE.into());
            assert_reads_agree(&regs, "QI enabled");
            write(&regs, offset::IQT, 8, 0x40);
            assert_reads_agree(&regs, "IQT written");
            regs.lock().advance_iqh_by(3);
            let _ = regs.lock().set_iwc();
            assert_reads_agree(&regs, "IQH moved, ICS.IWC set");
            write(&regs, offset::ICS, 4, 1);
            write(&regs, offset::PQA, 8, 0x20_0000);
            write(&regs, offset::PQH, 8, 0x60);
            write(&regs, offset::PQT, 8, 0x60);
            assert_reads_agree(&regs, "page request queue set up");
            let _ = regs.lock().pq_advance_tail();
            assert_reads_agree(&regs, "PQT moved, PRS.PPR set");
            let _ = regs.lock().pq_overflow();
            write(&regs, offset::PRS, 4, pq::PPR.into());
            assert_reads_agree(&regs, "PRS.PPR cleared, PRO set");
            assert_eq!(
                regs.read(offset::PQT, 8).unwrap(),
                if prs { 0x80 } else { 0 }
            );
            assert_eq!(
                regs.read(offset::IQH, 8).unwrap(),
                if qi { 0x30 } else { 0 }
            );
            // Accesses the lock-free path does not serve, and refused ones, as before.
            assert_eq!(regs.read(offset::PQT, 4), regs.lock().read(offset::PQT, 4));
            assert_eq!(
                regs.read(offset::PRS, 8),
                Err(RegError::Unaligned {
                    offset: offset::PRS,
                    size: 8
                })
            );
            assert_eq!(regs.read(offset::PQH, 2), Err(RegError::Width(2)));
        }
    }

    /// A read that finds a copy in progress (an odd counter) does not use the words being
    /// copied: it takes the lock and reads the register file.
    #[test]
    fn a_copy_in_progress_is_not_read() {
        let regs = shared(true, true);
        write(&regs, offset::PQA, 8, 0x20_0000);
        write(&regs, offset::PQT, 8, 0x40);
        let slot = polled_slot(offset::PQT, 8).unwrap();
        // What a holder preempted halfway through its copy leaves.
        let seq = regs.seq.load(Ordering::Relaxed);
        regs.seq.store(seq + 1, Ordering::Relaxed);
        regs.polled[slot].store(0x1000, Ordering::Relaxed);
        assert_eq!(regs.read(offset::PQT, 8).unwrap(), 0x40);
        // The holder's copy ends; the next holder that changes the file copies it again.
        regs.seq.store(seq + 2, Ordering::Release);
        write(&regs, offset::PQT, 8, 0x60);
        assert_eq!(regs.read(offset::PQT, 8).unwrap(), 0x60);
        assert_eq!(regs.seq.load(Ordering::Relaxed), seq + 4);
    }
}
