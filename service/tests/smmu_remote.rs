//! An SMMUv3 host (`vsva host --iommu smmuv3`) served on a socket in this process, and
//! clients over real `SOCK_SEQPACKET` connections: VFIO type1 containers whose stage 2 is
//! the shared memfd, whose device is the host's DMA engine behind the physical SMMUv3,
//! with `VFIO_IOMMU_ATTACH_PASID_TABLE` pointing the STE at the guest's CD table. A
//! closed connection leaves nothing: its STE aborts again with no CD-table pointer, its
//! VMID is free and no TLB entry carries it.

mod common;

use common::{settle, Served};
use vm_memory::{Bytes, GuestAddress};
use vsva_hw::dma::{CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation};
use vsva_service::{
    client::RemoteFile, client::SharedRam, server::HostConfig, server::IommuArch, server::Limits,
    server::SMMU_STREAMS,
};
use vsva_uapi::request::NestingVendor;
use vsva_uapi::{
    error::Errno, file::VfioIoctls, request::BindGpasid, request::PasidConfig,
    request::PasidTableConfig,
};
use vsva_vtd::{addr::Gpa, addr::Pasid};

const RAM: u64 = 4 << 20;
const CD_GPA: u64 = 0x8_0000;

fn serve(strict: bool) -> Served {
    serve_with(strict, Limits::default())
}

fn serve_with(strict: bool, limits: Limits) -> Served {
    common::serve(&HostConfig {
        iommu: IommuArch::Smmuv3,
        memory: 256 << 20,
        strict,
        limits,
    })
}

/// A VM's connection: a nesting container, RAM shared and mapped at IOVA 0, a device.
struct Client {
    file: RemoteFile,
    ram: SharedRam,
    sid: u32,
}

fn client(path: &std::path::Path) -> Client {
    let file = RemoteFile::connect(path).unwrap();
    let ram = SharedRam::new(RAM).unwrap();
    ram.nesting_container(&file).unwrap();
    let sid = u32::from(file.device_add().unwrap().rid());
    Client { file, ram, sid }
}

fn table(base: u64) -> PasidTableConfig {
    PasidTableConfig {
        base_ptr: Gpa(base),
        pasid_bits: 4,
        config: PasidConfig::Translate { s1fmt: 0, s1dss: 1 },
    }
}

impl Client {
    /// A copy of `len` bytes from GPA `src` to `dst` by the device without a SubstreamID
    /// (the STE's S1DSS bypass: stage 2 alone); the completion record's status.
    fn copy(&self, src: u64, dst: u64, len: u32) -> CompletionStatus {
        let comp = 0x3f_0000;
        self.ram
            .mem
            .write_slice(&[0; 32], GuestAddress(comp))
            .unwrap();
        let d = Descriptor {
            pasid: None,
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::Always(comp),
            op: Operation::Memmove {
                src,
                dst,
                size: len,
            },
        };
        self.file.device_write(0, &d.encode()).unwrap();
        self.file.device_run().unwrap();
        let mut rec = [0; 32];
        self.ram
            .mem
            .read_slice(&mut rec, GuestAddress(comp))
            .unwrap();
        CompletionRecord::from_bytes(&rec).unwrap().status
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Word 0 of an STE: V=1 Config=abort, no S1ContextPtr.
fn aborts(ste: Option<[u64; 8]>) -> bool {
    ste.is_some_and(|s| s[0] & 0xf == 1 && s[0] & 0x000f_ffff_ffff_ffc0 == 0)
}

#[test]
fn an_smmu_container_over_the_socket_moves_bytes_nests_and_leaves_nothing() {
    let served = serve(true);
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    let a = client(&served.path);
    let b = client(&served.path);
    assert_ne!(a.sid, b.sid);
    // GET_INFO reports the SMMUv3 PASID-table format; BIND is not for this host.
    let info = (&a.file).get_info().unwrap();
    assert!(matches!(
        info.nesting.map(|n| n.vendor),
        Some(NestingVendor::ArmSmmuV3 { .. })
    ));
    let p = Pasid::new(1).unwrap();
    let bind = BindGpasid {
        hpasid: p,
        gpasid: Some(p),
        gpgd: Gpa(0x10_0000),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    };
    assert!((&a.file).bind_gpasid(&bind).is_err());
    let vmid_a = smmu
        .owned_streams()
        .into_iter()
        .find(|&(s, _)| s == a.sid)
        .unwrap()
        .1;
    let held = probe.host_state().unwrap();
    assert_eq!(held.connections, before.connections + 2);
    assert_eq!(held.domain_ids, before.domain_ids + 2, "a VMID each");
    assert_eq!(held.devices, before.devices + 2, "a stream each");
    assert_eq!(held.windows, 2);
    assert_eq!(held.dma_mappings, before.dma_mappings + 2);
    // The nested STE points at the CD table (a host physical address: A's RAM).
    (&a.file).attach_pasid_table(&table(CD_GPA)).unwrap();
    let nested = smmu.ste(a.sid).unwrap();
    assert_eq!(nested[0] & 1, 1);
    assert_ne!(nested[0] & 0x000f_ffff_ffff_ffc0, 0, "S1ContextPtr set");
    // B's bad tables change nothing of A's, nor B's.
    let b_before = smmu.ste(b.sid);
    for bad in [table(RAM), table(RAM - 0x40), table(!0x3f)] {
        let e = (&b.file).attach_pasid_table(&bad).unwrap_err();
        assert_eq!(e, Errno::EINVAL, "{bad:?}");
        assert_eq!(smmu.ste(a.sid), Some(nested));
        assert_eq!(smmu.ste(b.sid), b_before);
    }
    // Bytes move through stage 2 (S1DSS bypass for requests without a SubstreamID).
    for (c, seed) in [(&a, 1u8), (&b, 2u8)] {
        let data = pattern(8192, seed);
        c.ram
            .mem
            .write_slice(&data, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(
            c.copy(0x20_0000, 0x30_0000, 8192),
            CompletionStatus::Success
        );
        let mut got = vec![0; 8192];
        c.ram
            .mem
            .read_slice(&mut got, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(got, data);
    }
    assert!(
        served
            .service
            .smmu()
            .unwrap()
            .hardware()
            .tlb_entries_of(vmid_a)
            > 0
    );
    let with_a = probe.host_state().unwrap();
    // A closes: its STE aborts with no CD table, its VMID is free, its TLB entries gone;
    // B's stream and entries stay.
    let Client { file, ram, sid } = a;
    drop(file);
    drop(ram);
    let after = settle(&probe, |s| {
        s.connections == with_a.connections - 1 && s.windows == 1
    });
    assert_eq!(after.domain_ids, before.domain_ids + 1);
    assert_eq!(after.devices, before.devices + 1);
    assert_eq!(after.dma_mappings, before.dma_mappings + 1);
    assert!(aborts(smmu.ste(sid)), "{:x?}", smmu.ste(sid));
    assert!(!smmu.vmids().contains(&vmid_a));
    assert_eq!(smmu.hardware().tlb_entries_of(vmid_a), 0);
    assert_eq!(smmu.ste(b.sid), b_before);
    // B still moves bytes.
    let data = pattern(4096, 9);
    b.ram
        .mem
        .write_slice(&data, GuestAddress(0x21_0000))
        .unwrap();
    assert_eq!(
        b.copy(0x21_0000, 0x31_0000, 4096),
        CompletionStatus::Success
    );
    let Client { file, ram, sid } = b;
    drop(file);
    drop(ram);
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
    assert!(aborts(smmu.ste(sid)));
    assert_eq!(left.strict_violations, 0);
    drop(probe);
    drop(smmu);
    let report = served.finish();
    assert!(report.clean(), "{report}");
    assert!(report.smmu_irq.is_some());
    assert!(
        report.to_string().contains("SMMUv3 interrupt thread"),
        "{report}"
    );
}

#[test]
fn stream_ids_are_reused_by_containers_and_iommufds() {
    let served = serve(false);
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    let a = client(&served.path);
    let first = a.sid;
    drop(a);
    settle(&probe, |s| s.holds_as(&before));
    // The StreamID comes back, and the level-2 stream table probed at start is reused:
    // nothing more is allocated.
    let again = client(&served.path);
    assert_eq!(again.sid, first);
    drop(again);
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
    // An iommufd connection's device takes its StreamID from the same level-2 table.
    let ifd = RemoteFile::connect_kind(&served.path, vsva_service::protocol::FILE_IOMMUFD).unwrap();
    let (sid, _) = ifd.device_add_bound().unwrap();
    assert_eq!(u32::from(sid.rid()), first);
    drop(ifd);
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
}

#[test]
fn device_add_with_every_stream_id_taken_is_enospc_changes_nothing_and_a_freed_one_is_reused() {
    // Room for a connection per StreamID and more, all from this process.
    let served = serve_with(
        false,
        Limits {
            max_connections: 2 * SMMU_STREAMS.len() as u32,
            max_connections_per_process: 2 * SMMU_STREAMS.len() as u32,
            ..Limits::default()
        },
    );
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let before = probe.host_state().unwrap();
    // A device on each connection (a nesting container; no RAM, which 256 VMs would not
    // be given) until the 256 StreamIDs are gone: the lowest free one each time.
    let mut vms: Vec<RemoteFile> = Vec::new();
    for want in SMMU_STREAMS {
        let c = nesting(&served.path);
        assert_eq!(u32::from(c.device_add().unwrap().rid()), want);
        vms.push(c);
    }
    // One more connection, a nesting container like the others: its DEVICE_ADD is ENOSPC
    // and the host holds what it held with the connection open.
    let late = nesting(&served.path);
    let full = probe.host_state().unwrap();
    let stes: Vec<_> = SMMU_STREAMS.map(|sid| smmu.ste(sid)).collect();
    for _ in 0..2 {
        assert_eq!(late.device_add().unwrap_err(), Errno::ENOSPC);
        assert_eq!(probe.host_state().unwrap(), full);
        assert_eq!(
            SMMU_STREAMS.map(|sid| smmu.ste(sid)).collect::<Vec<_>>(),
            stes
        );
    }
    // It has no device: its device calls are ENODEV, as before the refusal.
    assert_eq!(late.device_run().unwrap_err(), Errno::ENODEV);
    // A VM leaves: its StreamID is free again, and the next DEVICE_ADD gets that one.
    drop(vms.remove(0x42));
    let freed = SMMU_STREAMS.start + 0x42;
    let s = settle(&probe, |s| s.devices + 1 == full.devices);
    assert_eq!(s.devices + 1, full.devices, "{s:?}");
    assert!(aborts(smmu.ste(freed)), "the freed stream aborts again");
    let sid = u32::from(late.device_add().unwrap().rid());
    assert_eq!(sid, freed);
    let again = probe.host_state().unwrap();
    assert_eq!(again.devices, full.devices);
    // And with every StreamID taken again, another connection is refused in turn.
    let later = nesting(&served.path);
    assert_eq!(later.device_add().unwrap_err(), Errno::ENOSPC);
    drop((vms, late, later));
    let left = settle(&probe, |s| s.holds_as(&before));
    assert!(left.holds_as(&before), "{left:?} vs {before:?}");
    drop(probe);
    drop(smmu);
    let report = served.finish();
    assert!(report.clean(), "{report}");
}

/// A connection whose container is set to the nesting model, without RAM or a device.
fn nesting(path: &std::path::Path) -> RemoteFile {
    let file = RemoteFile::connect(path).unwrap();
    (&file)
        .set_iommu(vsva_uapi::file::IommuModel::Type1Nesting)
        .unwrap();
    file
}

#[test]
fn malformed_pasid_table_ioctls_over_the_socket_change_nothing() {
    use vsva_uapi::file::UapiFile;
    use vsva_uapi::vfio::{VFIO_IOMMU_ATTACH_PASID_TABLE, VFIO_IOMMU_DETACH_PASID_TABLE};
    let served = serve(true);
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let a = client(&served.path);
    (&a.file).attach_pasid_table(&table(CD_GPA)).unwrap();
    let nested = smmu.ste(a.sid);
    let held = probe.host_state().unwrap();
    // The well-formed argument, then each byte of it damaged in turn where the seed's
    // checks look: argsz, flags, version, format, pasid_bits, config, padding, vendor data.
    let good = vsva_uapi::vfio::VfioIommuType1AttachPasidTable {
        argsz: std::mem::size_of::<vsva_uapi::vfio::VfioIommuType1AttachPasidTable>() as u32,
        flags: 0,
        config: (&table(CD_GPA)).into(),
    }
    .to_bytes();
    assert!(good.len() >= 32);
    let mut bad: Vec<Vec<u8>> = vec![
        Vec::new(),
        good[..4].to_vec(),
        good[..good.len() - 1].to_vec(),
    ];
    for at in [0usize, 4, 8, 12, 24, 25, 26, 31, 32] {
        let mut b = good.to_vec();
        b[at] ^= 0xff;
        bad.push(b);
    }
    for mut b in bad {
        let r = a.file.ioctl(VFIO_IOMMU_ATTACH_PASID_TABLE, &mut b);
        assert!(r.is_err(), "{b:x?} was taken");
        assert_eq!(smmu.ste(a.sid), nested, "{b:x?}");
        assert_eq!(probe.host_state().unwrap(), held);
    }
    // DETACH: stage 2 alone again, the CD-table pointer gone.
    a.file
        .ioctl(VFIO_IOMMU_DETACH_PASID_TABLE, &mut [])
        .unwrap();
    let s2 = smmu.ste(a.sid).unwrap();
    assert_eq!(s2[0] & 1, 1);
    assert_eq!(s2[0] & 0x000f_ffff_ffff_ffc0, 0, "no CD table after DETACH");
    drop(a);
    drop(probe);
    drop(smmu);
    assert!(served.finish().clean());
}
