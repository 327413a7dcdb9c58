//! Invalidation (VT-d §6.5.2): what each invalidation descriptor does to a remapping unit,
//! once for every unit. [`execute`] reads the descriptor and calls the unit's
//! [`InvalidationUnit`] hooks; a unit decides only how its own caches carry out each
//! invalidation (which caches it keeps, what it does beyond them).
//!
//! IOTLB and PASID-based-IOTLB invalidations also reach the paging-structure caches.
//! Context- and PASID-cache invalidations leave them alone: after changing a context or
//! PASID entry, software follows with the IOTLB or PASID-based-IOTLB invalidation that
//! removes them (§6.5.3).

use crate::addr::{DomainId, Pasid, SourceId};
use crate::inv_desc::{
    AddrRange, ContextCacheGranularity, InvDesc, IotlbGranularity, PasidCacheGranularity,
    PasidIotlbGranularity, ResponseCode,
};
use crate::regs::{InvQueue, Iqei};
use vsva_mem::{MemError, PhysMem};

/// What an IOTLB invalidation (§6.5.2.3) or PASID-based-IOTLB invalidation (§6.5.2.4)
/// removes from the IOTLB and the paging-structure caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbInvalidation {
    /// Global IOTLB invalidation: every entry.
    Global,
    /// Domain-selective IOTLB invalidation: every entry of the domain.
    Domain(DomainId),
    /// Page-selective-within-domain IOTLB invalidation: the domain's second-level and
    /// pass-through mappings that meet `range`, and every first-level and nested mapping of
    /// the domain, whatever its address (they are looked up by first-level input address,
    /// which the descriptor's address cannot select).
    DomainPages {
        /// The domain.
        did: DomainId,
        /// The input addresses (ADDR and AM).
        range: AddrRange,
        /// Invalidation hint (IH): the paging-structure caches may keep their entries.
        ih: bool,
    },
    /// PASID-selective PASID-based-IOTLB invalidation: every entry of a PASID in a domain.
    Pasid {
        /// The domain.
        did: DomainId,
        /// The PASID.
        pasid: Pasid,
    },
    /// Page-selective-within-PASID PASID-based-IOTLB invalidation.
    PasidPages {
        /// The domain.
        did: DomainId,
        /// The PASID.
        pasid: Pasid,
        /// The input addresses (ADDR and AM).
        range: AddrRange,
        /// Invalidation hint (IH): the paging-structure caches may keep their entries.
        ih: bool,
    },
}

impl IotlbInvalidation {
    /// The invalidation an IOTLB or PASID-based-IOTLB descriptor asks for; `None` for any
    /// other descriptor.
    pub const fn of(desc: &InvDesc) -> Option<Self> {
        Some(match *desc {
            InvDesc::Iotlb {
                granularity,
                did,
                addr,
                ih,
                am,
                ..
            } => match granularity {
                IotlbGranularity::Global => Self::Global,
                IotlbGranularity::DomainSelective => Self::Domain(did),
                IotlbGranularity::PageSelective => Self::DomainPages {
                    did,
                    range: AddrRange::from_address_mask(addr, am),
                    ih,
                },
            },
            InvDesc::PasidIotlb {
                granularity,
                did,
                pasid,
                addr,
                ih,
                am,
            } => match granularity {
                PasidIotlbGranularity::PasidSelective => Self::Pasid { did, pasid },
                PasidIotlbGranularity::PageSelectiveWithinPasid => Self::PasidPages {
                    did,
                    pasid,
                    range: AddrRange::from_address_mask(addr, am),
                    ih,
                },
            },
            _ => return None,
        })
    }
}

/// What a carried-out descriptor asks of the one processing the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Nothing more.
    Done,
    /// An invalidation wait that asks for a completion interrupt (IF): set ICS.IWC and
    /// signal the invalidation completion event (§6.5.2.8).
    WaitInterrupt,
}

/// A remapping unit as invalidation descriptors reach it: its caches and the devices
/// behind it. Each hook carries out one kind of invalidation.
pub trait InvalidationUnit {
    /// Where an invalidation wait writes its status.
    type Mem: PhysMem + ?Sized;

    /// The memory status writes go to.
    fn status_memory(&self) -> &Self::Mem;

    /// Context-cache invalidation (§6.5.2.1).
    fn invalidate_context_cache(
        &mut self,
        granularity: ContextCacheGranularity,
        sid: SourceId,
        fm: u8,
    );

    /// PASID-cache invalidation (§6.5.2.2).
    fn invalidate_pasid_cache(
        &mut self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
    );

    /// IOTLB or PASID-based-IOTLB invalidation, paging-structure caches included.
    fn invalidate_iotlb(&mut self, inv: IotlbInvalidation);

    /// Device-TLB invalidation (§6.5.2.5), or PASID-based device-TLB invalidation
    /// (§6.5.2.6) when `pasid` is given: an ATS invalidate request to the device `sid`
    /// for `addr` with the size bit `size`; `global` is the G bit.
    fn invalidate_device_tlb(
        &mut self,
        sid: SourceId,
        pasid: Option<Pasid>,
        global: bool,
        addr: u64,
        size: bool,
    );

    /// Page group response (§6.5.2.9; answers a page request, §7.7): the response to the page requests of
    /// group `prg_index` goes to the device `rid`.
    fn page_group_response(
        &mut self,
        rid: SourceId,
        pasid: Option<Pasid>,
        prg_index: u16,
        response: ResponseCode,
    );

    /// Before an invalidation wait completes: the descriptors before it must be complete,
    /// so no request that used a translation they removed may still be in flight (§6.5.5).
    fn drain(&mut self) {}
}

/// Reads and decodes the descriptor at `addr` of a queue of `width`-byte descriptors
/// (IQA.DW: 16 or 32 bytes; a 128-bit descriptor has its upper half zero). Scalable mode
/// (`scalable`: RTADDR.TTM = 01b) takes only 256-bit descriptors: a queue of 128-bit ones
/// reports an invalid descriptor width (§6.5.2).
pub fn fetch(
    mem: &(impl PhysMem + ?Sized),
    addr: u64,
    width: u64,
    scalable: bool,
) -> Result<InvDesc, Iqei> {
    check_width(width, scalable)?;
    // One read of the whole descriptor (a 128-bit one leaves the upper half zero).
    let mut bytes = [0u8; 32];
    let len = (width as usize).min(bytes.len());
    mem.read(addr, &mut bytes[..len])
        .map_err(|_| Iqei::FetchError)?;
    decode_fetched(&bytes[..len])
}

/// Bytes of neighbouring descriptors [`drain`] fetches in one read: 8 of 256 bits (16 of
/// 128), what a driver's submission holds (Linux's `qi_submit_sync` writes at most a few
/// descriptors and a wait). The buffer is zeroed per drain: a larger one costs a memset
/// per submission for descriptors that are not there.
pub const FETCH_BYTES: usize = 256;

/// Fetches the descriptors `queue` holds from its head up to its tail and hands each to
/// `carry_out` in order: up to [`FETCH_BYTES`] of neighbouring slots in one read (hardware
/// may fetch ahead of IQH, §6.5.2), each decoded, every reserved bit checked, before it is
/// carried out. Returns how many were carried out and the error that stopped the drain at
/// the next one (where IQH must stay). A read that fails is made again one slot at a time,
/// so that the descriptors before the slot that cannot be read are carried out.
pub fn drain(
    mem: &(impl PhysMem + ?Sized),
    queue: InvQueue,
    scalable: bool,
    mut carry_out: impl FnMut(&InvDesc) -> Result<(), Iqei>,
) -> (u64, Option<Iqei>) {
    let count = queue
        .tail
        .wrapping_add(queue.entries)
        .wrapping_sub(queue.head)
        % queue.entries;
    if let Err(iqei) = check_width(queue.desc_size, scalable) {
        return (0, (count != 0).then_some(iqei));
    }
    let size = queue.desc_size as usize;
    let mut fetched = [0u8; FETCH_BYTES];
    let mut done = 0;
    while done < count {
        let slot = queue.head.wrapping_add(done) % queue.entries;
        // Up to the tail, the end of the ring and the buffer, whichever comes first.
        let n = (count - done)
            .min(queue.entries - slot)
            .min((FETCH_BYTES / size) as u64);
        let addr = queue.base + slot * queue.desc_size;
        let bytes = &mut fetched[..n as usize * size];
        let run = if mem.read(addr, bytes).is_ok() {
            bytes.chunks_exact(size).try_for_each(|raw| {
                carry_out(&decode_fetched(raw)?)?;
                done += 1;
                Ok(())
            })
        } else {
            (0..n).try_for_each(|i| {
                carry_out(&fetch(
                    mem,
                    addr + i * queue.desc_size,
                    queue.desc_size,
                    scalable,
                )?)?;
                done += 1;
                Ok(())
            })
        };
        if let Err(iqei) = run {
            return (done, Some(iqei));
        }
    }
    (count, None)
}

/// Whether a queue of `width`-byte descriptors may be processed: scalable mode takes only
/// 256-bit descriptors (§6.5.2); the error every descriptor of such a queue reports.
pub fn check_width(width: u64, scalable: bool) -> Result<(), Iqei> {
    if width != 32 && scalable {
        return Err(Iqei::InvalidWidth);
    }
    Ok(())
}

/// Decodes a descriptor fetched from the queue: `slot` is its 16 or 32 bytes as memory
/// holds them (a 128-bit descriptor has its upper half zero), of a width [`check_width`]
/// accepted. Every reserved bit and value is checked, as for one fetched by [`fetch`].
pub fn decode_fetched(slot: &[u8]) -> Result<InvDesc, Iqei> {
    let mut raw = [0u64; 4];
    for (q, b) in raw.iter_mut().zip(slot.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        *q = u64::from_le_bytes(word);
    }
    InvDesc::decode(raw).map_err(|e| Iqei::from(&e))
}

/// Carries out one invalidation descriptor on `unit`. Fails only when the status write of
/// an invalidation wait does not reach memory.
pub fn execute<U: InvalidationUnit + ?Sized>(
    unit: &mut U,
    desc: &InvDesc,
) -> Result<Completion, MemError> {
    match *desc {
        InvDesc::ContextCache {
            granularity,
            sid,
            fm,
            ..
        } => unit.invalidate_context_cache(granularity, sid, fm),
        InvDesc::PasidCache {
            granularity,
            did,
            pasid,
        } => unit.invalidate_pasid_cache(granularity, did, pasid),
        InvDesc::Iotlb { .. } | InvDesc::PasidIotlb { .. } => {
            if let Some(inv) = IotlbInvalidation::of(desc) {
                unit.invalidate_iotlb(inv);
            }
        }
        InvDesc::DevIotlb {
            sid, addr, size, ..
        } => unit.invalidate_device_tlb(sid, None, false, addr, size),
        InvDesc::PasidDevIotlb {
            sid,
            pasid,
            addr,
            size,
            global,
            ..
        } => unit.invalidate_device_tlb(sid, Some(pasid), global, addr, size),
        InvDesc::PageGroupResponse {
            rid,
            pasid_present,
            pasid,
            response,
            prg_index,
            ..
        } => unit.page_group_response(rid, pasid_present.then_some(pasid), prg_index, response),
        // Interrupt remapping is not modelled: no interrupt entry cache.
        InvDesc::InterruptEntryCache { .. } => {}
        InvDesc::InvWait {
            sw,
            interrupt,
            status_data,
            status_addr,
            ..
        } => {
            unit.drain();
            if sw {
                unit.status_memory()
                    .write(status_addr, &status_data.to_le_bytes())?;
            }
            if interrupt {
                return Ok(Completion::WaitInterrupt);
            }
        }
    }
    Ok(Completion::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inv_desc::IecGranularity;
    use crate::testutil::TestMemory;

    /// What the unit was asked, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Context(ContextCacheGranularity, SourceId, u8),
        PasidCache(PasidCacheGranularity, DomainId, Pasid),
        Iotlb(IotlbInvalidation),
        DevTlb(SourceId, Option<Pasid>, bool, u64, bool),
        Response(SourceId, Option<Pasid>, u16, ResponseCode),
        Drain,
    }

    struct Recorder {
        mem: TestMemory,
        calls: Vec<Call>,
    }

    impl InvalidationUnit for Recorder {
        type Mem = TestMemory;
        fn status_memory(&self) -> &TestMemory {
            &self.mem
        }
        fn invalidate_context_cache(&mut self, g: ContextCacheGranularity, s: SourceId, fm: u8) {
            self.calls.push(Call::Context(g, s, fm));
        }
        fn invalidate_pasid_cache(&mut self, g: PasidCacheGranularity, d: DomainId, p: Pasid) {
            self.calls.push(Call::PasidCache(g, d, p));
        }
        fn invalidate_iotlb(&mut self, inv: IotlbInvalidation) {
            self.calls.push(Call::Iotlb(inv));
        }
        fn invalidate_device_tlb(
            &mut self,
            s: SourceId,
            p: Option<Pasid>,
            g: bool,
            a: u64,
            z: bool,
        ) {
            self.calls.push(Call::DevTlb(s, p, g, a, z));
        }
        fn page_group_response(&mut self, r: SourceId, p: Option<Pasid>, i: u16, c: ResponseCode) {
            self.calls.push(Call::Response(r, p, i, c));
        }
        fn drain(&mut self) {
            self.calls.push(Call::Drain);
        }
    }

    fn unit() -> Recorder {
        Recorder {
            mem: TestMemory::new(0x2000),
            calls: Vec::new(),
        }
    }

    const SID: SourceId = SourceId::from_rid(0x0308);

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    #[test]
    fn each_descriptor_reaches_its_hook_with_its_fields() {
        let mut u = unit();
        let descs = [
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::DeviceSelective,
                did: DomainId(4),
                sid: SID,
                fm: 2,
            },
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: DomainId(4),
                pasid: pasid(9),
            },
            InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                did: DomainId(4),
                pasid: pasid(9),
                addr: 0x40_0000,
                ih: true,
                am: 9,
            },
            InvDesc::Iotlb {
                granularity: IotlbGranularity::DomainSelective,
                dr: false,
                dw: false,
                did: DomainId(5),
                addr: 0,
                ih: false,
                am: 0,
            },
            InvDesc::PasidDevIotlb {
                sid: SID,
                pfsid: SID,
                pasid: pasid(9),
                max_invs_pend: 0,
                addr: 0x7000,
                size: false,
                global: true,
            },
            InvDesc::DevIotlb {
                sid: SID,
                pfsid: SID,
                max_invs_pend: 0,
                addr: 0x9000,
                size: true,
            },
            InvDesc::PageGroupResponse {
                rid: SID,
                pasid_present: false,
                pasid: pasid(9),
                private_data_present: false,
                response: ResponseCode::InvalidRequest,
                last_page_in_group: true,
                prg_index: 17,
                private_data: [0; 2],
            },
            InvDesc::InterruptEntryCache {
                granularity: IecGranularity::Global,
                index_mask: 0,
                index: 0,
            },
        ];
        for d in &descs {
            assert_eq!(execute(&mut u, d), Ok(Completion::Done));
        }
        assert_eq!(
            u.calls,
            [
                Call::Context(ContextCacheGranularity::DeviceSelective, SID, 2),
                Call::PasidCache(PasidCacheGranularity::PasidSelective, DomainId(4), pasid(9)),
                Call::Iotlb(IotlbInvalidation::PasidPages {
                    did: DomainId(4),
                    pasid: pasid(9),
                    range: AddrRange::from_address_mask(0x40_0000, 9),
                    ih: true,
                }),
                Call::Iotlb(IotlbInvalidation::Domain(DomainId(5))),
                Call::DevTlb(SID, Some(pasid(9)), true, 0x7000, false),
                Call::DevTlb(SID, None, false, 0x9000, true),
                Call::Response(SID, None, 17, ResponseCode::InvalidRequest),
            ]
        );
    }

    #[test]
    fn a_wait_drains_then_writes_its_status_and_asks_for_the_interrupt_it_wants() {
        let mut u = unit();
        let wait = |sw, interrupt| InvDesc::InvWait {
            sw,
            interrupt,
            fence: false,
            pd: false,
            status_data: 0xabcd,
            status_addr: 0x1008,
        };
        assert_eq!(
            execute(&mut u, &wait(false, true)),
            Ok(Completion::WaitInterrupt)
        );
        assert_eq!(u.mem.read_u64(0x1008), Ok(0));
        assert_eq!(execute(&mut u, &wait(true, false)), Ok(Completion::Done));
        assert_eq!(u.mem.read_u64(0x1008), Ok(0xabcd));
        assert_eq!(u.calls, [Call::Drain, Call::Drain]);
    }

    #[test]
    fn a_wait_whose_status_write_fails_is_an_error() {
        let mut u = unit();
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: true,
            fence: false,
            pd: false,
            status_data: 1,
            status_addr: 0x10_0000,
        };
        assert!(execute(&mut u, &wait).is_err());
    }
}
