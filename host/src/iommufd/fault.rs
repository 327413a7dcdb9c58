//! An iommufd fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, `drivers/iommu/iommufd/eventq.c`):
//! the file a VMM reads the page requests of its fault-capable HWPTs from, as 40-byte
//! `iommu_hwpt_pgfault` records, and writes 8-byte `iommu_hwpt_page_response`s to.
//!
//! Page requests arrive from the host driver through a `FaultQueue`'s sink (the one
//! routed to the nested HWPT's domain id). A group is delivered whole once its last
//! request has arrived, every record of it carrying the group's cookie; the group then
//! waits for the response that echoes the cookie (an unknown cookie is EINVAL), which the
//! driver sends to the device as a page group response.
//!
//! The response goes down through the file's [`PageResponder`], one per IOMMU: on VT-d a
//! page group response descriptor, on an SMMUv3 CMD_PRI_RESP for a PRI group or
//! CMD_RESUME for a stalled transaction (whose STAG is the group id).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_uapi::iommufd::*;
use vsva_uapi::request::{FaultEvent, PageRequest, PageResponse, PageResponseCode};
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};
use vsva_vtd::{addr::Pasid, addr::SourceId};

use crate::fault::{FaultQueue, FaultSink};

/// Where a fault queue's page responses go: the IOMMU driver's `page_response`
/// (`iommu_ops.page_response`).
pub trait PageResponder: Send + Sync + std::fmt::Debug {
    /// Answers the group whose last request is `request`, from device `sid`, with
    /// `response`; the errno of a refusal.
    fn page_response(
        &self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), Errno>;
}

const RECORD: usize = std::mem::size_of::<IommuHwptPgfault>();
const RESPONSE: usize = std::mem::size_of::<IommuHwptPageResponse>();

/// A delivered group waiting for its response.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    last: FaultEvent,
}

#[derive(Debug, Default)]
struct Groups {
    /// Requests of groups whose last request has not arrived, by (device, group index).
    partial: BTreeMap<(SourceId, u32), Vec<FaultEvent>>,
    /// Whole groups not read yet, oldest first.
    ready: VecDeque<Vec<FaultEvent>>,
    /// Read groups waiting for a response, by cookie.
    waiting: BTreeMap<u32, Waiting>,
    next_cookie: u32,
    /// The iommufd device id of each device the queue serves.
    dev_ids: BTreeMap<SourceId, u32>,
    /// The (device, PASID) pairs whose requests the queue takes.
    members: BTreeSet<(SourceId, Pasid)>,
}

/// One fault queue file.
#[derive(Debug)]
pub struct FaultFile {
    responder: Arc<dyn PageResponder>,
    queue: FaultQueue,
    groups: Mutex<Groups>,
}

fn respond_to(e: &FaultEvent, code: PageResponseCode) -> PageResponse {
    PageResponse {
        pasid: e.request.pasid.filter(|_| e.request.needs_pasid),
        grpid: e.request.grpid,
        code,
    }
}

impl FaultFile {
    pub(crate) fn new(responder: Arc<dyn PageResponder>) -> Arc<Self> {
        Arc::new(FaultFile {
            responder,
            queue: FaultQueue::new(),
            groups: Mutex::new(Groups::default()),
        })
    }

    fn groups(&self) -> MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Groups read and waiting for their response, and records of whole groups not
    /// read yet.
    pub fn pending(&self) -> (usize, usize) {
        let mut g = self.groups();
        self.collect(&mut g);
        (g.waiting.len(), g.ready.iter().map(Vec::len).sum())
    }

    /// The sink the driver reports this queue's page requests to.
    pub(crate) fn sink(&self) -> FaultSink {
        self.queue.sink()
    }

    /// Accepts page requests of device `sid` (iommufd id `dev_id`) on `pasid`.
    pub(crate) fn add(&self, sid: SourceId, dev_id: u32, pasid: Pasid) {
        self.queue.attach(sid);
        self.queue.add_pasid(pasid);
        let mut g = self.groups();
        g.dev_ids.insert(sid, dev_id);
        g.members.insert((sid, pasid));
    }

    /// Stops taking page requests of `sid` on `pasid` and answers its groups still
    /// unanswered with Invalid (`iommufd_auto_response_faults`).
    pub(crate) fn remove(&self, sid: SourceId, pasid: Pasid) {
        let gone = |e: &FaultEvent| e.sid == sid && e.request.pasid == Some(pasid);
        let mut g = self.groups();
        g.members.remove(&(sid, pasid));
        // The queue filters by PASID alone: another device's use of the PASID keeps it.
        let mut answer = self.queue.remove_pasid(pasid);
        if g.members.iter().any(|&(_, p)| p == pasid) {
            self.queue.add_pasid(pasid);
            answer.retain(|e| gone(e));
        }
        self.forget(g, gone, answer);
    }

    /// Accepts the page requests of stream `sid` (iommufd id `dev_id`) whatever their
    /// SubstreamID: on an SMMU the guest's CD table owns them.
    pub(crate) fn add_stream(&self, sid: SourceId, dev_id: u32) {
        self.queue.attach(sid);
        self.queue.set_guest_table(true);
        self.groups().dev_ids.insert(sid, dev_id);
    }

    /// Stops taking page requests of stream `sid` and answers its groups still unanswered
    /// with Invalid (`iommufd_auto_response_faults`).
    pub(crate) fn remove_stream(&self, sid: SourceId) {
        let mut g = self.groups();
        let answer = self.queue.detach(sid);
        g.dev_ids.remove(&sid);
        self.forget(g, |e: &FaultEvent| e.sid == sid, answer);
    }

    /// Drops the groups `gone` picks, read or not, and answers `answer` (the queue's
    /// pending groups of them, which include the read ones waiting for a response) with
    /// Invalid, each once.
    fn forget(
        &self,
        mut g: MutexGuard<'_, Groups>,
        gone: impl Fn(&FaultEvent) -> bool,
        answer: Vec<FaultEvent>,
    ) {
        g.partial.retain(|_, v| !v.first().is_some_and(&gone));
        g.ready.retain(|v| !v.first().is_some_and(&gone));
        g.waiting.retain(|_, w| !gone(&w.last));
        drop(g);
        for e in answer {
            if let Err(err) = self.responder.page_response(
                e.sid,
                &e.request,
                &respond_to(&e, PageResponseCode::Invalid),
            ) {
                tracing::debug!(
                    "auto-responding group {} of {}: {err}",
                    e.request.grpid,
                    e.sid
                );
            }
        }
    }

    /// Moves reported requests into groups; whole groups become ready.
    fn collect(&self, g: &mut Groups) {
        for e in self.queue.read() {
            let key = (e.sid, e.request.grpid);
            let mut group = g.partial.remove(&key).unwrap_or_default();
            group.push(e);
            if e.request.last_page {
                g.ready.push_back(group);
            } else {
                g.partial.insert(key, group);
            }
        }
    }

    fn record(e: &FaultEvent, dev_id: u32, cookie: u32) -> IommuHwptPgfault {
        let r = &e.request;
        let mut flags = 0;
        if r.pasid.is_some() {
            flags |= IOMMU_PGFAULT_FLAGS_PASID_VALID;
        }
        if r.last_page {
            flags |= IOMMU_PGFAULT_FLAGS_LAST_PAGE;
        }
        let perm = [
            (r.read, IOMMU_PGFAULT_PERM_READ),
            (r.write, IOMMU_PGFAULT_PERM_WRITE),
            (r.exec, IOMMU_PGFAULT_PERM_EXEC),
            (r.privileged, IOMMU_PGFAULT_PERM_PRIV),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bit)| acc | bit);
        IommuHwptPgfault {
            flags,
            dev_id,
            pasid: r.pasid.map_or(0, Pasid::raw),
            grpid: r.grpid,
            perm,
            __reserved: 0,
            addr: r.addr,
            length: 4096,
            cookie,
        }
    }
}

impl UapiFile for FaultFile {
    /// No ioctl on a fault queue file.
    fn ioctl(&self, cmd: u32, _arg: &mut [u8]) -> Result<usize, Errno> {
        tracing::debug!("fault queue: ioctl {cmd:#x}");
        Err(Errno::ENOTTY)
    }

    /// Whole groups, as many as fit, each record with its group's cookie; EINVAL for a
    /// buffer that is not a whole number of records or holds less than the next group,
    /// EAGAIN when no whole group is queued.
    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        if buf.is_empty() || buf.len() % RECORD != 0 {
            return Err(Errno::EINVAL);
        }
        let mut g = self.groups();
        self.collect(&mut g);
        let mut done = 0;
        while let Some(group) = g.ready.front() {
            let need = group.len() * RECORD;
            if done + need > buf.len() {
                break;
            }
            let Some(group) = g.ready.pop_front() else {
                break;
            };
            let cookie = g.next_cookie;
            g.next_cookie = g.next_cookie.wrapping_add(1);
            for e in &group {
                let dev_id = g.dev_ids.get(&e.sid).copied().unwrap_or(0);
                let rec = Self::record(e, dev_id, cookie).to_bytes();
                buf[done..done + RECORD].copy_from_slice(&rec);
                done += RECORD;
            }
            if let Some(&last) = group.last() {
                g.waiting.insert(cookie, Waiting { last });
            }
        }
        match (done, g.ready.is_empty()) {
            (0, true) => Err(Errno::EAGAIN),
            (0, false) => Err(Errno::EINVAL),
            (n, _) => Ok(n),
        }
    }

    /// Responses, each answering the group whose cookie it echoes with SUCCESS or
    /// INVALID; EINVAL for a length that is not whole responses, an unknown cookie or
    /// code (the responses before it are done, and their bytes returned).
    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        if buf.is_empty() || buf.len() % RESPONSE != 0 {
            return Err(Errno::EINVAL);
        }
        let mut done = 0;
        for chunk in buf.chunks_exact(RESPONSE) {
            let resp: IommuHwptPageResponse = read_prefix(chunk, RESPONSE);
            let code = match resp.code {
                IOMMUFD_PAGE_RESP_SUCCESS => PageResponseCode::Success,
                IOMMUFD_PAGE_RESP_INVALID => PageResponseCode::Invalid,
                _ => {
                    return if done > 0 {
                        Ok(done)
                    } else {
                        Err(Errno::EINVAL)
                    }
                }
            };
            let Some(w) = self.groups().waiting.remove(&resp.cookie) else {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(Errno::EINVAL)
                };
            };
            let answer = respond_to(&w.last, code);
            if let Ok((seq, _)) = self.queue.find_pending(Some(w.last.sid), &answer) {
                self.queue.remove_pending(seq);
            }
            if let Err(e) = self
                .responder
                .page_response(w.last.sid, &w.last.request, &answer)
            {
                tracing::debug!("fault queue: page response: {e}");
                return Err(e);
            }
            done += RESPONSE;
        }
        Ok(done)
    }

    /// Signalled for each request reported to the queue.
    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        self.queue.set_notifier(
            notifier.map(|n| -> crate::fault::FaultNotifier { Arc::new(move || n.notify()) }),
        );
    }
}
