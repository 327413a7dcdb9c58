//! Page requests: injection into the guest's page request queue, and the guest's page
//! group responses going back down to the host.

mod viommu;

use std::sync::Arc;

use viommu::*;
use vsva_uapi::{request::PageRequest, request::PageResponse, request::PageResponseCode};
use vsva_vmm::{PageRequestOutcome, VIommuError};
use vsva_vtd::addr::DomainId;
use vsva_vtd::inv_desc::{ContextCacheGranularity, ResponseCode};
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::layout::{offset, pq};
use vsva_vtd::regs::EventSource;
use vsva_vtd::{addr::Pasid, addr::SourceId, inv_desc::InvDesc};

const HOST_SID: SourceId = SourceId::from_rid(0x8100);

fn setup(pre: bool) -> (Arc<MockHost>, Guest, SourceId, Pasid) {
    let host = MockHost::new();
    let g = Guest::new(host.clone());
    g.enable();
    let dev = sid(0, 3, 0);
    g.viommu
        .attach_passthrough(dev, HOST_SID, host.clone())
        .unwrap();
    g.attach(dev, pre);
    let p = g.alloc_pasid();
    g.write(offset::PEDATA, 4, 0x41);
    host.take();
    (host, g, dev, p)
}

fn request(p: Pasid, grpid: u32, last_page: bool) -> PageRequest {
    PageRequest {
        pasid: Some(p),
        grpid,
        read: true,
        write: true,
        exec: false,
        privileged: false,
        addr: 0x7f00_1234_5000,
        last_page,
        needs_pasid: true,
        private_data: None,
    }
}

fn response(p: Option<Pasid>, grpid: u32, code: PageResponseCode) -> Call {
    Call::Response(
        HOST_SID,
        PageResponse {
            pasid: p,
            grpid,
            code,
        },
    )
}

#[test]
fn a_host_page_request_lands_in_the_guest_queue_with_an_interrupt() {
    let (host, g, dev, p) = setup(true);
    let q = g.enable_prq();
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 0x1a5, true))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::Queued);
    let desc = PageRequestDesc::decode(g.page_request(q, 0)).unwrap();
    assert_eq!(
        desc,
        PageRequestDesc {
            rid: dev,
            pasid: Some(p),
            exe: false,
            pm: false,
            read: true,
            write: true,
            lpig: true,
            prg_index: 0x1a5,
            addr: 0x7f00_1234_5000,
            private_data: None,
        }
    );
    assert_eq!(g.read(offset::PQT, 8), pq::DESC_SIZE);
    assert_eq!(g.read(offset::PRS, 4) as u32 & pq::PPR, pq::PPR);
    let irqs = g.take_irqs();
    assert_eq!(irqs.len(), 1);
    assert_eq!(
        (irqs[0].source, irqs[0].data),
        (EventSource::PageRequest, 0x41)
    );
    // PPR still set: the next request raises no new event.
    g.viommu
        .inject_host_page_request(HOST_SID, &request(p, 0x1a6, false))
        .unwrap();
    assert!(g.take_irqs().is_empty());
    assert_eq!(g.read(offset::PQT, 8), 2 * pq::DESC_SIZE);
    assert_eq!(g.viommu.stats().page_requests_injected, 2);
    assert!(host.take().is_empty(), "the guest answers, not the vIOMMU");
}

#[test]
fn the_guest_response_goes_down_to_the_host_device() {
    let (host, g, _dev, p) = setup(true);
    g.enable_prq();
    g.viommu
        .inject_host_page_request(HOST_SID, &request(p, 7, true))
        .unwrap();
    let answer = |pasid_present, response| InvDesc::PageGroupResponse {
        rid: sid(0, 3, 0),
        pasid_present,
        pasid: p,
        private_data_present: false,
        response,
        last_page_in_group: true,
        prg_index: 7,
        private_data: [0; 2],
    };
    assert!(g.submit_sync(&[
        answer(true, ResponseCode::Success),
        answer(false, ResponseCode::InvalidRequest),
        answer(true, ResponseCode::ResponseFailure),
    ]));
    assert_eq!(
        host.take(),
        vec![
            response(Some(p), 7, PageResponseCode::Success),
            response(None, 7, PageResponseCode::Invalid),
            response(Some(p), 7, PageResponseCode::Failure),
        ]
    );
    assert_eq!(g.viommu.stats().page_responses_forwarded, 3);
    // A response for a device that is not a passthrough device has no receiver.
    assert!(g.submit_sync(&[InvDesc::PageGroupResponse {
        rid: sid(0, 9, 0),
        pasid_present: true,
        pasid: p,
        private_data_present: false,
        response: ResponseCode::Success,
        last_page_in_group: true,
        prg_index: 7,
        private_data: [0; 2],
    }]));
    assert!(host.take().is_empty());
}

#[test]
fn requests_the_guest_cannot_take_are_answered_for_it() {
    // Page requests not enabled in the context entry: "Invalid Request", when due.
    let (host, g, _dev, p) = setup(false);
    g.enable_prq();
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 3, false))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::NotEnabled);
    assert!(
        host.take().is_empty(),
        "no answer due before the group's last request"
    );
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 3, true))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::NotEnabled);
    assert_eq!(
        host.take(),
        vec![response(Some(p), 3, PageResponseCode::Invalid)]
    );
    assert_eq!(g.read(offset::PQT, 8), 0);

    // A full queue: PRS.PRO, and "Success" so that the device retries.
    let (host, g, _dev, p) = setup(true);
    g.enable_prq();
    let slots = 4096 / pq::DESC_SIZE;
    for i in 0..slots - 1 {
        let out = g
            .viommu
            .inject_host_page_request(HOST_SID, &request(p, i as u32, false))
            .unwrap();
        assert_eq!(out, PageRequestOutcome::Queued);
    }
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 0x100, true))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::QueueFull);
    assert_eq!(g.read(offset::PRS, 4) as u32 & pq::PRO, pq::PRO);
    assert_eq!(
        host.take(),
        vec![response(Some(p), 0x100, PageResponseCode::Success)]
    );
    // The guest consumes one: there is room again.
    g.write(offset::PQH, 8, pq::DESC_SIZE);
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 0x101, true))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::Queued);
    let stats = g.viommu.stats();
    assert_eq!(
        (stats.page_requests_injected, stats.page_requests_dropped),
        (slots, 1)
    );

    // A queue outside guest RAM: "Response Failure".
    let (host, g, _dev, p) = setup(true);
    g.write(offset::PQA, 8, RAM + 0x10_0000);
    let out = g
        .viommu
        .inject_host_page_request(HOST_SID, &request(p, 9, true))
        .unwrap();
    assert_eq!(out, PageRequestOutcome::QueueUnwritable);
    assert_eq!(
        host.take(),
        vec![response(Some(p), 9, PageResponseCode::Failure)]
    );
    assert_eq!(g.read(offset::PQT, 8), 0);
}

#[test]
fn bad_host_reports_are_refused() {
    let (_host, g, _dev, p) = setup(true);
    g.enable_prq();
    assert!(matches!(
        g.viommu
            .inject_host_page_request(SourceId::from_rid(0x9900), &request(p, 1, true)),
        Err(VIommuError::NotAttached(_))
    ));
    assert!(matches!(
        g.viommu
            .inject_host_page_request(HOST_SID, &request(p, 0x200, true)),
        Err(VIommuError::PageRequestGroup(0x200))
    ));
    assert_eq!(g.read(offset::PQT, 8), 0);
}

#[test]
fn emulated_devices_inject_directly() {
    let g = Guest::new(Arc::new(LocalPasids::new(4)));
    g.enable();
    let dev = sid(0, 6, 0);
    g.attach(dev, true);
    let q = g.enable_prq();
    let req = PageRequestDesc {
        rid: dev,
        pasid: None,
        exe: true,
        pm: true,
        read: true,
        write: false,
        lpig: true,
        prg_index: 1,
        addr: 0x1000,
        private_data: Some([1, 2]),
    };
    assert_eq!(
        g.viommu.inject_page_request(&req),
        PageRequestOutcome::Queued
    );
    assert_eq!(PageRequestDesc::decode(g.page_request(q, 0)), Ok(req));
}

#[test]
fn page_requests_follow_the_cached_context_entry_until_it_is_invalidated() {
    let (host, g, dev, p) = setup(true);
    g.enable_prq();
    let inject = || {
        g.viommu
            .inject_host_page_request(HOST_SID, &request(p, 1, false))
            .unwrap()
    };
    assert_eq!(inject(), PageRequestOutcome::Queued);
    // The guest clears PRE: until it flushes the context cache, the entry the vIOMMU
    // cached still enables page requests, as the hardware's context cache would.
    g.attach(dev, false);
    assert_eq!(inject(), PageRequestOutcome::Queued);
    assert!(g.submit_sync(&[InvDesc::ContextCache {
        granularity: ContextCacheGranularity::DeviceSelective,
        did: DomainId(0),
        sid: dev,
        fm: 0,
    }]));
    assert_eq!(inject(), PageRequestOutcome::NotEnabled);
    // Set again and flushed: taken again.
    g.attach(dev, true);
    assert!(g.submit_sync(&[InvDesc::ContextCache {
        granularity: ContextCacheGranularity::Global,
        did: DomainId(0),
        sid: dev,
        fm: 0,
    }]));
    assert_eq!(inject(), PageRequestOutcome::Queued);
    assert!(
        host.take().is_empty(),
        "no answer due before the group's last request"
    );
}
