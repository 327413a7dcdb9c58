//! The vIOMMU over real VFIO containers: every host call goes through the container's
//! byte-level ioctl path, its validation and ownership checks, to a recording IOMMU driver.

mod viommu;

use std::sync::{Arc, Mutex};

use viommu::*;
use vsva_host::{
    container::BackendInfo, container::Container, container::IommuBackend,
    container::SharedPasidAllocator, error::HostError, file::ContainerFile, pasid::PasidAllocator,
};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_NESTING_FEAT_BIND_PGTBL,
    IOMMU_NESTING_FEAT_CACHE_INVLD,
};
use vsva_uapi::{file::IommuModel, file::VfioIoctls};
use vsva_uapi::{
    request::BindGpasid, request::CacheInvalidate, request::DmaMap, request::InvGranularity,
    request::NestingInfo, request::PageRequest, request::PageResponse, request::PageResponseCode,
};
use vsva_vmm::{bind_data, HostSva, PageRequestOutcome};
use vsva_vtd::inv_desc::{PasidCacheGranularity, PasidIotlbGranularity, ResponseCode};
use vsva_vtd::{
    addr::DomainId, addr::Iova, addr::Pasid, addr::SourceId, flpte::FlPagingMode, inv_desc::InvDesc,
};

/// What the host IOMMU driver was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Driver {
    Bind(BindGpasid),
    Unbind(Pasid),
    Invalidate(CacheInvalidate),
    Response(SourceId, PageResponse),
}

#[derive(Clone, Default)]
struct Backend {
    log: Arc<Mutex<Vec<Driver>>>,
}

impl Backend {
    fn take(&self) -> Vec<Driver> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl IommuBackend for Backend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            iova_pgsizes: 0x4020_1000,
            nesting: Some(NestingInfo {
                features: IOMMU_NESTING_FEAT_BIND_PGTBL | IOMMU_NESTING_FEAT_CACHE_INVLD,
                addr_width: 48,
                pasid_bits: 20,
                vendor: vsva_uapi::request::NestingVendor::IntelVtd {
                    cap_reg: 0,
                    ecap_reg: 0,
                },
            }),
        }
    }
    fn map_dma(&mut self, _map: &DmaMap) -> Result<(), HostError> {
        Ok(())
    }
    fn unmap_dma(&mut self, _iova: Iova, _size: u64) {}
    fn bind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), HostError> {
        self.log.lock().unwrap().push(Driver::Bind(*bind));
        Ok(())
    }
    fn unbind_gpasid(&mut self, bind: &BindGpasid) {
        self.log.lock().unwrap().push(Driver::Unbind(bind.hpasid));
    }
    fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), HostError> {
        self.log.lock().unwrap().push(Driver::Invalidate(*inv));
        Ok(())
    }
    fn attach_device(&mut self, _sid: SourceId) -> Result<(), HostError> {
        Ok(())
    }
    fn page_response(
        &mut self,
        sid: SourceId,
        _: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), HostError> {
        self.log
            .lock()
            .unwrap()
            .push(Driver::Response(sid, *response));
        Ok(())
    }
}

const HOST_SID: SourceId = SourceId::from_rid(0x8100);

struct Vm {
    g: Guest,
    container: Arc<ContainerFile<Backend>>,
    backend: Backend,
    dev: SourceId,
}

fn vm(allocator: &SharedPasidAllocator, host_sid: SourceId) -> Vm {
    let backend = Backend::default();
    let mut c = Container::new(allocator.clone(), 16, backend.clone()).unwrap();
    c.set_iommu(IommuModel::Type1Nesting).unwrap();
    c.attach_device(host_sid).unwrap();
    let container = Arc::new(ContainerFile::new(c));
    let g = Guest::new(container.clone());
    g.enable();
    g.enable_prq();
    let dev = sid(0, 3, 0);
    g.viommu
        .attach_passthrough(dev, host_sid, container.clone())
        .unwrap();
    g.attach(dev, true);
    Vm {
        g,
        container,
        backend,
        dev,
    }
}

fn pasid_cache(p: Pasid) -> InvDesc {
    InvDesc::PasidCache {
        granularity: PasidCacheGranularity::PasidSelective,
        did: DomainId(1),
        pasid: p,
    }
}

#[test]
fn a_vm_binds_invalidates_and_answers_page_requests_through_its_container() {
    let allocator: SharedPasidAllocator = Arc::new(Mutex::new(PasidAllocator::new()));
    let vm = vm(&allocator, HOST_SID);
    let p = vm.g.alloc_pasid();
    assert_eq!(vm.container.lock().state().pasids, vec![p]);

    let cr3 = vm.g.alloc_frame();
    vm.g.set_pasid_entry(vm.dev, p, Some(fl_entry(1, cr3, FlPagingMode::FourLevel)));
    assert!(vm.g.submit_sync(&[
        pasid_cache(p),
        InvDesc::PasidIotlb {
            granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
            did: DomainId(1),
            pasid: p,
            addr: 0x7000_0000,
            ih: true,
            am: 9,
        },
        InvDesc::PasidDevIotlb {
            sid: vm.dev,
            pfsid: vm.dev,
            pasid: p,
            max_invs_pend: 0,
            addr: 0x7fff_ffff_ffff_f000,
            size: true,
            global: false,
        },
    ]));
    let bind = bind(p, cr3);
    let half = |addr| {
        Driver::Invalidate(CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
            granularity: InvGranularity::Addr {
                pasid: Some(p),
                archid: None,
                addr,
                granule_size: 1 << 63,
                nb_granules: 1,
                leaf: false,
            },
        })
    };
    assert_eq!(
        vm.backend.take(),
        vec![
            Driver::Bind(bind),
            Driver::Invalidate(CacheInvalidate {
                cache: IOMMU_CACHE_INV_TYPE_IOTLB,
                granularity: InvGranularity::Addr {
                    pasid: Some(p),
                    archid: None,
                    addr: 0x7000_0000,
                    granule_size: 4096,
                    nb_granules: 512,
                    leaf: true,
                },
            }),
            half(0),
            half(1 << 63),
        ]
    );
    assert!(vm.g.viommu.take_host_errors().is_empty());
    assert_eq!(vm.container.lock().state().bound, vec![bind]);

    // A page request from the device: the driver reports it to the container, the VMM
    // reads it and injects it, the guest answers, the answer reaches the driver.
    let req = PageRequest {
        pasid: Some(p),
        grpid: 5,
        read: true,
        write: false,
        exec: false,
        privileged: false,
        addr: 0x7000_3000,
        last_page: true,
        needs_pasid: true,
        private_data: None,
    };
    let sink = vm.container.lock().fault_sink();
    sink.report(HOST_SID, req).unwrap();
    let events = vm.container.lock().read_faults();
    assert_eq!(events.len(), 1);
    for e in events {
        let out =
            vm.g.viommu
                .inject_host_page_request(e.sid, &e.request)
                .unwrap();
        assert_eq!(out, PageRequestOutcome::Queued);
    }
    assert!(vm.g.submit_sync(&[InvDesc::PageGroupResponse {
        rid: vm.dev,
        pasid_present: true,
        pasid: p,
        private_data_present: false,
        response: ResponseCode::Success,
        last_page_in_group: true,
        prg_index: 5,
        private_data: [0; 2],
    }]));
    assert_eq!(
        vm.backend.take(),
        vec![Driver::Response(
            HOST_SID,
            PageResponse {
                pasid: Some(p),
                grpid: 5,
                code: PageResponseCode::Success
            }
        )]
    );
    assert!(vm.container.lock().pending_page_requests().is_empty());

    // The guest frees the PASID: unbound, then returned to the host set.
    let rsp = vm.g.vcmd((p.raw() as u64) << 8 | 2);
    assert_eq!(rsp, 0);
    assert_eq!(vm.backend.take(), vec![Driver::Unbind(p)]);
    let state = vm.container.lock().state();
    assert!(state.bound.is_empty() && state.pasids.is_empty());
    let stats = vm.g.viommu.stats();
    assert_eq!(
        (stats.binds, stats.unbinds, stats.invalidations_forwarded),
        (1, 1, 3)
    );
    assert_eq!(
        (stats.page_requests_injected, stats.page_responses_forwarded),
        (1, 1)
    );
}

#[test]
fn a_vm_cannot_bind_another_vms_pasid() {
    let allocator: SharedPasidAllocator = Arc::new(Mutex::new(PasidAllocator::new()));
    let a = vm(&allocator, HOST_SID);
    let b = vm(&allocator, SourceId::from_rid(0x8200));
    let pa = a.g.alloc_pasid();
    let pb = b.g.alloc_pasid();
    assert_ne!(pa, pb, "one host PASID space");
    // VM b writes VM a's PASID into its own table and flushes: VM b's vIOMMU did not
    // hand that PASID out, so it does not even ask the host.
    let cr3 = b.g.alloc_frame();
    let entry = fl_entry(1, cr3, FlPagingMode::FourLevel);
    b.g.set_pasid_entry(b.dev, pa, Some(entry));
    assert!(b.g.submit_sync(&[pasid_cache(pa)]));
    assert!(b.backend.take().is_empty(), "the driver is never asked");
    assert!(b.g.viommu.take_host_errors().is_empty());
    assert!(b.g.viommu.bindings(b.dev).unwrap().is_empty());
    // A VMM that asks anyway is refused by the host.
    let error = b
        .container
        .lock()
        .bind_gpasid(&bind_data(pa, &entry))
        .unwrap_err();
    assert!(matches!(error, HostError::NotOwner { pasid, .. } if pasid == pa));
    let through_fd = HostSva::bind_gpasid(&*b.container, &bind_data(pa, &entry));
    assert_eq!(through_fd, Err(vsva_uapi::error::Errno::EPERM));
    assert!(b.backend.take().is_empty(), "the driver is never asked");
    // Nor free it.
    let rsp = b.g.vcmd((pa.raw() as u64) << 8 | 2);
    assert_eq!(rsp >> 1 & 3, 2);
    assert_eq!(a.container.lock().state().pasids, vec![pa]);
}
