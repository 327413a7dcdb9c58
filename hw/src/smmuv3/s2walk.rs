//! Stage-2 walks through the stage-2 walk cache: the IPA of a stage-2-only stream, and in
//! nested translation every L1CD and CD fetch, every stage-1 table address and the final IPA
//! (IHI 0070 §3.3, §16.2).
//! Each walk starts from the deepest table the cache knows for its IPA and caches the
//! tables it reads below that. In strict mode a walk from a cached table is checked against
//! a walk from S2TTB; a difference is a stale entry that CMD_TLBI_S2_IPA without the Leaf
//! hint should have removed.

use vsva_mem::PhysMem;
use vsva_smmuv3::{
    walk::AccessRequest, walk::NestedStage, walk::S1Stage, walk::S2Config, walk::S2Start,
    walk::Stage, walk::Translation, walk::WalkFault, walk::WalkObserver, walk::WalkStep,
};

use super::stale::outcome;
use super::walkcache::{S2WalkCache, TableSteps};
use crate::memory::ReadOnly;
use vsva_smmuv3::explain::Fresh;

/// What a stage-2 walk translates.
#[derive(Clone, Copy, Debug)]
enum S2Use {
    /// A stage-1 descriptor: a read, or with `write` a hardware update (CLASS TT).
    Table { write: bool },
    /// The transaction's IPA with its access (CLASS IN).
    Input(AccessRequest),
    /// An L1CD or CD fetch (a read, CLASS CD).
    CdFetch,
}

/// A walk from a cached table that a walk from S2TTB contradicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct S2Stale {
    /// The IPA walked.
    pub ipa: u64,
    /// The cached start: the table's level and address.
    pub start: S2Start,
    /// What the walk from the cached start gave.
    pub cached: Fresh,
    /// What a walk from the top gives.
    pub now: Fresh,
}

/// The stage-2 walks of one transaction under `vmid`, through `cache`.
pub(super) struct CachedS2<'a, M: ?Sized> {
    mem: &'a M,
    s2: &'a S2Config,
    vmid: u16,
    cache: &'a mut S2WalkCache,
    strict: bool,
    /// Strict mode's findings, in walk order.
    pub stale: Vec<S2Stale>,
}

/// Reports each step to two observers.
struct Both<'a, A: ?Sized, B: ?Sized>(&'a mut A, &'a mut B);

impl<A: WalkObserver + ?Sized, B: WalkObserver + ?Sized> WalkObserver for Both<'_, A, B> {
    fn step(&mut self, step: WalkStep) {
        self.0.step(step);
        self.1.step(step);
    }
}

impl<'a, M: PhysMem + ?Sized> CachedS2<'a, M> {
    /// The walks of `s2` in `mem` under `vmid`, checked against the tables when `strict`.
    pub(super) fn new(
        mem: &'a M,
        s2: &'a S2Config,
        vmid: u16,
        cache: &'a mut S2WalkCache,
        strict: bool,
    ) -> Self {
        CachedS2 {
            mem,
            s2,
            vmid,
            cache,
            strict,
            stale: Vec::new(),
        }
    }

    /// The translation of the transaction's own IPA `ipa` for `access` (a stage-2-only
    /// stream), as `walk_stage2` gives it.
    pub(super) fn translate<O: WalkObserver + ?Sized>(
        &mut self,
        ipa: u64,
        access: AccessRequest,
        obs: &mut O,
    ) -> Result<Translation, WalkFault> {
        self.walk(ipa, S2Use::Input(access), ipa, obs)
    }

    /// The physical address of the L1CD or CD at IPA `ipa`, fetched for a transaction to
    /// `input`.
    pub(super) fn cd_fetch(&mut self, ipa: u64, input: u64) -> Result<u64, WalkFault> {
        self.walk(ipa, S2Use::CdFetch, input, &mut ())
            .map(|t| t.output)
    }

    fn walk<O: WalkObserver + ?Sized>(
        &mut self,
        ipa: u64,
        use_: S2Use,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault> {
        let top = S2Start::top(self.s2);
        let start = self.cache.lookup(self.vmid, self.s2, ipa).unwrap_or(top);
        let mut steps = TableSteps::new(Stage::Stage2);
        let r = walk_from(
            &NestedStage {
                mem: self.mem,
                s2: self.s2,
            },
            start,
            ipa,
            use_,
            input,
            &mut Both(obs, &mut steps),
        );
        self.cache.fill(self.vmid, self.s2, ipa, start, &steps);
        if self.strict && start != top {
            let tables = NestedStage {
                mem: &ReadOnly(self.mem),
                s2: self.s2,
            };
            let cached = outcome(&r);
            let now = outcome(&walk_from(&tables, top, ipa, use_, input, &mut ()));
            if cached != now {
                self.stale.push(S2Stale {
                    ipa,
                    start,
                    cached,
                    now,
                });
            }
        }
        r
    }
}

fn walk_from<M: PhysMem + ?Sized, O: WalkObserver + ?Sized>(
    stage: &NestedStage<'_, M>,
    start: S2Start,
    ipa: u64,
    use_: S2Use,
    input: u64,
    obs: &mut O,
) -> Result<Translation, WalkFault> {
    match use_ {
        S2Use::Table { write } => stage.descriptor_from(start, ipa, write, input, obs),
        S2Use::Input(access) => stage.output_from(start, ipa, access, input, obs),
        S2Use::CdFetch => stage.cd_fetch_from(start, ipa, input, obs),
    }
}

impl<M: PhysMem + ?Sized> S1Stage for CachedS2<'_, M> {
    fn descriptor_address<O>(
        &mut self,
        addr: u64,
        write: bool,
        input: u64,
        obs: &mut O,
    ) -> Result<u64, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        self.walk(addr, S2Use::Table { write }, input, obs)
            .map(|t| t.output)
    }

    fn output<O>(
        &mut self,
        output: u64,
        access: AccessRequest,
        input: u64,
        obs: &mut O,
    ) -> Result<Translation, WalkFault>
    where
        O: WalkObserver + ?Sized,
    {
        self.walk(output, S2Use::Input(access), input, obs)
    }
}
