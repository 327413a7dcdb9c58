//! Stalled transactions (IHI 0070 §3.12.2, the stall fault model): a transaction whose
//! translation fault the stream's configuration stalls (stage 1: CD.S with STE.S1STALLD
//! clear; stage 2: STE.S2S) is held, its fault record written with Stall = 1 and a STAG,
//! until CMD_RESUME (§4.7.2) retries or terminates it, or CMD_STALL_TERM (§4.7.3)
//! terminates every stalled transaction of its stream.
//!
//! A stalled transaction waits on its own [`Stalled`] slot, never on the SMMU's state
//! lock: other streams translate, and software issues commands, while it waits. Whoever
//! removes a transaction from the [`StallTable`] (under the state lock) resolves it, so a
//! transaction is resolved exactly once.
//!
//! Bounds: at most a configured number of transactions are stalled at once (a STAG is 16
//! bits); a fault beyond it, or whose stall record cannot be written to the event queue,
//! is terminated instead (vsva's choice where the spec lets an implementation run out of
//! stall resources). A stalled transaction that no command resolves within the
//! configured time is terminated: a model guard so that a device thread never waits
//! forever on software that went away.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What becomes of a stalled transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// CMD_RESUME Action RETRY: translate it again.
    Retry,
    /// CMD_RESUME ABORT or TERMINATE, CMD_STALL_TERM, a change of the stream's STE,
    /// SMMUEN cleared, or the model's timeout: the device gets an abort.
    Terminate,
}

/// One stalled transaction's wait.
#[derive(Debug, Default)]
pub(super) struct Stalled {
    outcome: Mutex<Option<Outcome>>,
    resolved: Condvar,
}

impl Stalled {
    /// Resolves the transaction with `outcome` unless it was resolved already; whether
    /// this call resolved it.
    pub(super) fn resolve(&self, outcome: Outcome) -> bool {
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if o.is_some() {
            return false;
        }
        *o = Some(outcome);
        self.resolved.notify_all();
        true
    }

    /// The outcome, waiting up to `timeout` for it; `None` when nothing resolved the
    /// transaction in that time.
    pub(super) fn wait(&self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = *o {
                return Some(outcome);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            o = self
                .resolved
                .wait_timeout(o, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The outcome, if resolved.
    pub(super) fn outcome(&self) -> Option<Outcome> {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The stalled transactions, by (StreamID, STAG).
#[derive(Debug, Default)]
pub(super) struct StallTable {
    held: HashMap<(u32, u16), Arc<Stalled>>,
    next_stag: u16,
}

impl StallTable {
    /// Holds a new stalled transaction of `sid` and returns its STAG and slot; `None` when
    /// `limit` transactions are stalled already.
    pub(super) fn hold(&mut self, sid: u32, limit: usize) -> Option<(u16, Arc<Stalled>)> {
        if self.held.len() >= limit.min(1 << 16) {
            return None;
        }
        // Fewer than 2^16 are held, so a free STAG is found within 2^16 steps.
        let stag = loop {
            let stag = self.next_stag;
            self.next_stag = self.next_stag.wrapping_add(1);
            if !self.held.contains_key(&(sid, stag)) {
                break stag;
            }
        };
        let slot = Arc::new(Stalled::default());
        self.held.insert((sid, stag), slot.clone());
        Some((stag, slot))
    }

    /// CMD_RESUME: resolves the transaction `stag` of `sid` with `outcome`; false (and
    /// nothing changes) when no such transaction is stalled, as the spec has a resume of
    /// an unknown STAG ignored.
    pub(super) fn resume(&mut self, sid: u32, stag: u16, outcome: Outcome) -> bool {
        match self.held.remove(&(sid, stag)) {
            Some(slot) => slot.resolve(outcome),
            None => false,
        }
    }

    /// Terminates every stalled transaction of a stream `sids` selects; how many.
    pub(super) fn terminate_where(&mut self, sids: impl Fn(u32) -> bool) -> usize {
        let mut n = 0;
        self.held.retain(|&(sid, _), slot| {
            let keep = !sids(sid);
            if !keep && slot.resolve(Outcome::Terminate) {
                n += 1;
            }
            keep
        });
        n
    }

    /// Removes the transaction `stag` of `sid` if `slot` is still it (its wait timed
    /// out); the caller then resolves the slot.
    pub(super) fn release(&mut self, sid: u32, stag: u16, slot: &Arc<Stalled>) {
        if self
            .held
            .get(&(sid, stag))
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            self.held.remove(&(sid, stag));
        }
    }

    /// Number of stalled transactions.
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Number of stalled transactions of `sid`.
    pub(super) fn of_stream(&self, sid: u32) -> usize {
        self.held.keys().filter(|(s, _)| *s == sid).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Fault(u32),
        Resume(u32, u16, bool),
        ResumeNth(usize, bool),
        StallTerm(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..4).prop_map(Op::Fault),
            1 => (0u32..4, 0u16..8, any::<bool>()).prop_map(|(s, t, r)| Op::Resume(s, t, r)),
            3 => (0usize..16, any::<bool>()).prop_map(|(i, r)| Op::ResumeNth(i, r)),
            1 => (0u32..4).prop_map(Op::StallTerm),
        ]
    }

    proptest! {
        /// Any sequence of faults, resumes (of held and of unknown STAGs) and
        /// CMD_STALL_TERMs resolves each transaction at most once, with the outcome of the
        /// first command that named it; STAGs held at once are unique per stream; after a
        /// STALL_TERM of every stream nothing is held and every transaction is resolved.
        #[test]
        fn every_stalled_transaction_is_resolved_exactly_once(
            ops in proptest::collection::vec(op(), 1..64),
            limit in 1usize..12,
        ) {
            let mut table = StallTable::default();
            // Every transaction ever held: (sid, stag, slot, expected outcome).
            let mut all: Vec<(u32, u16, Arc<Stalled>, Option<Outcome>)> = Vec::new();
            let outcome = |retry: bool| if retry { Outcome::Retry } else { Outcome::Terminate };
            for op in ops {
                match op {
                    Op::Fault(sid) => {
                        let held = all.iter().filter(|t| t.3.is_none()).count();
                        match table.hold(sid, limit) {
                            Some((stag, slot)) => {
                                prop_assert!(held < limit);
                                prop_assert!(!all.iter().any(|t| t.3.is_none() && t.0 == sid && t.1 == stag));
                                all.push((sid, stag, slot, None));
                            }
                            None => prop_assert_eq!(held, limit),
                        }
                    }
                    Op::Resume(..) | Op::ResumeNth(..) => {
                        let (sid, stag, retry) = match op {
                            Op::Resume(sid, stag, retry) => (sid, stag, retry),
                            Op::ResumeNth(i, retry) if !all.is_empty() => {
                                let t = &all[i % all.len()];
                                (t.0, t.1, retry)
                            }
                            _ => continue,
                        };
                        let live = all.iter_mut().find(|t| t.3.is_none() && t.0 == sid && t.1 == stag);
                        let expect = live.is_some();
                        if let Some(t) = live {
                            t.3 = Some(outcome(retry));
                        }
                        prop_assert_eq!(table.resume(sid, stag, outcome(retry)), expect);
                    }
                    Op::StallTerm(sid) => {
                        let mut n = 0;
                        for t in all.iter_mut().filter(|t| t.3.is_none() && t.0 == sid) {
                            t.3 = Some(Outcome::Terminate);
                            n += 1;
                        }
                        prop_assert_eq!(table.terminate_where(|s| s == sid), n);
                        prop_assert_eq!(table.of_stream(sid), 0);
                    }
                }
                prop_assert_eq!(table.len(), all.iter().filter(|t| t.3.is_none()).count());
                for t in &all {
                    prop_assert_eq!(t.2.outcome(), t.3);
                }
            }
            for sid in 0..4 {
                table.terminate_where(|s| s == sid);
            }
            prop_assert_eq!(table.len(), 0);
            for t in &all {
                // A second resolution changes nothing.
                prop_assert!(!t.2.resolve(Outcome::Retry));
                prop_assert_eq!(t.2.outcome(), Some(t.3.unwrap_or(Outcome::Terminate)));
            }
        }
    }

    #[test]
    fn a_wait_returns_the_outcome_or_times_out() {
        let slot = Arc::new(Stalled::default());
        assert_eq!(slot.wait(Duration::from_millis(1)), None);
        let s = slot.clone();
        let waiter = std::thread::spawn(move || s.wait(Duration::from_secs(60)));
        assert!(slot.resolve(Outcome::Retry));
        assert!(!slot.resolve(Outcome::Terminate));
        assert_eq!(waiter.join().unwrap(), Some(Outcome::Retry));
    }

    #[test]
    fn a_timed_out_transaction_is_released_only_if_still_held() {
        let mut table = StallTable::default();
        let (stag, slot) = table.hold(7, 4).unwrap();
        let other = Arc::new(Stalled::default());
        table.release(7, stag, &other);
        assert_eq!(table.len(), 1);
        table.release(7, stag, &slot);
        assert_eq!(table.len(), 0);
        assert!(!table.resume(7, stag, Outcome::Retry));
    }
}
