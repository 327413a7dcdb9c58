//! A host served on a socket in this process and clients over real `SOCK_SEQPACKET`
//! connections: every byte crosses the wire protocol, the memory window crosses as an
//! `SCM_RIGHTS` memfd.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;

use common::{settle, Served};
use vm_memory::{Bytes, GuestAddress};
use vsva_service::{client::RemoteFile, client::SharedRam, server::HostConfig, server::Limits};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{
    error::Errno, file::IommuModel, file::VfioIoctls, request::BindGpasid,
    request::CacheInvalidate, request::DmaMap, request::InvGranularity,
};
use vsva_vtd::{addr::Gpa, addr::Iova};

fn serve() -> Served {
    serve_with(Limits::default())
}

fn serve_with(limits: Limits) -> Served {
    common::serve(&HostConfig {
        memory: 256 << 20,
        limits,
        strict: false,
        ..HostConfig::default()
    })
}

const RAM: u64 = 4 << 20;

fn bind(hpasid: vsva_vtd::addr::Pasid) -> BindGpasid {
    BindGpasid {
        hpasid,
        gpasid: Some(hpasid),
        gpgd: Gpa(0x10_0000),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    }
}

/// A client: container set to nesting, RAM shared and mapped at IOVA 0.
fn client(path: &std::path::Path) -> (RemoteFile, SharedRam) {
    let file = RemoteFile::connect(path).unwrap();
    let ram = SharedRam::new(RAM).unwrap();
    ram.nesting_container(&file).unwrap();
    (file, ram)
}

#[test]
fn a_container_over_the_socket_maps_binds_invalidates_and_leaves_nothing() {
    let served = serve();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    {
        let (file, ram) = client(&served.path);
        let mut f = &file;
        assert_eq!(f.api_version().unwrap(), 0);
        let info = f.get_info().unwrap();
        assert!(info.nesting.is_some());
        let p = f.pasid_alloc(1, 100).unwrap();
        f.bind_gpasid(&bind(p)).unwrap();
        f.cache_invalidate(&CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        })
        .unwrap();
        let held = probe.host_state().unwrap();
        assert_eq!(held.connections, before.connections + 1);
        assert_eq!(held.pasids, before.pasids + 1);
        assert_eq!(held.windows, 1);
        assert_eq!(held.window_bytes, RAM);
        assert_eq!(held.domain_ids, before.domain_ids + 1);
        assert_eq!(held.dma_mappings, before.dma_mappings + 1);
        assert_eq!(held.binds, before.binds + 1);
        // Bytes the VMM writes are host memory: the host's view is the same file.
        ram.mem.write_slice(b"guest", GuestAddress(0x2000)).unwrap();
        f.unbind_gpasid(&bind(p)).unwrap();
        f.pasid_free(p).unwrap();
        drop(file);
    }
    // The host closes a connection in its own time; wait (bounded) for it.
    let after = settle(&probe, |s| *s == before);
    assert_eq!(after, before);
    drop(probe);
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn a_client_cannot_reach_another_clients_pasids_or_memory() {
    let served = serve();
    let (a, ram_a) = client(&served.path);
    let (b, _ram_b) = client(&served.path);
    let p = (&a).pasid_alloc(1, 100).unwrap();
    assert_eq!((&b).pasid_free(p), Err(Errno::EPERM));
    assert_eq!((&b).bind_gpasid(&bind(p)), Err(Errno::EPERM));
    // B names A's RAM by its address in A: outside B's windows, so EFAULT.
    let m = DmaMap {
        iova: Iova(RAM),
        vaddr: ram_a.addr(),
        size: 4096,
        read: true,
        write: true,
    };
    if ram_a.addr() != _ram_b.addr() {
        assert_eq!((&b).map_dma(&m), Err(Errno::EFAULT));
    }
    // B names an address beyond its own window: EFAULT, and nothing is mapped.
    let beyond = DmaMap {
        vaddr: _ram_b.addr() + RAM - 4096,
        size: 8192,
        ..m
    };
    assert_eq!((&b).map_dma(&beyond), Err(Errno::EFAULT));
    (&a).pasid_free(p).unwrap();
    drop((a, b));
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn a_window_that_lies_about_its_size_or_is_no_memfd_is_refused() {
    let served = serve();
    let file = RemoteFile::connect(&served.path).unwrap();
    let ram = SharedRam::new(RAM).unwrap();
    assert_eq!(
        file.add_memory(ram.file.as_fd(), ram.addr(), 2 * RAM),
        Err(Errno::EINVAL)
    );
    let not_memfd = std::fs::File::open("/proc/self/exe").unwrap();
    assert_eq!(
        file.add_memory(not_memfd.as_fd(), ram.addr(), 4096),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        file.add_memory(ram.file.as_fd(), ram.addr() + 1, 4096),
        Err(Errno::EINVAL)
    );
    let s = file.host_state().unwrap();
    assert_eq!((s.windows, s.window_bytes), (0, 0));
    ram.share(&file).unwrap();
    assert_eq!(ram.share(&file), Err(Errno::EEXIST));
    drop(file);
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn per_client_limits_hold_for_each_connection_alone() {
    let served = serve_with(Limits {
        max_windows: 2,
        max_window_bytes: 3 * RAM,
        pasid_quota: 3,
        ..Limits::default()
    });
    let (a, _ram_a) = client(&served.path);
    let w = a.welcome();
    assert_eq!((w.max_windows, w.max_window_bytes), (2, 3 * RAM));
    // Windows: the second fits; a third, or one over the byte budget, does not.
    let big = SharedRam::new(2 * RAM + 4096).unwrap();
    assert_eq!(big.share(&a), Err(Errno::ENOSPC));
    let second = SharedRam::new(RAM).unwrap();
    second.share(&a).unwrap();
    let third = SharedRam::new(4096).unwrap();
    assert_eq!(third.share(&a), Err(Errno::ENOSPC));
    // PASIDs: the quota, then ENOSPC; another connection has its own quota.
    let mut f = &a;
    let held: Vec<_> = (0..3).map(|_| f.pasid_alloc(1, 1000).unwrap()).collect();
    assert_eq!(f.pasid_alloc(1, 1000), Err(Errno::ENOSPC));
    let (b, _ram_b) = client(&served.path);
    let pb = (&b).pasid_alloc(1, 1000).unwrap();
    assert!(!held.contains(&pb));
    drop((a, b));
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn a_host_full_of_connections_refuses_one_more_with_eusers_and_serves_the_rest() {
    let served = serve_with(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let (a, _ram_a) = client(&served.path);
    let (b, _ram_b) = client(&served.path);
    let pb = (&b).pasid_alloc(1, 100).unwrap();
    match RemoteFile::connect(&served.path) {
        Err(vsva_service::client::ClientError::Full(e)) => assert_eq!(e, Errno::new(libc::EUSERS)),
        other => panic!("a third connection: {other:?}"),
    }
    // The two admitted clients are served as before.
    let pa = (&a).pasid_alloc(1, 100).unwrap();
    (&a).bind_gpasid(&bind(pa)).unwrap();
    assert_eq!(b.host_state().unwrap().connections, 2);
    // Once one closes, there is room again.
    drop((b, _ram_b));
    let c = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match RemoteFile::connect(&served.path) {
                Ok(c) => break c,
                Err(vsva_service::client::ClientError::Full(_)) => {
                    assert!(std::time::Instant::now() < deadline, "no room ever");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    (&c).set_iommu(IommuModel::Type1Nesting).unwrap();
    let pc = (&c).pasid_alloc(1, 100).unwrap();
    assert_ne!(pc, pa);
    assert!(pb != pa);
    (&a).unbind_gpasid(&bind(pa)).unwrap();
    drop((a, c));
    let report = served.finish();
    assert!(report.refused >= 1, "{report}");
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn a_client_with_a_ring_and_one_without_are_served_alike() {
    use vsva_service::client::Transport;
    use vsva_service::protocol::FILE_VFIO_CONTAINER;
    let served = serve();
    let path = served.path.clone();
    let mut results = Vec::new();
    for transport in [Transport::Ring, Transport::Socket] {
        let file = RemoteFile::connect_with(&path, FILE_VFIO_CONTAINER, transport).unwrap();
        assert_eq!(file.has_ring(), transport == Transport::Ring);
        assert_eq!(
            file.welcome().flags,
            u16::from(transport == Transport::Ring)
        );
        let ram = SharedRam::new(RAM).unwrap();
        ram.nesting_container(&file).unwrap();
        let mut f = &file;
        let p = f.pasid_alloc(1, 1 << 19).unwrap();
        f.bind_gpasid(&bind(p)).unwrap();
        f.cache_invalidate(&CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        })
        .unwrap();
        assert!(file.host_state().unwrap().binds >= 1);
        // A second bind of the same PASID is refused alike; a read of an empty fault
        // queue is EAGAIN alike.
        let again = f.bind_gpasid(&bind(p));
        let mut buf = [0u8; 256];
        let read = vsva_uapi::file::UapiFile::read(&file, &mut buf);
        f.unbind_gpasid(&bind(p)).unwrap();
        f.pasid_free(p).unwrap();
        results.push((again, read));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].1, Err(Errno::EAGAIN));
    assert!(results[0].0.is_err());
    let report = served.finish();
    assert_eq!(report.errors, 4, "{report}");
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn connections_are_served_concurrently() {
    let served = serve();
    let path = served.path.clone();
    let all_connected = Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            let all_connected = all_connected.clone();
            std::thread::spawn(move || {
                let (file, _ram) = client(&path);
                all_connected.wait();
                let mut f = &file;
                for _ in 0..200 {
                    let p = f.pasid_alloc(1, 1 << 19).unwrap();
                    f.bind_gpasid(&bind(p)).unwrap();
                    f.unbind_gpasid(&bind(p)).unwrap();
                    f.pasid_free(p).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let report = served.finish();
    assert_eq!(report.peak_connections, 4, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn the_fault_queue_file_calls_cross_the_socket() {
    use std::os::fd::AsFd;
    use vsva_service::protocol::{encode_request, Reply, Request};
    let served = serve();
    let (file, _ram) = client(&served.path);
    let mut buf = [0u8; 4096];
    assert_eq!(
        vsva_uapi::file::UapiFile::read(&file, &mut buf),
        Err(Errno::EAGAIN)
    );
    assert_eq!(
        vsva_uapi::file::UapiFile::read(&file, &mut buf[..8]),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        vsva_uapi::file::UapiFile::write(&file, &[0; 8]),
        Err(Errno::EFAULT)
    );
    // A notifier goes as an eventfd; anything else (a memfd here) is refused, as are two.
    vsva_uapi::file::UapiFile::set_event_notifier(&file, Some(Arc::new(|| {})));
    vsva_uapi::file::UapiFile::set_event_notifier(&file, None);
    let sock = vsva_service::socket::connect(&served.path).unwrap();
    let call = |frame: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
        vsva_service::socket::send(sock.as_fd(), frame, fds).unwrap();
        let r = vsva_service::socket::recv(sock.as_fd()).unwrap().unwrap();
        Reply::decode(&r.bytes).unwrap().result
    };
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        file: vsva_service::protocol::FILE_VFIO_CONTAINER,
        ring: false,
    };
    assert_eq!(call(&encode_request(1, &hello), &[]), Ok(0));
    let ram = SharedRam::new(4096).unwrap();
    let set = encode_request(2, &Request::SetEventfd);
    assert_eq!(call(&set, &[ram.file.as_fd()]), Err(Errno::EINVAL));
    let efd = new_eventfd();
    assert_eq!(call(&set, &[efd.as_fd(), efd.as_fd()]), Err(Errno::EINVAL));
    assert_eq!(call(&set, &[efd.as_fd()]), Ok(0));
    assert_eq!(call(&set, &[]), Ok(0));
    drop((file, sock));
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

#[test]
fn the_eventfd_fires_when_a_page_request_is_queued_and_state_counts_it() {
    use std::os::fd::AsFd;
    let served = serve();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    let (file, _ram) = client(&served.path);
    let efd = new_eventfd();
    file.set_eventfd(Some(efd.as_fd())).unwrap();
    let mut f = &file;
    let p = f.pasid_alloc(1, 100).unwrap();
    f.bind_gpasid(&bind(p)).unwrap();
    file.device_add().unwrap();
    // The guest table at 0x10_0000 is a zeroed page: the fill faults on its first page and
    // the device asks for it.
    file.device_write(0, &faulting_fill(p).encode()).unwrap();
    assert_eq!(
        probe.host_state().unwrap().faults_unread,
        before.faults_unread
    );
    assert!(
        file.device_run().unwrap() > 0,
        "the DMA waits on a page request"
    );
    // The eventfd is readable, and says one record was queued.
    let mut pfd = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&efd),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll(2) on one valid pollfd for at most 5 s.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 5000) };
    assert_eq!(n, 1, "the eventfd never fired");
    let mut count = [0u8; 8];
    assert_eq!(rustix::io::read(&efd, &mut count), Ok(8));
    assert_eq!(u64::from_ne_bytes(count), 1);
    let s = probe.host_state().unwrap();
    assert_eq!(s.page_requests, before.page_requests + 1);
    assert_eq!(s.faults_unread, before.faults_unread + 1);
    assert_eq!(s.binds, before.binds + 1);
    // Reading the record empties the queue; the group still waits for its response.
    let faults = vsva_uapi::file::UapiFile::read_faults(&file).unwrap();
    assert_eq!(faults.len(), 1);
    let s = probe.host_state().unwrap();
    assert_eq!(s.faults_unread, before.faults_unread);
    assert_eq!(s.page_requests, before.page_requests + 1);
    // Closing the file answers the group and releases everything.
    drop(file);
    assert_eq!(settle(&probe, |s| *s == before), before);
    drop(probe);
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

/// A 64-byte fill at 0x40_0000 on PASID `p` that blocks on its fault: bound to the zeroed
/// guest table at 0x10_0000, it faults on its first page and the device asks for it.
fn faulting_fill(p: vsva_vtd::addr::Pasid) -> vsva_hw::dma::Descriptor {
    vsva_hw::dma::Descriptor {
        pasid: Some(p),
        privileged: false,
        block_on_fault: true,
        completion: vsva_hw::dma::CompletionRequest::None,
        op: vsva_hw::dma::Operation::Fill {
            pattern: 0xa5,
            dst: 0x40_0000,
            size: 64,
        },
    }
}

#[test]
fn a_device_run_taking_records_carries_the_page_request_read_would_give() {
    use vsva_uapi::{file::UapiFile, request::QueuedFault, vfio::VfioIommuType1Fault};
    let served = serve();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    let (file, _ram) = client(&served.path);
    let mut f = &file;
    let p = f.pasid_alloc(1, 100).unwrap();
    f.bind_gpasid(&bind(p)).unwrap();
    let rid = file.device_add().unwrap();
    // Nothing submitted: nothing waits, nothing is taken.
    assert_eq!(file.device_run_taking_records(), Ok((0, Vec::new())));
    // The guest table at 0x10_0000 is a zeroed page: the fill faults on its first page.
    file.device_write(0, &faulting_fill(p).encode()).unwrap();
    let (waiting, records) = file.device_run_taking_records().unwrap();
    assert!(waiting > 0, "the DMA waits on a page request");
    assert_eq!(
        records.len(),
        size_of::<VfioIommuType1Fault>(),
        "one record"
    );
    let record = VfioIommuType1Fault::from_bytes(&records).unwrap();
    let QueuedFault::PageRequest(event) = QueuedFault::try_from(&record).unwrap() else {
        panic!("not a page request: {record:?}");
    };
    assert_eq!(event.sid, rid);
    assert_eq!(
        (event.request.pasid, event.request.addr),
        (Some(p), 0x40_0000)
    );
    assert!(event.request.write && event.request.last_page);
    // Taken as `READ` takes it: none left unread, the group still waits for its response.
    let s = probe.host_state().unwrap();
    assert_eq!(s.faults_unread, before.faults_unread);
    assert_eq!(s.page_requests, before.page_requests + 1);
    assert_eq!(file.read_faults(), Ok(Vec::new()));
    // Closing the file answers the group and releases everything.
    drop(file);
    assert_eq!(settle(&probe, |s| *s == before), before);
    drop(probe);
    let report = served.finish();
    assert_eq!(report.left, report.baseline, "{report}");
}

fn new_eventfd() -> std::os::fd::OwnedFd {
    // SAFETY: eventfd(2) returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor this function owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// Random frames (random bytes, and random payloads behind a valid header of a random
    /// kind) on one connection get a reply or close that connection only: a client on
    /// another connection keeps its PASID and is served, and the host leaks nothing.
    #[test]
    fn random_frames_never_disturb_another_client(
        frames in proptest::collection::vec(
            (proptest::prelude::any::<bool>(), 0u16..12, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)),
            1..24,
        )
    ) {
        use std::os::fd::AsFd;
        use vsva_service::protocol::{encode_request, Request, FILE_VFIO_CONTAINER};
        let served = serve();
        let (good, _ram) = client(&served.path);
        let p = (&good).pasid_alloc(1, 100).unwrap();
        let sock = vsva_service::socket::connect(&served.path).unwrap();
        let hello = encode_request(1, &Request::Hello { min_version: 1, max_version: 1, file: FILE_VFIO_CONTAINER, ring: false });
        vsva_service::socket::send(sock.as_fd(), &hello, &[]).unwrap();
        vsva_service::socket::recv(sock.as_fd()).unwrap().unwrap();
        for (raw, kind, bytes) in &frames {
            let frame = if *raw {
                bytes.clone()
            } else {
                let mut f = vsva_service::protocol::MAGIC.to_le_bytes().to_vec();
                f.extend_from_slice(&1u16.to_le_bytes());
                f.extend_from_slice(&kind.to_le_bytes());
                f.extend_from_slice(&9u32.to_le_bytes());
                f.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                f.extend_from_slice(bytes);
                f
            };
            if vsva_service::socket::send(sock.as_fd(), &frame, &[]).is_err() {
                break;
            }
            match vsva_service::socket::recv(sock.as_fd()) {
                Ok(Some(r)) => {
                    proptest::prop_assert!(vsva_service::protocol::Reply::decode(&r.bytes).is_ok());
                }
                _ => break,
            }
        }
        // The good client still owns its PASID and is served.
        (&good).pasid_free(p).unwrap();
        drop((good, sock));
        let report = served.finish();
        proptest::prop_assert_eq!(report.left, report.baseline, "{}", report);
    }
}
