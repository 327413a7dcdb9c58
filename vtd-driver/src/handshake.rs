//! The global command handshakes (VT-d §10.4.4, §10.4.5): software writes GCMD_REG with
//! the enables it keeps plus the one command it issues, and waits until GSTS_REG shows it,
//! as intel-iommu does under `register_lock` with `iommu->gcmd`.

use std::sync::{Mutex, MutexGuard, PoisonError};

use vsva_vtd::regs::layout::{gcmd, gsts, offset, rtaddr};
use vsva_vtd::regs::Cap;

use crate::{Error, Registers, POLL_LIMIT};

/// The enable bits software keeps set in GCMD_REG (Linux's `iommu->gcmd`). Its lock also
/// serialises the commands (Linux's `register_lock`).
#[derive(Debug, Default)]
pub struct GlobalCommand {
    enabled: Mutex<u32>,
}

impl GlobalCommand {
    /// No enable set.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, u32> {
        self.enabled.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes over the enables a previous owner left on (GSTS.TES, QIES, IRES) and returns
    /// GSTS_REG, as `init_dmars` finds a unit the firmware or a crashed kernel left on.
    pub fn adopt<R: Registers + ?Sized>(&self, regs: &R) -> Result<u32, Error> {
        let status = regs.read32(offset::GSTS)?;
        *self.lock() = status & (gsts::TES | gsts::QIES | gsts::IRES);
        Ok(status)
    }

    /// The enables kept set.
    pub fn enabled(&self) -> u32 {
        *self.lock()
    }

    /// Runs `f` with the register commands serialised, as intel-iommu holds
    /// `register_lock` around a register handshake of its own (the virtual command
    /// interface).
    pub fn serialised<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self.lock();
        f()
    }

    /// Turns the enable `bit` on or off, the others kept, and waits for its `status` bit
    /// to follow (TE/TES, QIE/QIES, ...).
    pub fn set_enable<R: Registers + ?Sized>(
        &self,
        regs: &R,
        bit: u32,
        status: u32,
        on: bool,
        what: &'static str,
    ) -> Result<(), Error> {
        let mut enabled = self.lock();
        let value = if on { *enabled | bit } else { *enabled & !bit };
        regs.write(offset::GCMD, 4, value.into())?;
        wait_gsts(regs, status, on, what)?;
        *enabled = value;
        Ok(())
    }

    /// Issues the one-shot command `bit` (SRTP, SIRTP) with the enables kept, and waits for
    /// its `status` bit to be set.
    pub fn one_shot<R: Registers + ?Sized>(
        &self,
        regs: &R,
        bit: u32,
        status: u32,
        what: &'static str,
    ) -> Result<(), Error> {
        let enabled = self.lock();
        regs.write(offset::GCMD, 4, (*enabled | bit).into())?;
        wait_gsts(regs, status, true, what)
    }

    /// `iommu_set_root_entry` in scalable mode: RTADDR_REG with the root table and
    /// TTM = 01b, then GCMD.SRTP until GSTS.RTPS.
    pub fn set_root_table<R: Registers + ?Sized>(&self, regs: &R, root: u64) -> Result<(), Error> {
        regs.write(offset::RTADDR, 8, root | 1 << rtaddr::TTM_SHIFT)?;
        self.one_shot(regs, gcmd::SRTP, gsts::RTPS, "set root table pointer")
    }

    /// `__dmar_enable_qi`: IQT_REG to 0, IQA_REG (`iqa`: queue base, descriptor width and
    /// size), then GCMD.QIE until GSTS.QIES.
    pub fn enable_qi<R: Registers + ?Sized>(&self, regs: &R, iqa: u64) -> Result<(), Error> {
        regs.write(offset::IQT, 8, 0)?;
        regs.write(offset::IQA, 8, iqa)?;
        self.set_enable(
            regs,
            gcmd::QIE,
            gsts::QIES,
            true,
            "queued invalidation enable",
        )
    }

    /// `dmar_disable_qi`: when queued invalidation is on, gives the unit a bounded chance
    /// to reach IQT with IQH, then clears GCMD.QIE and waits for GSTS.QIES to clear.
    pub fn disable_qi<R: Registers + ?Sized>(&self, regs: &R) -> Result<(), Error> {
        if regs.read32(offset::GSTS)? & gsts::QIES == 0 {
            return Ok(());
        }
        for _ in 0..POLL_LIMIT {
            if regs.read(offset::IQH, 8)? == regs.read(offset::IQT, 8)? {
                break;
            }
            std::thread::yield_now();
        }
        self.set_enable(
            regs,
            gcmd::QIE,
            gsts::QIES,
            false,
            "queued invalidation disable",
        )
    }

    /// `iommu_flush_write_buffer`: when the unit needs it (CAP.RWBF), GCMD.WBF and wait for
    /// GSTS.WBFS to clear.
    pub fn flush_write_buffer<R: Registers + ?Sized>(
        &self,
        regs: &R,
        cap: &Cap,
    ) -> Result<(), Error> {
        if !cap.rwbf {
            return Ok(());
        }
        let enabled = self.lock();
        regs.write(offset::GCMD, 4, (*enabled | gcmd::WBF).into())?;
        wait_gsts(regs, gsts::WBFS, false, "write buffer flush")
    }
}

/// Waits until GSTS_REG shows `status` set (or clear when `!set`).
fn wait_gsts<R: Registers + ?Sized>(
    regs: &R,
    status: u32,
    set: bool,
    what: &'static str,
) -> Result<(), Error> {
    for _ in 0..POLL_LIMIT {
        if (regs.read32(offset::GSTS)? & status != 0) == set {
            return Ok(());
        }
        std::thread::yield_now();
    }
    Err(Error::StatusTimeout(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testunit::Unit;

    #[test]
    fn root_table_and_queue_handshakes_reach_gsts() {
        let unit = Unit::new();
        let g = GlobalCommand::new();
        g.set_root_table(&unit, 0x10_0000).unwrap();
        let regs = unit.regs();
        assert_eq!(regs.root_table().addr, 0x10_0000);
        assert_eq!(regs.gsts() & gsts::RTPS, gsts::RTPS);
        drop(regs);
        g.enable_qi(&unit, 0x20_0000 | 0x801).unwrap();
        assert!(unit.regs().qi_enabled());
        assert_eq!(g.enabled(), gcmd::QIE);
        // A later command keeps QIE set.
        g.set_enable(&unit, gcmd::TE, gsts::TES, true, "te")
            .unwrap();
        assert_eq!(
            unit.regs().gsts() & (gsts::QIES | gsts::TES),
            gsts::QIES | gsts::TES
        );
        g.disable_qi(&unit).unwrap();
        assert!(!unit.regs().qi_enabled());
        assert!(unit.regs().translation_enabled());
        // A new owner adopts what was left on.
        let h = GlobalCommand::new();
        assert_ne!(h.adopt(&unit).unwrap() & gsts::TES, 0);
        assert_eq!(h.enabled(), gsts::TES);
    }
}
