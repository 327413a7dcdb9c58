//! A remapping unit reduced to its register file and an invalidation queue processor,
//! with guest-RAM-like memory, for the unit tests: it can refuse a descriptor (IQE), time
//! out device-TLB invalidations (ITE) or never complete waits.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use vsva_mem::PhysMem;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vsva_vtd::inv_desc::InvDescType;
use vsva_vtd::regs::{Iqei, RegEffect, RegEffects};
use vsva_vtd::{
    addr::SourceId, inv_desc::InvDesc, regs::Cap, regs::Ecap, regs::RegError, regs::RegisterFile,
};

use crate::Registers;

pub(crate) struct Unit {
    regs: Mutex<RegisterFile>,
    pub(crate) mem: GuestMemoryMmap,
    /// Every descriptor carried out, in order.
    pub(crate) log: Mutex<Vec<InvDesc>>,
    /// Refuse the next descriptor of this type once (IQE, invalid type).
    pub(crate) reject: Mutex<Option<InvDescType>>,
    /// Time out this many device-TLB invalidations (ITE).
    pub(crate) time_outs: AtomicU32,
    /// Never carry out status writes.
    pub(crate) stuck: AtomicBool,
    /// IQH_REG reads so far.
    pub(crate) iqh_reads: AtomicU32,
}

impl Unit {
    pub(crate) fn new() -> Self {
        let cap = Cap {
            nd: 6,
            sagaw: 0b0100,
            mgaw: 47,
            fro: 0x40,
            psi: true,
            nfr: 7,
            mamv: 9,
            ..Cap::default()
        };
        let ecap = Ecap {
            qi: true,
            dt: true,
            iro: 0x50,
            prs: true,
            pss: 19,
            pasid: true,
            smts: true,
            slts: true,
            ..Ecap::default()
        };
        Unit {
            regs: Mutex::new(RegisterFile::new(cap, ecap).unwrap()),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            log: Mutex::new(Vec::new()),
            reject: Mutex::new(None),
            time_outs: AtomicU32::new(0),
            stuck: AtomicBool::new(false),
            iqh_reads: AtomicU32::new(0),
        }
    }

    pub(crate) fn regs(&self) -> MutexGuard<'_, RegisterFile> {
        self.regs.lock().unwrap()
    }

    pub(crate) fn take_log(&self) -> Vec<InvDesc> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn process_queue(&self) {
        loop {
            let mut regs = self.regs();
            let Some(addr) = regs.next_inv_desc() else {
                return;
            };
            let mut raw = [0u64; 4];
            for (i, q) in raw.iter_mut().enumerate() {
                *q = self.mem.read_u64(addr + 8 * i as u64).unwrap();
            }
            let desc = match InvDesc::decode(raw) {
                Ok(d) => d,
                Err(e) => {
                    regs.set_iqe(Iqei::from(&e));
                    return;
                }
            };
            let mut reject = self.reject.lock().unwrap();
            if *reject == Some(desc.desc_type()) {
                *reject = None;
                regs.set_iqe(Iqei::InvalidType);
                return;
            }
            drop(reject);
            let device_tlb = matches!(
                desc.desc_type(),
                InvDescType::DevIotlb | InvDescType::PasidDevIotlb
            );
            if device_tlb && self.time_outs.load(Ordering::SeqCst) > 0 {
                self.time_outs.fetch_sub(1, Ordering::SeqCst);
                // §6.5.2.10: the time-out is reported and every pending wait is aborted.
                regs.set_ite(SourceId::from_rid(0x10));
                while regs.next_inv_desc().is_some() {
                    regs.advance_iqh().unwrap();
                }
                return;
            }
            if let InvDesc::InvWait {
                sw: true,
                status_data,
                status_addr,
                ..
            } = desc
            {
                if self.stuck.load(Ordering::SeqCst) {
                    return;
                }
                self.mem
                    .write(status_addr, &status_data.to_le_bytes())
                    .unwrap();
            }
            self.log.lock().unwrap().push(desc);
            regs.advance_iqh().unwrap();
        }
    }
}

impl Registers for Unit {
    fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        if offset == vsva_vtd::regs::layout::offset::IQH {
            self.iqh_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.regs().read(offset, size)
    }

    fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        let mut effects = RegEffects::new();
        self.regs().write(offset, size, value, &mut effects)?;
        if effects.contains(&RegEffect::ProcessInvalidationQueue) {
            self.process_queue();
        }
        Ok(())
    }
}
