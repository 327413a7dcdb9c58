//! A stand-in IOMMU for the engine's tests: a map of 4 KiB pages per PASID, each part of
//! a translated page of 4 KiB or more.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::{addr::Hpa, addr::Pasid, addr::SourceId, fault::FaultReason};

use super::port::{
    AtsCompletion, AtsEndpoint, DevTlbInvalidation, DmaAccess, DmaFault, DmaPort, DmaRun,
    DmaTranslation, PageRequestMessage, PrgResponse,
};
use crate::drain::RequestDrain;
use crate::memory::{HostMemory, PAGE_SIZE};

#[derive(Clone, Copy, Debug)]
struct Page {
    /// The frame of this 4 KiB of the page.
    hpa: u64,
    writable: bool,
    /// The size of the translated page it is part of.
    size: u64,
}

impl Page {
    fn translation(&self) -> DmaTranslation {
        DmaTranslation::new(Hpa(self.hpa & !(self.size - 1)), self.size).unwrap()
    }
}

#[derive(Default)]
struct State {
    pages: HashMap<(Option<Pasid>, u64), Page>,
    /// Address spaces with a PASID entry; others fault non-recoverably (SPT.2).
    spaces: HashSet<Option<Pasid>>,
    /// The PASID entries allow page requests: not-present and permission faults are
    /// recoverable.
    pri: bool,
    /// The context entry allows translated requests.
    translated_ok: bool,
    /// Translated requests checked.
    translated_checks: u64,
    /// Untranslated requests answer for runs of pages ([`DmaPort::remap_run`]), not for
    /// one page.
    lookahead: bool,
    requests: Vec<PageRequestMessage>,
    /// Answer each page request at once, from inside the call, with this code.
    auto_response: Option<(Weak<dyn AtsEndpoint>, ResponseCode)>,
    /// After the next translation completion for this device page is made and before it
    /// is returned: move the page to this frame and invalidate the device TLB (an unmap
    /// racing the request).
    remap_in_translate: Option<(Weak<dyn AtsEndpoint>, u64, u64)>,
    /// (page, new HPA, times): an untranslated request's translation of the page is
    /// answered from the old mapping, then the page moves and the port's invalidation
    /// completes (a drain) before the device uses it; `times` such requests.
    drain_in_remap: Option<(u64, u64, u32)>,
}

pub struct MockPort {
    mem: Arc<HostMemory>,
    state: Mutex<State>,
    drain: RequestDrain,
}

impl MockPort {
    pub fn new(mem: Arc<HostMemory>) -> Arc<Self> {
        Arc::new(MockPort {
            mem,
            drain: RequestDrain::new(),
            state: Mutex::new(State {
                translated_ok: true,
                ..State::default()
            }),
        })
    }

    pub fn add_space(&self, pasid: Option<Pasid>) {
        self.state.lock().unwrap().spaces.insert(pasid);
    }

    pub fn set_pri(&self, on: bool) {
        self.state.lock().unwrap().pri = on;
    }

    pub fn set_translated_ok(&self, on: bool) {
        self.state.lock().unwrap().translated_ok = on;
    }

    /// How many translated requests the port checked.
    pub fn translated_checks(&self) -> u64 {
        self.state.lock().unwrap().translated_checks
    }

    pub fn set_lookahead(&self, on: bool) {
        self.state.lock().unwrap().lookahead = on;
    }

    pub fn set_auto_response(&self, device: Weak<dyn AtsEndpoint>, code: ResponseCode) {
        self.state.lock().unwrap().auto_response = Some((device, code));
    }

    /// Makes the next ATS translation request for the page containing `addr` race an
    /// unmap: once its completion is made, the page moves to the frame at `hpa` and
    /// `device`'s TLB is invalidated for it.
    pub fn set_remap_in_translate(&self, device: Weak<dyn AtsEndpoint>, addr: u64, hpa: u64) {
        self.state.lock().unwrap().remap_in_translate = Some((device, addr / PAGE_SIZE, hpa));
    }

    /// Maps the device page containing `addr` to the frame at `hpa`.
    pub fn set_drain_in_remap(&self, addr: u64, hpa: u64, times: u32) {
        self.state.lock().unwrap().drain_in_remap = Some((addr / PAGE_SIZE, hpa, times));
    }

    pub fn map(&self, pasid: Option<Pasid>, addr: u64, hpa: u64, writable: bool) {
        self.map_page(pasid, addr, hpa, PAGE_SIZE, writable);
    }

    /// Maps the device page of `size` bytes (a power of two of 4 KiB or more) containing
    /// `addr` to the frames from `hpa` (aligned to `size`) on.
    pub fn map_page(&self, pasid: Option<Pasid>, addr: u64, hpa: u64, size: u64, writable: bool) {
        assert!(size.is_power_of_two() && size >= PAGE_SIZE && hpa % size == 0);
        let base = addr & !(size - 1);
        let mut st = self.state.lock().unwrap();
        for off in (0..size).step_by(PAGE_SIZE as usize) {
            let page = Page {
                hpa: hpa + off,
                writable,
                size,
            };
            st.pages.insert((pasid, (base + off) / PAGE_SIZE), page);
        }
    }

    pub fn unmap(&self, pasid: Option<Pasid>, addr: u64) {
        self.state
            .lock()
            .unwrap()
            .pages
            .remove(&(pasid, addr / PAGE_SIZE));
    }

    pub fn take_requests(&self) -> Vec<PageRequestMessage> {
        std::mem::take(&mut self.state.lock().unwrap().requests)
    }

    /// Reads `len` bytes at a device address through the map (the CPU's view).
    pub fn read_dev(&self, pasid: Option<Pasid>, addr: u64, len: usize) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        (0..len as u64)
            .map(|i| {
                let a = addr + i;
                let page = st.pages[&(pasid, a / PAGE_SIZE)];
                let mut b = [0u8];
                vsva_mem::PhysMem::read(&*self.mem, page.hpa + a % PAGE_SIZE, &mut b).unwrap();
                b[0]
            })
            .collect()
    }

    /// Writes bytes at a device address through the map.
    pub fn write_dev(&self, pasid: Option<Pasid>, addr: u64, data: &[u8]) {
        let st = self.state.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            let a = addr + i as u64;
            let page = st.pages[&(pasid, a / PAGE_SIZE)];
            vsva_mem::PhysMem::write(&*self.mem, page.hpa + a % PAGE_SIZE, &[*b]).unwrap();
        }
    }

    fn walk(&self, pasid: Option<Pasid>, addr: u64, access: DmaAccess) -> Result<Page, DmaFault> {
        let st = self.state.lock().unwrap();
        if !st.spaces.contains(&pasid) {
            return Err(DmaFault {
                reason: FaultReason::Spt2.code(),
                recoverable: false,
            });
        }
        let fault = |reason: FaultReason| DmaFault {
            reason: reason.code(),
            recoverable: st.pri,
        };
        let page = st
            .pages
            .get(&(pasid, addr / PAGE_SIZE))
            .ok_or(fault(FaultReason::Sfl2))?;
        if access.write && !page.writable {
            return Err(fault(FaultReason::Sgn6));
        }
        Ok(*page)
    }
}

impl DmaPort for MockPort {
    fn remap(
        &self,
        _sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        let page = self.walk(pasid, addr, access)?;
        let race = {
            let mut st = self.state.lock().unwrap();
            match &mut st.drain_in_remap {
                Some((p, hpa, times)) if *p == addr / PAGE_SIZE && *times > 0 => {
                    *times -= 1;
                    Some(*hpa)
                }
                _ => None,
            }
        };
        if let Some(hpa) = race {
            self.map(pasid, addr, hpa, page.writable);
            self.drain.drain();
        }
        Ok(page.translation())
    }

    /// With lookahead, the pages after the first that translate for `access` and
    /// continue the run in host memory, up to the one holding byte `addr + len - 1`.
    fn remap_run(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
        len: u64,
    ) -> Result<DmaRun, DmaFault> {
        let run = DmaRun::page(self.remap(sid, pasid, addr, access)?, addr);
        if !self.state.lock().unwrap().lookahead {
            return Ok(run);
        }
        let last = addr.saturating_add(len.max(1) - 1);
        Ok(run.grow_to(last, |next| {
            self.walk(pasid, next, access).ok().map(|p| p.translation())
        }))
    }

    fn ats_translate(
        &self,
        _sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<AtsCompletion, DmaFault> {
        let page = self.walk(pasid, addr, access)?;
        let completion = AtsCompletion {
            page: page.translation(),
            perm: DmaAccess {
                read: true,
                write: page.writable,
                execute: false,
                privileged: access.privileged,
            },
        };
        let race = {
            let mut st = self.state.lock().unwrap();
            let hit =
                matches!(st.remap_in_translate, Some((_, page, _)) if page == addr / PAGE_SIZE);
            if hit {
                st.remap_in_translate.take()
            } else {
                None
            }
        };
        if let Some((device, _, hpa)) = race {
            self.map(pasid, addr, hpa, page.writable);
            if let Some(device) = device.upgrade() {
                device.invalidate_devtlb(DevTlbInvalidation::from_size_bit(
                    pasid, false, addr, false,
                ));
            }
        }
        Ok(completion)
    }

    fn check_translated(
        &self,
        _sid: SourceId,
        _hpa: Hpa,
        _len: u64,
        _access: DmaAccess,
    ) -> Result<(), DmaFault> {
        let mut st = self.state.lock().unwrap();
        st.translated_checks += 1;
        if st.translated_ok {
            Ok(())
        } else {
            Err(DmaFault {
                reason: FaultReason::Sct2.code(),
                recoverable: false,
            })
        }
    }

    fn page_request(&self, req: PageRequestMessage) {
        let auto = {
            let mut st = self.state.lock().unwrap();
            st.requests.push(req);
            st.auto_response.clone()
        };
        if let Some((device, code)) = auto {
            if let Some(device) = device.upgrade() {
                device.page_response(PrgResponse {
                    pasid: req.pasid,
                    prgi: req.prgi,
                    code,
                });
            }
        }
    }

    fn memory(&self) -> &HostMemory {
        &self.mem
    }

    fn request_drain(&self) -> &RequestDrain {
        &self.drain
    }
}
