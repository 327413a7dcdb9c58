//! The Arm SMMUv3 core of vsva: the formats and walkers a physical SMMUv3 model and a
//! virtual SMMUv3 share.
//!
//! Section numbers refer to the Arm System Memory Management Unit Architecture
//! Specification, SMMU architecture version 3 (IHI 0070), and, for translation tables, to
//! the Arm Architecture Reference Manual for A-profile (DDI 0487), chapter D8 (VMSAv8-64).
//! Tables are read through `vsva_mem`'s [`PhysMem`](vsva_mem::PhysMem), the memory trait every vsva IOMMU
//! model uses.
//!
//! # What is modelled, and the choices made
//!
//! - Translation tables: AArch64, little-endian, 4 KiB, 16 KiB and 64 KiB granules (as
//!   IDR5.GRAN* offer them), TTB0 and TTB1, 48-bit output and 52-bit with the 64 KiB
//!   granule (FEAT_LPA: `OA[51:48]` in descriptor bits 15:12, 4 TiB level-1 blocks when
//!   OAS is 52). No 52-bit VAs (IDR5.VAX), LPA2, small translation tables (IDR3.STT), HAD,
//!   FWB.
//! - VMSAv8-64 has no reserved-bit fault: descriptor bits the format does not use are
//!   ignored; output and table addresses above the configured size are F_ADDR_SIZE (TTB0 or
//!   S2TTB out of range at level 0, as the Arm ARM's walk does).
//! - Hardware updates are one compare-exchange on the descriptor as read, made once the
//!   access is allowed at that stage; in nested translation the stage-1 update is a write
//!   through stage 2 done before the output's stage-2 walk. HD acts only with HA.
//! - STE and CD: nonzero RES0 bits and reserved encodings are C_BAD_STE/C_BAD_CD even in
//!   fields the Config ignores (a strict reading); IMPLEMENTATION DEFINED fields are
//!   ignored. A SubstreamID of 0 selects CD 0 whatever S1DSS says; an invalid L1STD or
//!   L1CD is C_BAD_STREAMID or C_BAD_SUBSTREAMID.
//! - Commands: unknown opcodes, RES0 bits, reserved encodings and commands the
//!   [`Features`](features::Features) lack are CERROR_ILL; ignored fields decode as absent.
//! - Events: the E_PAGE_REQUEST Span field is not modelled.
//! - Registers: enables complete at once (CR0ACK = CR0); writes the spec leaves
//!   unpredictable (a live queue's BASE, a live stream table) are ignored.

pub mod builder;
pub mod cd;
pub mod cmd;
pub mod desc;
pub mod event;
pub mod explain;
pub mod features;
mod field;
pub mod lookup;
pub mod priq;
pub mod regs;
pub mod ste;
#[cfg(test)]
mod testutil;
pub mod walk;
