//! Commands (IHI 0070 §4): the 16-byte entries of the command queue, by opcode in bits
//! 7:0 of the first word.
//!
//! [`Cmd::decode`] refuses what the SMMU reports as CERROR_ILL (§4, §7.1): an opcode the
//! Non-secure command queue does not have, a RES0 bit set (SSec included), a reserved
//! encoding (PRI response, resume action, CMD_SYNC completion signal), or a command the
//! SMMU does not implement (EL2 invalidations without IDR0.Hyp, stage-2 invalidations
//! without S2P, ATC invalidation without ATS, PRI responses without PRI, stall commands
//! under the terminate model, range fields without IDR3.RIL, VMIDs/ASIDs above 8 bits
//! without VMID16/ASID16). Fields a command ignores (the SubstreamID when SSV is 0, the
//! StreamID of a CMD_CFGI_STE_RANGE that covers every stream) decode as absent.

use crate::features::{Features, StallModel};
use crate::field::{bits, field_enum, get, put};
use crate::regs::Queue;
use vsva_mem::PhysMem;

/// The error a command queue records in SMMU_CMDQ_CONS.ERR (§7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CmdError {
    /// CERROR_ILL: an illegal command.
    #[error("CERROR_ILL")]
    Ill,
    /// CERROR_ABT: the command could not be read (an abort on the queue access).
    #[error("CERROR_ABT")]
    Abt,
    /// CERROR_ATC_INV_SYNC: an ATC invalidation timed out before a CMD_SYNC.
    #[error("CERROR_ATC_INV_SYNC")]
    AtcInvSync,
}

impl CmdError {
    /// The CMDQ_CONS.ERR code.
    pub const fn code(self) -> u8 {
        match self {
            CmdError::Ill => 1,
            CmdError::Abt => 2,
            CmdError::AtcInvSync => 3,
        }
    }
}

field_enum! {
    /// CMD_PRI_RESP.Resp: the page request group response (§4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum PriResp {
        /// Invalid Request: the function must not retry.
        Deny = 0,
        /// Response Failure: PRI is disabled for the function.
        Fail = 1,
        /// Success: the pages were made resident; the function may retry.
        Success = 2,
    }
}

field_enum! {
    /// CMD_RESUME.Action: what becomes of a stalled transaction (§4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum ResumeAction {
        /// Terminate it (abort or RAZ/WI per the CD's A).
        Terminate = 0,
        /// Retry the translation.
        Retry = 1,
        /// Abort it.
        Abort = 2,
    }
}

field_enum! {
    /// CMD_SYNC.CS: how completion is signalled (§4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum SyncCs {
        /// No signal (software polls CMDQ_CONS).
        None = 0,
        /// An interrupt: the MSI write of MSIData to MSIAddress (wired IRQ when the address
        /// is 0).
        Irq = 1,
        /// A WFE wake-up event.
        Sev = 2,
    }
}

/// The address operand of the address-based TLB invalidations (§4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlbiAddr {
    /// The VA (bits 63:12) or IPA (bits 51:12).
    pub addr: u64,
    /// Leaf: only leaf entries (last-level translations) need invalidating.
    pub leaf: bool,
    /// TTL: the level of the leaf, a hint (0: unknown; needs RIL).
    pub ttl: u8,
    /// TG: the granule of the range (0: no range; needs RIL).
    pub tg: u8,
    /// NUM: the range is (NUM + 1) × 2^SCALE granules (needs RIL).
    pub num: u8,
    /// SCALE.
    pub scale: u8,
}

/// One command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// CMD_PREFETCH_CONFIG (0x01): prefetch the STE (and CD) of a stream.
    PrefetchConfig {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when SSV is set.
        ssid: Option<u32>,
    },
    /// CMD_PREFETCH_ADDR (0x02): prefetch translations of 2^`size` pages at `addr`.
    PrefetchAddr {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when SSV is set.
        ssid: Option<u32>,
        /// Address (bits 63:12).
        addr: u64,
        /// log2 of the number of pages.
        size: u8,
    },
    /// CMD_CFGI_STE (0x03): invalidate the cached STE of a stream (`leaf`: only the STE,
    /// not the L1STD).
    CfgiSte {
        /// StreamID.
        sid: u32,
        /// Leaf: only the entry, not the level-1 descriptor.
        leaf: bool,
    },
    /// CMD_CFGI_STE_RANGE (0x04): invalidate the STEs of the 2^(`range` + 1) streams
    /// around `sid`; range 31 is CMD_CFGI_ALL, every stream (`sid` then ignored, 0).
    CfgiSteRange {
        /// StreamID.
        sid: u32,
        /// Range.
        range: u8,
    },
    /// CMD_CFGI_CD (0x05): invalidate one cached CD (`leaf`: only the CD, not the L1CD).
    CfgiCd {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// Leaf: only the entry, not the level-1 descriptor.
        leaf: bool,
    },
    /// CMD_CFGI_CD_ALL (0x06): invalidate every cached CD of a stream.
    CfgiCdAll {
        /// StreamID.
        sid: u32,
    },
    /// CMD_TLBI_NH_ALL (0x10): every stage-1 TLB entry of a VMID.
    TlbiNhAll {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_NH_ASID (0x11): the stage-1 entries of an ASID under a VMID.
    TlbiNhAsid {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_NH_VA (0x12): the stage-1 entries of an address under an ASID and VMID.
    TlbiNhVa {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
        /// The address operand.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_NH_VAA (0x13): the stage-1 entries of an address for every ASID of a VMID.
    TlbiNhVaa {
        /// VMID.
        vmid: u16,
        /// The address operand.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_EL2_ALL (0x20).
    TlbiEl2All,
    /// CMD_TLBI_EL2_ASID (0x21).
    TlbiEl2Asid {
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_EL2_VA (0x22).
    TlbiEl2Va {
        /// ASID.
        asid: u16,
        /// The address operand.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_EL2_VAA (0x23).
    TlbiEl2Vaa {
        /// The address operand.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_S12_VMALL (0x28): every stage-1 and stage-2 entry of a VMID.
    TlbiS12Vmall {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_S2_IPA (0x2A): the stage-2 entries of an IPA under a VMID.
    TlbiS2Ipa {
        /// VMID.
        vmid: u16,
        /// The address operand.
        addr: TlbiAddr,
    },
    /// CMD_TLBI_NSNH_ALL (0x30): every Non-secure non-hypervisor entry.
    TlbiNsnhAll,
    /// CMD_ATC_INV (0x40): invalidate 2^`size` pages at `addr` in a device's ATC
    /// (`global`: for every SubstreamID).
    AtcInv {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when SSV is set.
        ssid: Option<u32>,
        /// Global: every SubstreamID of the function.
        global: bool,
        /// Address (bits 63:12).
        addr: u64,
        /// Size: the range is 2^Size 4 KiB pages.
        size: u8,
    },
    /// CMD_PRI_RESP (0x41): respond `resp` to the page request group `prg_index`.
    PriResp {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when SSV is set.
        ssid: Option<u32>,
        /// PRGIndex: the page request group.
        prg_index: u16,
        /// Resp.
        resp: PriResp,
    },
    /// CMD_RESUME (0x44): resume the stalled transaction `stag` with `action`.
    Resume {
        /// StreamID.
        sid: u32,
        /// Action.
        action: ResumeAction,
        /// STAG: the stalled transaction.
        stag: u16,
    },
    /// CMD_STALL_TERM (0x45): terminate every stalled transaction of a stream.
    StallTerm {
        /// StreamID.
        sid: u32,
    },
    /// CMD_SYNC (0x46): completes once every earlier command has, signalled by `cs`; for
    /// an MSI, `msi_data` is written to `msi_addr` with shareability `msh` and memory
    /// attributes `msi_attr`.
    Sync {
        /// CS: the completion signal.
        cs: SyncCs,
        /// MSH: the MSI write's shareability.
        msh: u8,
        /// MSIAttr: the MSI write's memory attributes.
        msi_attr: u8,
        /// MSIData.
        msi_data: u32,
        /// MSIAddress (bits 51:2).
        msi_addr: u64,
    },
}

const SSV: u64 = 1 << 11;
const SSID: u64 = bits(31, 12);
const SID: u64 = bits(63, 32);
const VMID: u64 = bits(47, 32);
const ASID: u64 = bits(63, 48);
const RANGE: u64 = bits(16, 12) | bits(24, 20);
const VA_OPERAND: u64 = 1 | bits(11, 8) | bits(63, 12);
const IPA_OPERAND: u64 = 1 | bits(11, 8) | bits(51, 12);

fn ssid(d0: u64) -> Option<u32> {
    (d0 & SSV != 0).then_some(get(d0, 31, 12) as u32)
}

fn put_ssid(ssid: Option<u32>) -> u64 {
    ssid.map_or(0, |s| SSV | put(s as u64, 31, 12))
}

fn tlbi_addr(d0: u64, d1: u64, mask: u64) -> TlbiAddr {
    TlbiAddr {
        addr: d1 & mask & bits(63, 12),
        leaf: d1 & 1 != 0,
        ttl: get(d1, 9, 8) as u8,
        tg: get(d1, 11, 10) as u8,
        num: get(d0, 16, 12) as u8,
        scale: get(d0, 24, 20) as u8,
    }
}

fn put_tlbi_addr(a: &TlbiAddr, mask: u64) -> (u64, u64) {
    (
        put(a.num as u64, 16, 12) | put(a.scale as u64, 24, 20),
        (a.addr & mask & bits(63, 12))
            | a.leaf as u64
            | put(a.ttl as u64, 9, 8)
            | put(a.tg as u64, 11, 10),
    )
}

impl Cmd {
    /// CMD_CFGI_ALL: CMD_CFGI_STE_RANGE with Range 31.
    pub const CFGI_ALL: Cmd = Cmd::CfgiSteRange { sid: 0, range: 31 };

    /// The opcode.
    pub const fn opcode(&self) -> u8 {
        match self {
            Cmd::PrefetchConfig { .. } => 0x01,
            Cmd::PrefetchAddr { .. } => 0x02,
            Cmd::CfgiSte { .. } => 0x03,
            Cmd::CfgiSteRange { .. } => 0x04,
            Cmd::CfgiCd { .. } => 0x05,
            Cmd::CfgiCdAll { .. } => 0x06,
            Cmd::TlbiNhAll { .. } => 0x10,
            Cmd::TlbiNhAsid { .. } => 0x11,
            Cmd::TlbiNhVa { .. } => 0x12,
            Cmd::TlbiNhVaa { .. } => 0x13,
            Cmd::TlbiEl2All => 0x20,
            Cmd::TlbiEl2Asid { .. } => 0x21,
            Cmd::TlbiEl2Va { .. } => 0x22,
            Cmd::TlbiEl2Vaa { .. } => 0x23,
            Cmd::TlbiS12Vmall { .. } => 0x28,
            Cmd::TlbiS2Ipa { .. } => 0x2a,
            Cmd::TlbiNsnhAll => 0x30,
            Cmd::AtcInv { .. } => 0x40,
            Cmd::PriResp { .. } => 0x41,
            Cmd::Resume { .. } => 0x44,
            Cmd::StallTerm { .. } => 0x45,
            Cmd::Sync { .. } => 0x46,
        }
    }

    /// The two words of the command. Field values wider than their field are truncated.
    pub fn encode(&self) -> [u64; 2] {
        let sid = |s: u32| put(s as u64, 63, 32);
        let vmid = |v: u16| put(v as u64, 47, 32);
        let asid = |a: u16| put(a as u64, 63, 48);
        let (d0, d1) = match *self {
            Cmd::PrefetchConfig { sid: s, ssid } => (sid(s) | put_ssid(ssid), 0),
            Cmd::PrefetchAddr {
                sid: s,
                ssid,
                addr,
                size,
            } => (
                sid(s) | put_ssid(ssid),
                put(size as u64, 4, 0) | (addr & bits(63, 12)),
            ),
            Cmd::CfgiSte { sid: s, leaf } => (sid(s), leaf as u64),
            Cmd::CfgiSteRange { sid: s, range } => {
                let s = if range & 0x1f == 31 { 0 } else { s };
                (sid(s), put(range as u64, 4, 0))
            }
            Cmd::CfgiCd { sid: s, ssid, leaf } => (sid(s) | put(ssid as u64, 31, 12), leaf as u64),
            Cmd::CfgiCdAll { sid: s } => (sid(s), 0),
            Cmd::TlbiNhAll { vmid: v } | Cmd::TlbiS12Vmall { vmid: v } => (vmid(v), 0),
            Cmd::TlbiNhAsid { vmid: v, asid: a } => (vmid(v) | asid(a), 0),
            Cmd::TlbiNhVa {
                vmid: v,
                asid: a,
                addr,
            } => {
                let (r, d1) = put_tlbi_addr(&addr, VA_OPERAND);
                (vmid(v) | asid(a) | r, d1)
            }
            Cmd::TlbiNhVaa { vmid: v, addr } => {
                let (r, d1) = put_tlbi_addr(&addr, VA_OPERAND);
                (vmid(v) | r, d1)
            }
            Cmd::TlbiEl2All | Cmd::TlbiNsnhAll => (0, 0),
            Cmd::TlbiEl2Asid { asid: a } => (asid(a), 0),
            Cmd::TlbiEl2Va { asid: a, addr } => {
                let (r, d1) = put_tlbi_addr(&addr, VA_OPERAND);
                (asid(a) | r, d1)
            }
            Cmd::TlbiEl2Vaa { addr } => put_tlbi_addr(&addr, VA_OPERAND),
            Cmd::TlbiS2Ipa { vmid: v, addr } => {
                let (r, d1) = put_tlbi_addr(&addr, IPA_OPERAND);
                (vmid(v) | r, d1)
            }
            Cmd::AtcInv {
                sid: s,
                ssid,
                global,
                addr,
                size,
            } => (
                sid(s) | put_ssid(ssid) | (global as u64) << 9,
                put(size as u64, 5, 0) | (addr & bits(63, 12)),
            ),
            Cmd::PriResp {
                sid: s,
                ssid,
                prg_index,
                resp,
            } => (
                sid(s) | put_ssid(ssid),
                put(prg_index as u64, 8, 0) | put(resp.raw(), 13, 12),
            ),
            Cmd::Resume {
                sid: s,
                action,
                stag,
            } => (sid(s) | put(action.raw(), 13, 12), stag as u64),
            Cmd::StallTerm { sid: s } => (sid(s), 0),
            Cmd::Sync {
                cs,
                msh,
                msi_attr,
                msi_data,
                msi_addr,
            } => (
                put(cs.raw(), 13, 12)
                    | put(msh as u64, 23, 22)
                    | put(msi_attr as u64, 27, 24)
                    | put(msi_data as u64, 63, 32),
                msi_addr & bits(51, 2),
            ),
        };
        [d0 | self.opcode() as u64, d1]
    }

    /// Reads the command at `cons` of the command queue `queue` from `mem` (16 bytes, §4.1)
    /// and decodes it for an SMMU with `features`: CERROR_ABT when it cannot be read,
    /// CERROR_ILL when it is not a legal command. The words read come back with the error.
    pub fn fetch<M: PhysMem + ?Sized>(
        mem: &M,
        queue: &Queue,
        cons: u32,
        features: &Features,
    ) -> Result<Cmd, (CmdError, Option<[u64; 2]>)> {
        let addr = queue.entry_address(cons, 16);
        let raw = match (mem.read_u64(addr), mem.read_u64(addr.wrapping_add(8))) {
            (Ok(d0), Ok(d1)) => [d0, d1],
            _ => return Err((CmdError::Abt, None)),
        };
        Cmd::decode(raw, features).map_err(|e| (e, Some(raw)))
    }

    /// Decodes the command `raw` for an SMMU with `features`, or CERROR_ILL.
    pub fn decode(raw: [u64; 2], f: &Features) -> Result<Cmd, CmdError> {
        let [d0, d1] = raw;
        let sid = get(d0, 63, 32) as u32;
        let vmid = get(d0, 47, 32) as u16;
        let asid = get(d0, 63, 48) as u16;
        let ssid_bits = SSV | SSID;
        // The command and the bits of each word it uses.
        let (cmd, used0, used1) = match d0 & 0xff {
            0x01 => (
                Cmd::PrefetchConfig {
                    sid,
                    ssid: ssid(d0),
                },
                SID | ssid_bits,
                0,
            ),
            0x02 => (
                Cmd::PrefetchAddr {
                    sid,
                    ssid: ssid(d0),
                    addr: d1 & bits(63, 12),
                    size: get(d1, 4, 0) as u8,
                },
                SID | ssid_bits,
                bits(4, 0) | bits(63, 12),
            ),
            0x03 => (
                Cmd::CfgiSte {
                    sid,
                    leaf: d1 & 1 != 0,
                },
                SID,
                1,
            ),
            0x04 => {
                let range = get(d1, 4, 0) as u8;
                let sid = if range == 31 { 0 } else { sid };
                (Cmd::CfgiSteRange { sid, range }, SID, bits(4, 0))
            }
            0x05 => (
                Cmd::CfgiCd {
                    sid,
                    ssid: get(d0, 31, 12) as u32,
                    leaf: d1 & 1 != 0,
                },
                SID | SSID,
                1,
            ),
            0x06 => (Cmd::CfgiCdAll { sid }, SID, 0),
            0x10 => (Cmd::TlbiNhAll { vmid }, VMID, 0),
            0x11 => (Cmd::TlbiNhAsid { vmid, asid }, VMID | ASID, 0),
            0x12 => (
                Cmd::TlbiNhVa {
                    vmid,
                    asid,
                    addr: tlbi_addr(d0, d1, VA_OPERAND),
                },
                VMID | ASID | RANGE,
                VA_OPERAND,
            ),
            0x13 => (
                Cmd::TlbiNhVaa {
                    vmid,
                    addr: tlbi_addr(d0, d1, VA_OPERAND),
                },
                VMID | RANGE,
                VA_OPERAND,
            ),
            0x20 => (Cmd::TlbiEl2All, 0, 0),
            0x21 => (Cmd::TlbiEl2Asid { asid }, ASID, 0),
            0x22 => (
                Cmd::TlbiEl2Va {
                    asid,
                    addr: tlbi_addr(d0, d1, VA_OPERAND),
                },
                ASID | RANGE,
                VA_OPERAND,
            ),
            0x23 => (
                Cmd::TlbiEl2Vaa {
                    addr: tlbi_addr(d0, d1, VA_OPERAND),
                },
                RANGE,
                VA_OPERAND,
            ),
            0x28 => (Cmd::TlbiS12Vmall { vmid }, VMID, 0),
            0x2a => (
                Cmd::TlbiS2Ipa {
                    vmid,
                    addr: tlbi_addr(d0, d1, IPA_OPERAND),
                },
                VMID | RANGE,
                IPA_OPERAND,
            ),
            0x30 => (Cmd::TlbiNsnhAll, 0, 0),
            0x40 => (
                Cmd::AtcInv {
                    sid,
                    ssid: ssid(d0),
                    global: d0 & 1 << 9 != 0,
                    addr: d1 & bits(63, 12),
                    size: get(d1, 5, 0) as u8,
                },
                SID | ssid_bits | 1 << 9,
                bits(5, 0) | bits(63, 12),
            ),
            0x41 => (
                Cmd::PriResp {
                    sid,
                    ssid: ssid(d0),
                    prg_index: get(d1, 8, 0) as u16,
                    resp: PriResp::from_bits(get(d1, 13, 12)).ok_or(CmdError::Ill)?,
                },
                SID | ssid_bits,
                bits(8, 0) | bits(13, 12),
            ),
            0x44 => (
                Cmd::Resume {
                    sid,
                    action: ResumeAction::from_bits(get(d0, 13, 12)).ok_or(CmdError::Ill)?,
                    stag: get(d1, 15, 0) as u16,
                },
                SID | bits(13, 12),
                bits(15, 0),
            ),
            0x45 => (Cmd::StallTerm { sid }, SID, 0),
            0x46 => (
                Cmd::Sync {
                    cs: SyncCs::from_bits(get(d0, 13, 12)).ok_or(CmdError::Ill)?,
                    msh: get(d0, 23, 22) as u8,
                    msi_attr: get(d0, 27, 24) as u8,
                    msi_data: get(d0, 63, 32) as u32,
                    msi_addr: d1 & bits(51, 2),
                },
                bits(13, 12) | bits(27, 22) | bits(63, 32),
                bits(51, 2),
            ),
            _ => return Err(CmdError::Ill),
        };
        if d0 & !(used0 | 0xff) != 0 || d1 & !used1 != 0 {
            return Err(CmdError::Ill);
        }
        if cmd.implemented(f) {
            Ok(cmd)
        } else {
            Err(CmdError::Ill)
        }
    }

    /// Whether an SMMU with `f` implements the command as given.
    fn implemented(&self, f: &Features) -> bool {
        let vmid_ok = |v: u16| f.vmid16 || v <= 0xff;
        let asid_ok = |a: u16| f.asid16 || a <= 0xff;
        let range_ok =
            |a: &TlbiAddr| f.ril || (a.ttl == 0 && a.tg == 0 && a.num == 0 && a.scale == 0);
        match self {
            Cmd::TlbiNhAll { vmid } => vmid_ok(*vmid),
            Cmd::TlbiNhAsid { vmid, asid } => vmid_ok(*vmid) && asid_ok(*asid),
            Cmd::TlbiNhVa { vmid, asid, addr } => {
                vmid_ok(*vmid) && asid_ok(*asid) && range_ok(addr)
            }
            Cmd::TlbiNhVaa { vmid, addr } => vmid_ok(*vmid) && range_ok(addr),
            Cmd::TlbiEl2All => f.hyp,
            Cmd::TlbiEl2Asid { asid } => f.hyp && asid_ok(*asid),
            Cmd::TlbiEl2Va { asid, addr } => f.hyp && asid_ok(*asid) && range_ok(addr),
            Cmd::TlbiEl2Vaa { addr } => f.hyp && range_ok(addr),
            Cmd::TlbiS12Vmall { vmid } => f.s2p && vmid_ok(*vmid),
            Cmd::TlbiS2Ipa { vmid, addr } => f.s2p && vmid_ok(*vmid) && range_ok(addr),
            Cmd::AtcInv { .. } => f.ats,
            Cmd::PriResp { .. } => f.pri,
            Cmd::Resume { .. } | Cmd::StallTerm { .. } => f.stall_model != StallModel::Terminate,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const F: Features = Features::VSVA;

    #[test]
    fn hand_computed_encodings() {
        let va = TlbiAddr {
            addr: 0x7f00_1234_5000,
            leaf: true,
            ..TlbiAddr::default()
        };
        let cases: [(Cmd, [u64; 2]); 8] = [
            (
                Cmd::TlbiNhVa {
                    vmid: 3,
                    asid: 0x1234,
                    addr: va,
                },
                [0x1234_0003_0000_0012, 0x7f00_1234_5001],
            ),
            (
                Cmd::CfgiCd {
                    sid: 0x10,
                    ssid: 5,
                    leaf: true,
                },
                [0x0000_0010_0000_5005, 1],
            ),
            (Cmd::CFGI_ALL, [0x04, 31]),
            (
                Cmd::CfgiSte {
                    sid: 0xabcd,
                    leaf: false,
                },
                [0x0000_abcd_0000_0003, 0],
            ),
            (
                Cmd::Sync {
                    cs: SyncCs::Irq,
                    msh: 3,
                    msi_attr: 0xf,
                    msi_data: 0xdead,
                    msi_addr: 0x1000,
                },
                [0x0000_dead_0fc0_1046, 0x1000],
            ),
            (
                Cmd::PriResp {
                    sid: 7,
                    ssid: Some(3),
                    prg_index: 0x1ff,
                    resp: PriResp::Success,
                },
                [0x0000_0007_0000_3841, 0x21ff],
            ),
            (
                Cmd::AtcInv {
                    sid: 2,
                    ssid: None,
                    global: true,
                    addr: 0x4000_0000,
                    size: 52,
                },
                [0x0000_0002_0000_0240, 0x4000_0034],
            ),
            (
                Cmd::TlbiS2Ipa {
                    vmid: 9,
                    addr: TlbiAddr {
                        addr: 0x8_0000_0000,
                        ..TlbiAddr::default()
                    },
                },
                [0x0000_0009_0000_002a, 0x8_0000_0000],
            ),
        ];
        for (cmd, raw) in cases {
            assert_eq!(cmd.encode(), raw, "{cmd:?}");
            assert_eq!(Cmd::decode(raw, &F), Ok(cmd));
        }
    }

    #[test]
    fn illegal_commands() {
        let ill = |raw: [u64; 2], f: &Features| {
            assert_eq!(Cmd::decode(raw, f), Err(CmdError::Ill), "{raw:x?}")
        };
        // Opcodes the Non-secure queue does not have (0x18: CMD_TLBI_EL3_ALL).
        for op in [0x00, 0x07, 0x14, 0x18, 0x1a, 0x29, 0x42, 0x47, 0xff] {
            ill([op, 0], &F);
        }
        // RES0 bits: SSec (bit 10), a word-1 bit of CMD_CFGI_STE, IPA bits above 51.
        ill([0x01 | 1 << 10, 0], &F);
        ill([0x03, 2], &F);
        ill([0x2a, 1 << 60], &F);
        ill([0x10 | 1 << 48, 0], &F);
        // Reserved encodings.
        ill([0x41, 3 << 12], &F);
        ill(
            [0x44 | 3 << 12, 0],
            &Features {
                stall_model: StallModel::StallAndTerminate,
                ..F
            },
        );
        ill([0x46 | 3 << 12, 0], &F);
        // Commands the SMMU does not implement.
        ill([0x20, 0], &F);
        assert_eq!(
            Cmd::decode([0x20, 0], &Features { hyp: true, ..F }),
            Ok(Cmd::TlbiEl2All)
        );
        ill([0x40, 0], &Features { ats: false, ..F });
        ill([0x41, 0], &Features { pri: false, ..F });
        ill([0x28, 0], &Features { s2p: false, ..F });
        ill([0x45, 0], &F);
        assert!(Cmd::decode(
            [0x45, 0],
            &Features {
                stall_model: StallModel::StallAndTerminate,
                ..F
            }
        )
        .is_ok());
        ill([0x12 | 1 << 12, 0x1000], &F);
        assert!(Cmd::decode([0x12 | 1 << 12, 0x1000], &Features { ril: true, ..F }).is_ok());
        ill([0x10 | 0x100 << 32, 0], &Features { vmid16: false, ..F });
        ill([0x11 | 0x100 << 48, 0], &Features { asid16: false, ..F });
        // Ignored fields decode as absent: a SubstreamID without SSV, the StreamID of
        // CMD_CFGI_ALL.
        assert_eq!(
            Cmd::decode([0x01 | 5 << 12, 0], &F),
            Ok(Cmd::PrefetchConfig { sid: 0, ssid: None })
        );
        assert_eq!(Cmd::decode([0x04 | 7 << 32, 31], &F), Ok(Cmd::CFGI_ALL));
        assert_eq!(CmdError::Ill.code(), 1);
        assert_eq!(CmdError::Abt.code(), 2);
    }

    fn arb_tlbi_addr(addr_bits: u32) -> impl Strategy<Value = TlbiAddr> {
        (
            0u64..(1 << (addr_bits - 12)),
            any::<bool>(),
            0u8..4,
            0u8..4,
            0u8..32,
            0u8..32,
        )
            .prop_map(|(page, leaf, ttl, tg, num, scale)| TlbiAddr {
                addr: page << 12,
                leaf,
                ttl,
                tg,
                num,
                scale,
            })
    }

    /// Every command, with each field in its range.
    fn arb_cmd() -> impl Strategy<Value = Cmd> {
        let ssid = prop::option::of(0u32..(1 << 20));
        let page = (0u64..(1 << 52)).prop_map(|p| p << 12);
        prop_oneof![
            (any::<u32>(), ssid.clone()).prop_map(|(sid, ssid)| Cmd::PrefetchConfig { sid, ssid }),
            (any::<u32>(), ssid.clone(), page.clone(), 0u8..32).prop_map(
                |(sid, ssid, addr, size)| Cmd::PrefetchAddr {
                    sid,
                    ssid,
                    addr,
                    size
                }
            ),
            (any::<u32>(), any::<bool>()).prop_map(|(sid, leaf)| Cmd::CfgiSte { sid, leaf }),
            (any::<u32>(), 0u8..32).prop_map(|(sid, range)| Cmd::CfgiSteRange {
                sid: if range == 31 { 0 } else { sid },
                range
            }),
            (any::<u32>(), 0u32..(1 << 20), any::<bool>())
                .prop_map(|(sid, ssid, leaf)| Cmd::CfgiCd { sid, ssid, leaf }),
            any::<u32>().prop_map(|sid| Cmd::CfgiCdAll { sid }),
            any::<u16>().prop_map(|vmid| Cmd::TlbiNhAll { vmid }),
            (any::<u16>(), any::<u16>()).prop_map(|(vmid, asid)| Cmd::TlbiNhAsid { vmid, asid }),
            (any::<u16>(), any::<u16>(), arb_tlbi_addr(64))
                .prop_map(|(vmid, asid, addr)| Cmd::TlbiNhVa { vmid, asid, addr }),
            (any::<u16>(), arb_tlbi_addr(64))
                .prop_map(|(vmid, addr)| Cmd::TlbiNhVaa { vmid, addr }),
            Just(Cmd::TlbiEl2All),
            any::<u16>().prop_map(|asid| Cmd::TlbiEl2Asid { asid }),
            (any::<u16>(), arb_tlbi_addr(64))
                .prop_map(|(asid, addr)| Cmd::TlbiEl2Va { asid, addr }),
            arb_tlbi_addr(64).prop_map(|addr| Cmd::TlbiEl2Vaa { addr }),
            any::<u16>().prop_map(|vmid| Cmd::TlbiS12Vmall { vmid }),
            (any::<u16>(), arb_tlbi_addr(52))
                .prop_map(|(vmid, addr)| Cmd::TlbiS2Ipa { vmid, addr }),
            Just(Cmd::TlbiNsnhAll),
            (any::<u32>(), ssid.clone(), any::<bool>(), page, 0u8..64).prop_map(
                |(sid, ssid, global, addr, size)| Cmd::AtcInv {
                    sid,
                    ssid,
                    global,
                    addr,
                    size
                }
            ),
            (any::<u32>(), ssid, 0u16..512, 0u64..3).prop_map(|(sid, ssid, prg_index, r)| {
                Cmd::PriResp {
                    sid,
                    ssid,
                    prg_index,
                    resp: PriResp::from_bits(r).unwrap(),
                }
            }),
            (any::<u32>(), 0u64..3, any::<u16>()).prop_map(|(sid, a, stag)| Cmd::Resume {
                sid,
                action: ResumeAction::from_bits(a).unwrap(),
                stag
            }),
            any::<u32>().prop_map(|sid| Cmd::StallTerm { sid }),
            (0u64..3, 0u8..4, 0u8..16, any::<u32>(), 0u64..(1 << 50)).prop_map(
                |(cs, msh, msi_attr, msi_data, a)| Cmd::Sync {
                    cs: SyncCs::from_bits(cs).unwrap(),
                    msh,
                    msi_attr,
                    msi_data,
                    msi_addr: a << 2,
                }
            ),
        ]
    }

    proptest! {
        /// Every well-formed command survives encode then decode on an SMMU that has
        /// every feature, with its opcode in bits 7:0.
        #[test]
        fn encode_decode_round_trip(cmd in arb_cmd()) {
            let f = Features { hyp: true, ril: true, stall_model: StallModel::StallAndTerminate, ..F };
            let raw = cmd.encode();
            prop_assert_eq!(raw[0] & 0xff, cmd.opcode() as u64);
            prop_assert_eq!(Cmd::decode(raw, &f), Ok(cmd));
        }

        /// Random words never make decoding panic, and a decoded command encodes to words
        /// that decode to it again.
        #[test]
        fn decode_never_panics(w in any::<[u64; 2]>(), op in any::<u8>()) {
            let raw = [(w[0] & !0xff) | op as u64, w[1]];
            if let Ok(cmd) = Cmd::decode(raw, &F) {
                prop_assert_eq!(Cmd::decode(cmd.encode(), &F), Ok(cmd));
            }
        }
    }
}
