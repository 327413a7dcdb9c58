//! The TLB (IHI 0070 §16.2): leaf translations tagged by VMID and, for stage 1, ASID;
//! stage-1-only, stage-2-only and nested (combined stage-1 + stage-2) entries. A stage-1
//! leaf with nG = 0 is global: its entry has no ASID and serves every ASID of the VMID
//! (Arm ARM D8, global entries). The CMD_TLBI_* scopes (§4.4):
//!
//! - NH_VA: stage-1 and nested entries of the VMID covering the address that are global
//!   or of the ASID (with a range operand, IDR3.RIL, every entry overlapping the range;
//!   with a nonzero TTL only entries of that level);
//! - NH_VAA: the same for every ASID of the VMID;
//! - NH_ASID: every non-global stage-1 and nested entry of the VMID and ASID (global
//!   entries survive it);
//! - NH_ALL: every stage-1 and nested entry of the VMID;
//! - S2_IPA: stage-2-only entries of the VMID covering the IPA. Nested entries survive, as
//!   the spec allows: software follows S2_IPA with NH_ALL or S12_VMALL;
//! - S12_VMALL: every entry of the VMID; NSNH_ALL: every entry.
//!
//! NH_VA and S2_IPA look up the pages their operand names, for each page size cached,
//! when that is fewer lookups than the entries cached, rather than scanning every entry.
//!
//! The TLB holds leaf entries only, so a Leaf hint removes the same entries as none. No
//! EL2 entries are ever created (STRW EL2 is not modelled), so CMD_TLBI_EL2_* remove
//! nothing.

use std::collections::HashMap;

use vsva_smmuv3::{cmd::Cmd, cmd::TlbiAddr, walk::PageSize, walk::Translation};

/// What a TLB entry translates, and its ASID when stage 1 does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbTag {
    /// Stage 1 only (STE.Config S1Trans): VA to PA.
    Stage1 {
        /// The CD's ASID.
        asid: u16,
    },
    /// Stage 2 only (S2Trans, or nested with S1DSS bypass): IPA to PA.
    Stage2,
    /// Both stages combined: VA to PA.
    Nested {
        /// The CD's ASID.
        asid: u16,
    },
}

impl TlbTag {
    pub(super) fn asid(self) -> Option<u16> {
        match self {
            TlbTag::Stage1 { asid } | TlbTag::Nested { asid } => Some(asid),
            TlbTag::Stage2 => None,
        }
    }
}

/// What stage translated an entry, without its ASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Stage1,
    Stage2,
    Nested,
}

/// A TLB lookup key: the tags (no ASID for a global or stage-2 entry), the privilege of
/// the access walked, and the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    vmid: u16,
    kind: Kind,
    asid: Option<u16>,
    privileged: bool,
    page: u64,
    size: PageSize,
}

impl Key {
    fn new(
        vmid: u16,
        tag: TlbTag,
        global: bool,
        privileged: bool,
        page: u64,
        size: PageSize,
    ) -> Key {
        let kind = match tag {
            TlbTag::Stage1 { .. } => Kind::Stage1,
            TlbTag::Stage2 => Kind::Stage2,
            TlbTag::Nested { .. } => Kind::Nested,
        };
        Key {
            vmid,
            kind,
            asid: if global { None } else { tag.asid() },
            privileged,
            page,
            size,
        }
    }
}

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// VMID tag (STE.S2VMID).
    pub vmid: u16,
    /// Stage tag and ASID.
    pub tag: TlbTag,
    /// The privilege of the access the entry was walked for (its rights are for that
    /// privilege).
    pub privileged: bool,
    /// The input page base.
    pub page: u64,
    /// The translation of the page's first byte (`global`: the entry serves every ASID).
    pub translation: Translation,
}

impl TlbEntry {
    /// The output address of `addr` in the page.
    pub fn output(&self, addr: u64) -> u64 {
        self.translation.page_base() | (addr & (self.translation.page_size.bytes() - 1))
    }

    fn covers(&self, addr: u64) -> bool {
        addr & !(self.translation.page_size.bytes() - 1) == self.page
    }

    /// Whether an address operand names this entry: TG 0 names the page holding the
    /// address; a nonzero TG (IDR3.RIL) names the range of (NUM + 1) * 2^SCALE
    /// granules from the address, and a nonzero TTL only leaves of that level (§4.4.1).
    fn matches(&self, a: &TlbiAddr) -> bool {
        let Some(end) = super::walkcache::operand_end(a) else {
            return self.covers(a.addr);
        };
        if a.ttl != 0 && a.ttl != self.translation.page_size.level() {
            return false;
        }
        let entry_end = self.page + self.translation.page_size.bytes();
        self.page < end && a.addr < entry_end
    }
}

/// The TLB.
#[derive(Debug, Default)]
pub struct Tlb {
    entries: HashMap<Key, TlbEntry>,
    /// The (page size, global) pairs ever inserted, bit `2 * size index + global`: a
    /// lookup probes only those.
    present: u16,
}

/// The bit of `present` for entries of `size`, global or not.
fn present_bit(size: PageSize, global: bool) -> u16 {
    let i = PageSize::ALL.iter().position(|&s| s == size).unwrap_or(0);
    1 << (2 * i + global as usize)
}

impl Tlb {
    /// The entry translating `addr` under these tags, if cached: the ASID's own entry, or a
    /// global one.
    pub fn lookup(&self, vmid: u16, tag: TlbTag, privileged: bool, addr: u64) -> Option<TlbEntry> {
        let globals: &[bool] = if tag.asid().is_some() {
            &[false, true]
        } else {
            &[false]
        };
        PageSize::ALL.iter().find_map(|&size| {
            globals.iter().find_map(|&global| {
                if self.present & present_bit(size, global) == 0 {
                    return None;
                }
                let page = addr & !(size.bytes() - 1);
                let key = Key::new(vmid, tag, global, privileged, page, size);
                self.entries.get(&key).copied()
            })
        })
    }

    /// Caches the translation of `addr`.
    pub fn insert(&mut self, vmid: u16, tag: TlbTag, privileged: bool, addr: u64, t: Translation) {
        let size = t.page_size;
        let page = addr & !(size.bytes() - 1);
        let translation = Translation {
            output: t.page_base(),
            ..t
        };
        let entry = TlbEntry {
            vmid,
            tag,
            privileged,
            page,
            translation,
        };
        let global = t.global && tag.asid().is_some();
        self.present |= present_bit(size, global);
        let key = Key::new(vmid, tag, global, privileged, page, size);
        self.entries.insert(key, entry);
    }

    /// Drops the entry `e` (strict mode replaces a stale entry it re-walked).
    pub fn remove(&mut self, e: &TlbEntry) {
        let global = e.translation.global && e.tag.asid().is_some();
        let size = e.translation.page_size;
        self.entries
            .remove(&Key::new(e.vmid, e.tag, global, e.privileged, e.page, size));
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Number of entries tagged with `vmid`.
    pub fn len_of_vmid(&self, vmid: u16) -> usize {
        self.entries.values().filter(|e| e.vmid == vmid).count()
    }

    /// Whether the TLB is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes the entries `select` accepts among `vmid`'s entries of `tags` (stage and
    /// ASID key, `None` for global or stage-2 entries) that the address operand `a` names,
    /// as [`TlbEntry::matches`] does: looked up page by page, for each page size cached,
    /// when that is fewer lookups than the entries cached, else by a scan. `select` must
    /// accept only entries `a` names.
    fn remove_named(
        &mut self,
        vmid: u16,
        tags: &[(Kind, Option<u16>)],
        a: &TlbiAddr,
        select: impl Fn(&Key, &TlbEntry) -> bool,
    ) {
        let end = super::walkcache::operand_end(a);
        // The first and last page numbers of `size` the operand names.
        let pages = |size: PageSize| {
            let last = end.map_or(a.addr, |e| e - 1);
            (a.addr >> size.shift(), last >> size.shift())
        };
        let present = self.present;
        let cached = move |size: PageSize, &(kind, asid): &(Kind, Option<u16>)| {
            present & present_bit(size, kind != Kind::Stage2 && asid.is_none()) != 0
        };
        let lookups = PageSize::ALL
            .iter()
            .flat_map(|&size| {
                let (first, last) = pages(size);
                let n = (last - first).saturating_add(1).saturating_mul(2);
                tags.iter().filter(move |t| cached(size, t)).map(move |_| n)
            })
            .fold(0u64, u64::saturating_add);
        if lookups >= self.entries.len() as u64 {
            self.entries.retain(|k, e| !select(k, e));
            return;
        }
        for size in PageSize::ALL {
            let (first, last) = pages(size);
            for &(kind, asid) in tags.iter().filter(|t| cached(size, t)) {
                for page in first..=last {
                    for privileged in [false, true] {
                        let key = Key {
                            vmid,
                            kind,
                            asid,
                            privileged,
                            page: page << size.shift(),
                            size,
                        };
                        if self.entries.get(&key).is_some_and(|e| select(&key, e)) {
                            self.entries.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// Applies a CMD_TLBI_* command; other commands change nothing. Returns how many
    /// entries it removed.
    pub fn invalidate(&mut self, cmd: &Cmd) -> usize {
        let before = self.entries.len();
        let stage1 = |e: &TlbEntry| e.tag.asid().is_some();
        match *cmd {
            Cmd::TlbiNhVa { vmid, asid, addr } => self.remove_named(
                vmid,
                &[
                    (Kind::Stage1, Some(asid)),
                    (Kind::Stage1, None),
                    (Kind::Nested, Some(asid)),
                    (Kind::Nested, None),
                ],
                &addr,
                |k, e| {
                    e.vmid == vmid
                        && stage1(e)
                        && (k.asid.is_none() || k.asid == Some(asid))
                        && e.matches(&addr)
                },
            ),
            Cmd::TlbiNhVaa { vmid, addr } => self
                .entries
                .retain(|_, e| !(e.vmid == vmid && stage1(e) && e.matches(&addr))),
            Cmd::TlbiNhAsid { vmid, asid } => self
                .entries
                .retain(|k, e| !(e.vmid == vmid && k.asid == Some(asid))),
            Cmd::TlbiNhAll { vmid } => self.entries.retain(|_, e| !(e.vmid == vmid && stage1(e))),
            Cmd::TlbiS2Ipa { vmid, addr } => {
                self.remove_named(vmid, &[(Kind::Stage2, None)], &addr, |k, e| {
                    e.vmid == vmid && k.kind == Kind::Stage2 && e.matches(&addr)
                })
            }
            Cmd::TlbiS12Vmall { vmid } => self.entries.retain(|_, e| e.vmid != vmid),
            Cmd::TlbiNsnhAll => self.entries.clear(),
            _ => {}
        }
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vsva_smmuv3::walk::Permissions;

    /// One step of the equivalence property.
    #[derive(Clone, Debug)]
    enum Step {
        Insert {
            vmid: u16,
            tag: TlbTag,
            privileged: bool,
            addr: u64,
            size: PageSize,
            global: bool,
        },
        Invalidate(Cmd),
    }

    /// Addresses of a few 4-KiB pages inside two 2-MiB blocks inside two 1-GiB blocks.
    fn addr() -> impl Strategy<Value = u64> {
        (0u64..2, 0u64..2, 0u64..8).prop_map(|(g, m, p)| g << 30 | m << 21 | p << 12)
    }

    fn operand() -> impl Strategy<Value = TlbiAddr> {
        let range = prop_oneof![
            Just((0u8, 0u8, 0u8, 0u8)),
            (0u8..4, 1u8..4, 0u8..4, 0u8..10),
        ];
        (addr(), any::<bool>(), range).prop_map(|(addr, leaf, (ttl, tg, num, scale))| TlbiAddr {
            addr,
            leaf,
            ttl,
            tg,
            num,
            scale,
        })
    }

    fn step() -> impl Strategy<Value = Step> {
        let tag = prop_oneof![
            (0u16..3).prop_map(|asid| TlbTag::Stage1 { asid }),
            Just(TlbTag::Stage2),
            (0u16..3).prop_map(|asid| TlbTag::Nested { asid }),
        ];
        let size = prop_oneof![
            Just(PageSize::Size4K),
            Just(PageSize::Size2M),
            Just(PageSize::Size1G)
        ];
        let insert = (0u16..2, tag, any::<bool>(), addr(), size, any::<bool>()).prop_map(
            |(vmid, tag, privileged, addr, size, global)| Step::Insert {
                vmid,
                tag,
                privileged,
                addr,
                size,
                global,
            },
        );
        let cmd = prop_oneof![
            (0u16..2, 0u16..3, operand()).prop_map(|(vmid, asid, addr)| Cmd::TlbiNhVa {
                vmid,
                asid,
                addr
            }),
            (0u16..2, operand()).prop_map(|(vmid, addr)| Cmd::TlbiS2Ipa { vmid, addr }),
        ];
        prop_oneof![6 => insert, 1 => cmd.prop_map(Step::Invalidate)]
    }

    /// The reference: the command's rule (IHI 0070 §4.4) applied to every entry.
    fn scan(tlb: &mut Tlb, cmd: &Cmd) -> usize {
        let before = tlb.entries.len();
        match *cmd {
            Cmd::TlbiNhVa { vmid, asid, addr } => tlb.entries.retain(|k, e| {
                !(e.vmid == vmid
                    && k.kind != Kind::Stage2
                    && (k.asid.is_none() || k.asid == Some(asid))
                    && e.matches(&addr))
            }),
            Cmd::TlbiS2Ipa { vmid, addr } => tlb
                .entries
                .retain(|k, e| !(e.vmid == vmid && k.kind == Kind::Stage2 && e.matches(&addr))),
            _ => unreachable!("only NH_VA and S2_IPA are generated"),
        }
        before - tlb.entries.len()
    }

    proptest! {
        /// For arbitrary fills and TLBI_NH_VA / TLBI_S2_IPA commands (one page, or a
        /// range with TTL), looking the named pages up removes exactly what a scan of
        /// every entry with the command's rule removes.
        #[test]
        fn address_invalidations_remove_what_a_scan_removes(
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let (mut tlb, mut reference) = (Tlb::default(), Tlb::default());
            for s in steps {
                match s {
                    Step::Insert { vmid, tag, privileged, addr, size, global } => {
                        let t = Translation {
                            output: 0x8000_0000 | addr,
                            page_size: size,
                            perms: Permissions::ALL,
                            dirty: true,
                            global: global && tag.asid().is_some(),
                        };
                        tlb.insert(vmid, tag, privileged, addr, t);
                        reference.insert(vmid, tag, privileged, addr, t);
                    }
                    Step::Invalidate(cmd) => {
                        prop_assert_eq!(tlb.invalidate(&cmd), scan(&mut reference, &cmd));
                        prop_assert_eq!(&tlb.entries, &reference.entries);
                    }
                }
            }
        }
    }
}
