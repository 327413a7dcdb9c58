//! `vsva host` as a real process, and clients as real processes: a client killed with
//! SIGKILL at any point loses exactly its own state; malformed traffic is answered or
//! closes only its own connection; a host that goes away makes its clients fail with a
//! clear error and a non-zero exit. Every wait is bounded.
//!
//! Client processes are this test binary run again with `VSVA_TEST_CLIENT` set: the
//! `client_process` test then plays the client instead of testing.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vsva_service::protocol::{self, HostState, Reply, Request, ERROR_REPLY, HEADER_LEN, MAX_FRAME};
use vsva_service::{client::RemoteFile, client::SharedRam, ring, socket};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{
    error::Errno, file::VfioIoctls, request::BindGpasid, request::CacheInvalidate,
    request::InvGranularity,
};
use vsva_vtd::{addr::Gpa, addr::Pasid};

mod common;
#[path = "common/rerun.rs"]
mod rerun;
use common::{settle, start_host, stop, stop_clean, wait_exit};
#[path = "common/iommufd.rs"]
mod iommufd;
use rerun::spawn_ready;

const RAM: u64 = 4 << 20;
/// Memory of each `vsva host` these tests start.
const HOST_MEMORY: &str = "256M";
fn bind_data(p: Pasid) -> BindGpasid {
    BindGpasid {
        hpasid: p,
        gpasid: Some(p),
        gpgd: Gpa(0x10_0000),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    }
}

/// A connected VMM: nesting container, RAM shared and mapped at IOVA 0.
fn vmm(path: &Path) -> (RemoteFile, SharedRam) {
    let file = RemoteFile::connect(path).unwrap();
    let ram = SharedRam::new(RAM).unwrap();
    ram.nesting_container(&file).unwrap();
    (file, ram)
}

/// The client process: connects, binds a PASID, leaves a DMA of its device waiting on a
/// page request, says "ready", then binds, invalidates and unbinds in a loop until killed;
/// exits 2 with a clear message when the host goes away.
#[test]
fn client_process() {
    let Ok(path) = std::env::var("VSVA_TEST_CLIENT") else {
        return;
    };
    let (file, _ram) = vmm(Path::new(&path));
    let mut f = &file;
    let keep = f.pasid_alloc(1, 1000).unwrap();
    f.bind_gpasid(&bind_data(keep)).unwrap();
    // The client's device in the host, with a DMA waiting on a page request nobody will
    // answer: its guest table (a zeroed page) maps nothing.
    file.device_add().unwrap();
    let desc = vsva_hw::dma::Descriptor {
        pasid: Some(keep),
        privileged: false,
        block_on_fault: true,
        completion: vsva_hw::dma::CompletionRequest::None,
        op: vsva_hw::dma::Operation::Fill {
            pattern: 0x5a,
            dst: 0x40_0000,
            size: 64,
        },
    };
    file.device_write(0, &desc.encode()).unwrap();
    assert!(
        file.device_run().unwrap() > 0,
        "the DMA waits on a page request"
    );
    println!("ready");
    let inv = |p| CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(p),
            archid: None,
        },
    };
    loop {
        let step = (|| {
            let p = f.pasid_alloc(1, 1000)?;
            f.bind_gpasid(&bind_data(p))?;
            f.cache_invalidate(&inv(p))?;
            f.cache_invalidate(&inv(keep))?;
            f.unbind_gpasid(&bind_data(p))?;
            f.pasid_free(p)
        })();
        if let Err(e) = step {
            eprintln!(
                "vsva client: {e}; host connection lost: {}",
                file.host_gone()
            );
            std::process::exit(2);
        }
    }
}

/// Starts a client process on `path` and waits (bounded) until it is ready.
fn spawn_client(path: &Path) -> Child {
    spawn_ready("client_process", "VSVA_TEST_CLIENT", path, Stdio::piped())
}

#[test]
fn a_killed_client_loses_exactly_its_own_state_and_the_host_serves_on() {
    let host = start_host("kill", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    // A live client that holds a bound PASID throughout. Each killed client held a bound
    // PASID, a device with a pending page request, a window and a domain, and was
    // binding, invalidating or unbinding another PASID when it died.
    let (live, _ram) = vmm(host.socket());
    let p = (&live).pasid_alloc(1, 1000).unwrap();
    (&live).bind_gpasid(&bind_data(p)).unwrap();
    let with_live = probe.host_state().unwrap();
    for round in 0..6 {
        let mut child = spawn_client(host.socket());
        // Kill it at a varying point of its bind/invalidate/unbind loop.
        std::thread::sleep(Duration::from_millis(1 + 7 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let after = settle(&probe, with_live);
        assert_eq!(
            after, with_live,
            "round {round}: the host kept the killed client's state"
        );
    }
    // The live client still owns and uses its PASID; no other connection can free it.
    assert!((&probe).pasid_free(p).is_err());
    (&live).unbind_gpasid(&bind_data(p)).unwrap();
    (&live).pasid_free(p).unwrap();
    drop(live);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

#[test]
fn a_greedy_client_hits_its_limits_with_clear_errnos_and_another_client_is_unaffected() {
    let host = start_host(
        "greedy",
        HOST_MEMORY,
        &["--max-connections-per-process", "3", "--pasid-quota", "4"],
    );
    let (probe, empty) = host.probe().unwrap();
    // This process takes every connection it may: the probe and two more; one more is
    // refused with EUSERS (and nothing is held for it).
    let (greedy, _ram) = vmm(host.socket());
    let third = RemoteFile::connect(host.socket()).unwrap();
    match RemoteFile::connect(host.socket()) {
        Err(vsva_service::client::ClientError::Full(e)) => assert_eq!(e, Errno::new(libc::EUSERS)),
        other => panic!("a fourth connection of one process: {other:?}"),
    }
    // It takes its whole PASID quota on one connection: the next one is ENOSPC.
    let mut g = &greedy;
    let held: Vec<Pasid> = (0..4).map(|_| g.pasid_alloc(1, 1000).unwrap()).collect();
    assert_eq!(g.pasid_alloc(1, 1000), Err(Errno::ENOSPC));
    for &p in &held {
        g.bind_gpasid(&bind_data(p)).unwrap();
    }
    let full = probe.host_state().unwrap();
    assert_eq!(full.connections, empty.connections + 2);
    // Another process connects, allocates, binds, plugs its device and runs DMA: the
    // greedy one took nothing from it.
    let mut other = spawn_client(host.socket());
    let with_other = probe.host_state().unwrap();
    assert_eq!(with_other.connections, full.connections + 1);
    assert!(with_other.pasids > full.pasids);
    // It holds a bound PASID (two while its loop has bound another) and a DMA waiting on
    // a page request nobody read.
    assert!(with_other.binds > full.binds);
    assert_eq!(with_other.page_requests, full.page_requests + 1);
    assert_eq!(with_other.faults_unread, full.faults_unread + 1);
    other.kill().unwrap();
    other.wait().unwrap();
    assert_eq!(settle(&probe, full), full);
    for &p in &held {
        g.unbind_gpasid(&bind_data(p)).unwrap();
    }
    drop((greedy, third));
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    let report = stop_clean(host);
    assert!(!report.contains(" 0 refused"), "{report}");
}

/// The device's registers over DEVICE_REG_READ and DEVICE_REG_WRITE: none before
/// DEVICE_ADD (ENODEV); after it, CAP reads what the engine offers, a DMA with a PASID the
/// container never bound leaves its untranslatable completion record in SWERR0/SWERR1,
/// refused writes (read-only bits, read-only or absent registers) change nothing, and
/// SWERR0 is write-1-to-clear.
#[test]
fn the_device_registers_show_a_refused_dma_and_clear_as_the_hardware_does() {
    use vsva_hw::dma::regs::{
        CAP_PASID, REG_CAP, REG_SWERR0, REG_SWERR1, SWERR_OVERFLOW, SWERR_VALID,
    };
    use vsva_hw::dma::{CompletionStatus, SoftwareError};

    let host = start_host("regs", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    let (file, ram) = vmm(host.socket());
    assert_eq!(file.device_reg_read(REG_SWERR0), Err(Errno::ENODEV));
    assert_eq!(
        file.device_reg_write(REG_SWERR0, SWERR_VALID),
        Err(Errno::ENODEV)
    );
    file.device_add().unwrap();
    assert_ne!(file.device_reg_read(REG_CAP).unwrap() & CAP_PASID, 0);
    assert_eq!(file.device_reg_read(REG_SWERR0), Ok(0));

    // PASID 77 is no PASID of this container: the fill and its completion record fault.
    let pasid = Pasid::new(77).unwrap();
    let desc = vsva_hw::dma::Descriptor {
        pasid: Some(pasid),
        privileged: false,
        block_on_fault: true,
        completion: vsva_hw::dma::CompletionRequest::Always(0x1000),
        op: vsva_hw::dma::Operation::Fill {
            pattern: 0x5a,
            dst: 0x40_0000,
            size: 64,
        },
    };
    file.device_write(0, &desc.encode()).unwrap();
    assert_eq!(file.device_run(), Ok(0));
    let w0 = file.device_reg_read(REG_SWERR0).unwrap();
    let w1 = file.device_reg_read(REG_SWERR1).unwrap();
    let err = SoftwareError::from_regs(w0, w1).expect("a software error");
    assert_eq!(err.status, CompletionStatus::CompletionAddrTranslation);
    assert_eq!((err.pasid, err.addr), (Some(pasid), 0x1000));

    // Refused writes change nothing.
    assert_eq!(
        file.device_reg_write(REG_SWERR0, 1 << 8),
        Err(Errno::EINVAL)
    );
    assert_eq!(file.device_reg_write(REG_SWERR1, 0), Err(Errno::EINVAL));
    assert_eq!(file.device_reg_write(REG_CAP, 0), Err(Errno::EINVAL));
    assert_eq!(file.device_reg_read(0x1000), Err(Errno::EINVAL));
    assert_eq!(file.device_reg_read(REG_SWERR0), Ok(w0));
    // Write 1 to clear.
    file.device_reg_write(REG_SWERR0, SWERR_VALID | SWERR_OVERFLOW)
        .unwrap();
    assert_eq!(file.device_reg_read(REG_SWERR0), Ok(0));

    drop((file, ram));
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    let (ok, report) = stop(host);
    assert!(ok, "{report}");
    assert!(report.contains("nothing left behind"), "{report}");
}

#[test]
fn the_socket_is_private_and_a_second_host_is_refused() {
    let host = start_host("private", HOST_MEMORY, &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(host.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args(["host", "--socket"])
        .arg(host.socket())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another host is serving it"));
    let exit = host.stop().unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        !exit.socket_left_behind,
        "the host leaves its socket behind"
    );
}

/// Sends raw bytes (with optional fds) and returns the reply, or None if the host closed.
fn raw(
    sock: &std::os::fd::OwnedFd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Option<Reply> {
    socket::send(sock.as_fd(), bytes, fds).ok()?;
    let r = socket::recv(sock.as_fd()).ok()??;
    Some(Reply::decode(&r.bytes).expect("the host's replies decode"))
}

fn frame(kind: u16, id: u32, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = protocol::MAGIC.to_le_bytes().to_vec();
    f.extend_from_slice(&protocol::VERSION.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn malformed_traffic_gets_error_replies_and_changes_no_other_client() {
    let host = start_host("malformed", HOST_MEMORY, &[]);
    let (good, _ram) = vmm(host.socket());
    let p = (&good).pasid_alloc(1, 1000).unwrap();
    (&good).bind_gpasid(&bind_data(p)).unwrap();
    let before = good.host_state().unwrap();

    let bad = socket::connect(host.socket()).unwrap();
    let hello = protocol::encode_request(
        1,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
            file: protocol::FILE_VFIO_CONTAINER,
            ring: false,
        },
    );
    // Before HELLO, an ioctl has no file.
    let ioctl = protocol::encode_request(
        2,
        &Request::Ioctl {
            cmd: 0x3b64,
            arg: &[],
        },
    );
    assert_eq!(
        raw(&bad, &ioctl, &[]).unwrap().result,
        Err(Errno::new(libc::ENOTCONN))
    );
    assert_eq!(raw(&bad, &hello, &[]).unwrap().result, Ok(0));
    assert_eq!(
        raw(&bad, &hello, &[]).unwrap().result,
        Err(Errno::new(libc::EISCONN))
    );
    let cases: Vec<(Vec<u8>, u16, Errno)> = vec![
        (vec![0x56, 0x53], ERROR_REPLY, Errno::EINVAL),
        (
            frame(7, 3, 0, &[])[..HEADER_LEN - 1].to_vec(),
            ERROR_REPLY,
            Errno::EINVAL,
        ),
        (frame(7, 4, 5, &[]), 7, Errno::EINVAL),
        (frame(7, 5, 0, &[1]), 7, Errno::EINVAL),
        (frame(0x42, 6, 0, &[]), ERROR_REPLY, Errno::ENOTTY),
        (frame(3, 7, 2, &[1, 2]), 3, Errno::EINVAL),
        // A doorbell on a connection without a call ring.
        (frame(13, 10, 0, &[]), 13, Errno::EINVAL),
        (vec![0xAA; 40], ERROR_REPLY, Errno::EINVAL),
        (
            frame(2, 8, (MAX_FRAME) as u32, &vec![0; MAX_FRAME]),
            2,
            Errno::new(libc::EMSGSIZE),
        ),
    ];
    for (bytes, kind, errno) in &cases {
        let r = raw(&bad, bytes, &[]).expect("an error reply, not a close");
        assert_eq!(
            (r.kind, r.result),
            (*kind, Err(*errno)),
            "{:x?}",
            &bytes[..bytes.len().min(20)]
        );
    }
    // An fd where none belongs: refused, and the fd closed by the host.
    let ram = SharedRam::new(4096).unwrap();
    let state = protocol::encode_request(9, &Request::State);
    let r = raw(&bad, &state, &[ram.file.as_fd()]).unwrap();
    assert_eq!(r.result, Err(Errno::EINVAL));
    // Random bytes (a fixed seed, so a failure reproduces).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..200 {
        let len = (i * 7) % 90;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if raw(&bad, &bytes, &[]).is_none() {
            break; // closed after too many malformed frames: allowed
        }
    }
    // The good client is untouched and still served.
    assert_eq!(good.host_state().unwrap().pasids, before.pasids);
    (&good)
        .cache_invalidate(&CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        })
        .unwrap();
    drop(bad);
    (&good).unbind_gpasid(&bind_data(p)).unwrap();
    (&good).pasid_free(p).unwrap();
    drop(good);
    stop_clean(host);
}

/// A client's hand-made call ring (docs/protocol.md, "The call ring"), for tests that
/// play a client writing the ring word by word.
struct RawRing {
    file: std::fs::File,
    region: vm_memory::mmap::MmapRegion<()>,
}

impl RawRing {
    /// A memfd of `size` bytes that can be sealed, mapped shared.
    fn new(size: usize) -> RawRing {
        use rustix::fs::MemfdFlags;
        let fd =
            rustix::fs::memfd_create("test-ring", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(size as u64).unwrap();
        let region = vm_memory::mmap::MmapRegion::from_file(
            vm_memory::FileOffset::new(file.try_clone().unwrap(), 0),
            size,
        )
        .unwrap();
        RawRing { file, region }
    }

    fn word(&self, at: usize) -> &std::sync::atomic::AtomicU32 {
        use vm_memory::VolatileMemory;
        self.region.get_atomic_ref(at).unwrap()
    }

    fn set(&self, at: usize, value: u32) {
        self.word(at)
            .store(value, std::sync::atomic::Ordering::SeqCst);
    }

    fn get(&self, at: usize) -> u32 {
        self.word(at).load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The reply slot's frame, decoded.
    fn reply(&self) -> Reply {
        use vm_memory::VolatileMemory;
        let len = self.get(ring::RESP_LEN) as usize;
        assert!(len <= ring::REPLY_MAX);
        let mut bytes = vec![0u8; len];
        self.region
            .get_slice(ring::REPLY_AT, len)
            .unwrap()
            .copy_to(&mut bytes);
        Reply::decode(&bytes).expect("the host's ring replies decode")
    }

    /// Posts `frame` as request `seq` saying it is `len` bytes long, says the client
    /// sleeps for its reply and rings the doorbell; the reply once the host's doorbell
    /// says it is there, or `None` when the host closes the connection (a bounded wait:
    /// 30 s, then the test fails).
    fn call(&self, sock: &std::os::fd::OwnedFd, seq: u32, frame: &[u8], len: u32) -> Option<Reply> {
        use vm_memory::VolatileMemory;
        self.region
            .get_slice(ring::REQUEST_AT, frame.len())
            .unwrap()
            .copy_from(frame);
        self.set(ring::REQ_LEN, len);
        self.set(ring::CLIENT_WAITING, 1);
        self.set(ring::REQ_SEQ, seq);
        socket::send(
            sock.as_fd(),
            &protocol::encode_request(0, &Request::Doorbell),
            &[],
        )
        .ok()?;
        loop {
            match socket::recv(sock.as_fd()) {
                Ok(Some(r)) => {
                    assert!(protocol::is_host_doorbell(&r.bytes), "only doorbells come");
                    if self.get(ring::RESP_SEQ) == seq {
                        return Some(self.reply());
                    }
                }
                Ok(None) => return None,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("no answer from the host within 30 s")
                }
                Err(_) => return None,
            }
        }
    }
}

/// A socket connected to the host whose receives give up after 30 s.
fn raw_connection(host: &vsva_service::process::HostProcess) -> std::os::fd::OwnedFd {
    let sock = socket::connect(host.socket()).unwrap();
    rustix::net::sockopt::set_socket_timeout(
        &sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    sock
}

fn ring_hello(ring: bool) -> Vec<u8> {
    protocol::encode_request(
        1,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
            file: protocol::FILE_VFIO_CONTAINER,
            ring,
        },
    )
}

#[test]
fn a_lying_ring_client_closes_only_its_own_connection() {
    let host = start_host("ring", HOST_MEMORY, &[]);
    // The connections that saw the socket come up close in the host's own time: wait for
    // them to be gone, so that they are not in the baseline below.
    let (_probe, _) = host.probe().unwrap();
    let (good, _ram) = vmm(host.socket());
    assert!(good.has_ring(), "the Rust client calls through a ring");
    let p = (&good).pasid_alloc(1, 1000).unwrap();
    (&good).bind_gpasid(&bind_data(p)).unwrap();
    let before = good.host_state().unwrap();

    // Offers the host refuses, each opening nothing: no ring file, a file of the wrong
    // size, a socket, unknown flags.
    let a = raw_connection(&host);
    let einval = Err(Errno::EINVAL);
    assert_eq!(raw(&a, &ring_hello(true), &[]).unwrap().result, einval);
    let small = RawRing::new(4096);
    assert_eq!(
        raw(&a, &ring_hello(true), &[small.file.as_fd()])
            .unwrap()
            .result,
        einval
    );
    let other = raw_connection(&host);
    assert_eq!(
        raw(&a, &ring_hello(true), &[other.as_fd()]).unwrap().result,
        einval
    );
    let mut flags = ring_hello(true);
    flags[HEADER_LEN + 8] = 2;
    let good_ring = RawRing::new(ring::RING_BYTES);
    assert_eq!(
        raw(&a, &flags, &[good_ring.file.as_fd()]).unwrap().result,
        einval
    );
    // Then the ring is taken, and sealed against resizing.
    let r = raw(&a, &ring_hello(true), &[good_ring.file.as_fd()]).unwrap();
    assert_eq!(r.result, Ok(0));
    let welcome = protocol::Welcome::from_bytes(&r.data).unwrap();
    assert_eq!(welcome.flags, protocol::WELCOME_RING);
    assert!(good_ring.file.set_len(0).is_err());
    // Calls through it: a good one, then malformed frames answered in the ring.
    let state = protocol::encode_request(2, &Request::State);
    let r = good_ring.call(&a, 1, &state, state.len() as u32).unwrap();
    assert_eq!(
        (r.id, r.result, r.data.len()),
        (2, Ok(0), protocol::HOST_STATE_LEN)
    );
    let garbage = [0xA5u8; 40];
    let r = good_ring.call(&a, 2, &garbage, 40).unwrap();
    assert_eq!((r.kind, r.result), (ERROR_REPLY, Err(Errno::EINVAL)));
    let doorbell = protocol::encode_request(3, &Request::Doorbell);
    let r = good_ring
        .call(&a, 3, &doorbell, doorbell.len() as u32)
        .unwrap();
    assert_eq!(r.result, Err(Errno::EINVAL));
    let r = good_ring.call(&a, 4, &ring_hello(false), 24).unwrap();
    assert_eq!(r.result, Err(Errno::new(libc::EISCONN)));
    let add = protocol::encode_request(
        5,
        &Request::AddMemory {
            addr: 0,
            size: 4096,
        },
    );
    let r = good_ring.call(&a, 5, &add, add.len() as u32).unwrap();
    assert_eq!(r.result, Err(Errno::EINVAL), "no fd rides the ring");
    // A number that skips one closes the connection.
    assert!(good_ring.call(&a, 7, &state, state.len() as u32).is_none());

    // A length beyond the slot closes the connection.
    let b = raw_connection(&host);
    let ring_b = RawRing::new(ring::RING_BYTES);
    assert_eq!(
        raw(&b, &ring_hello(true), &[ring_b.file.as_fd()])
            .unwrap()
            .result,
        Ok(0)
    );
    assert!(ring_b
        .call(&b, 1, &state, ring::REQUEST_MAX as u32 + 1)
        .is_none());

    // A number that goes back closes the connection.
    let c = raw_connection(&host);
    let ring_c = RawRing::new(ring::RING_BYTES);
    assert_eq!(
        raw(&c, &ring_hello(true), &[ring_c.file.as_fd()])
            .unwrap()
            .result,
        Ok(0)
    );
    assert!(ring_c.call(&c, 1, &state, state.len() as u32).is_some());
    assert!(ring_c.call(&c, 0, &state, state.len() as u32).is_none());
    drop((a, b, c, other));

    // The good client is untouched and still served.
    assert_eq!(settle(&good, before), before);
    (&good)
        .cache_invalidate(&CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        })
        .unwrap();
    (&good).unbind_gpasid(&bind_data(p)).unwrap();
    (&good).pasid_free(p).unwrap();
    drop(good);
    let report = stop_clean(host);
    assert!(report.contains("3 connections closed for them"), "{report}");
}

#[test]
fn a_host_that_goes_away_makes_its_client_fail_clearly() {
    let host = start_host("restart", HOST_MEMORY, &[]);
    let mut client = spawn_client(host.socket());
    host.kill();
    let ok = wait_exit(&mut client).success();
    assert!(!ok, "the client must fail");
    let mut err = String::new();
    use std::io::Read;
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("host connection lost: true"), "{err}");
    // A new host on the same path (the dead one's socket is stale) serves again.
    host.restart().unwrap();
    let (ok, report) = stop(host);
    assert!(ok, "{report}");
}

/// Runs examples/client.py on the host's `socket` with `args` after it; its stdout, after
/// checking it succeeded. `None` (the test is skipped) without python3.
fn python_client(socket: &Path, args: &[&str]) -> Option<String> {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: python3 is not installed (scripts/test installs it where apt can)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.trim_end().ends_with("ok"), "{text}");
    Some(text)
}

#[test]
fn the_python_client_written_from_the_protocol_spec_runs_against_the_host() {
    let host = start_host("python", HOST_MEMORY, &[]);
    if let Some(text) = python_client(host.socket(), &[]) {
        assert!(text.contains("allocated PASID"), "{text}");
    }
    stop_clean(host);
}

#[test]
fn the_python_client_written_from_the_protocol_spec_runs_against_an_smmu_host() {
    let host = start_host("python-smmu", HOST_MEMORY, &["--iommu", "smmuv3"]);
    let (probe, before) = host.probe().unwrap();
    if let Some(text) = python_client(host.socket(), &["--iommu", "smmuv3"]) {
        // The host answers a PASID request as on VT-d (from the same allocator); then the
        // first free StreamID, its VMID, the CD table attached, one beyond the RAM refused
        // as the container refuses a table outside its mappings, and detached.
        assert!(text.contains("allocated PASID"), "{text}");
        assert!(text.contains("device at StreamID 0x100,"), "{text}");
        assert!(
            text.contains("attached the CD table at IPA 0x10000"),
            "{text}"
        );
        assert!(
            text.contains("a CD table beyond the RAM is refused: EINVAL"),
            "{text}"
        );
        assert!(text.contains("detached the CD table"), "{text}");
        // The client is gone: the host holds what it held before.
        let after = settle(&probe, before);
        assert!(after.holds_as(&before), "{after:?} vs {before:?}");
    }
    drop(probe);
    stop_clean(host);
}

/// The guest's view of the vIOMMU's registers (an MMIO BAR trapped to the VMM).
struct VIommuRegs(std::sync::Arc<vsva_vmm::VIommu>);

impl vsva_guest::iommu::Mmio for VIommuRegs {
    fn read(&self, offset: u64, size: usize) -> u64 {
        self.0.read(offset, size).unwrap_or(u64::MAX)
    }

    fn write(&self, offset: u64, size: usize, value: u64) {
        self.0.write(offset, size, value).unwrap();
    }
}

#[test]
fn the_vmm_and_the_guest_run_unchanged_over_a_real_host_process_with_dma_and_page_requests() {
    use std::sync::Arc;
    use vsva_guest::{
        frames::GuestFrames, iommu::DeviceConfig, iommu::IommuDriver, process::Process,
        process::Prot,
    };
    use vsva_hw::dma::{
        CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation,
    };
    use vsva_vmm::{HostSva, PasidSource, VIommu, VIommuConfig};
    use vsva_vtd::{addr::Gva, addr::SourceId, flpte::FlPagingMode};
    const GUEST_SID: SourceId = SourceId::from_rid(0x18);

    let host = start_host("vmm", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    let (file, ram) = vmm(host.socket());
    let file = Arc::new(file);
    // The passthrough device lives in the host; the VMM learns its requester id there.
    let host_sid = file.device_add().unwrap();
    assert_eq!(file.device_add(), Err(Errno::EEXIST));
    // The vIOMMU, the guest driver and a guest process, exactly as over the in-process
    // container (testbed/src/stack.rs), with the socket transport in its place.
    let viommu = VIommu::new(
        ram.mem.clone(),
        VIommuConfig::default(),
        file.clone() as Arc<dyn PasidSource>,
    )
    .unwrap();
    viommu
        .attach_passthrough(GUEST_SID, host_sid, file.clone() as Arc<dyn HostSva>)
        .unwrap();
    let frames =
        Arc::new(GuestFrames::new(ram.mem.clone(), Gpa(1 << 20), RAM - (1 << 20)).unwrap());
    let driver = IommuDriver::init(Arc::new(VIommuRegs(viommu.clone())), frames.clone()).unwrap();
    driver
        .attach_device(DeviceConfig {
            sid: GUEST_SID,
            pasid_bits: 20,
            ats: true,
            pri: true,
            ats_queue_depth: 0,
        })
        .unwrap();
    let process =
        Arc::new(Process::new(ram.mem.clone(), frames.clone(), FlPagingMode::FourLevel).unwrap());
    let buf = process.mmap(16 << 10, Prot::READ | Prot::WRITE).unwrap();
    process.write(buf, b"shared through the socket").unwrap();

    let pasid = driver.sva_bind(GUEST_SID, &process).unwrap();
    let bound = probe.host_state().unwrap();
    assert_eq!(
        bound.pasids,
        empty.pasids + 1,
        "the guest's PASID comes from the host"
    );
    // The vIOMMU shadowed the guest's entry with a BIND the host accepted.
    let s = viommu.stats();
    assert_eq!((s.binds, s.host_errors), (1, 0));
    // DMA through the host in the process's address space, to pages not yet present:
    // each page request goes from the host's IOMMU through the socket to the vIOMMU and
    // the guest, and the guest's response comes back down the same way.
    let dst = process
        .mmap_lazy(16 << 10, Prot::READ | Prot::WRITE)
        .unwrap();
    let record = process.mmap(4096, Prot::READ | Prot::WRITE).unwrap();
    let desc = Descriptor {
        pasid: Some(pasid),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(record.0),
        op: Operation::Memmove {
            src: buf.0,
            dst: dst.0 + 8192,
            size: 25,
        },
    };
    file.device_write(0, &desc.encode()).unwrap();
    let mut rounds = 0;
    while file.device_run().unwrap() > 0 {
        rounds += 1;
        assert!(rounds < 1000, "page requests never resolved");
        for fault in vsva_uapi::file::UapiFile::read_faults(&*file).unwrap() {
            match fault {
                vsva_uapi::request::QueuedFault::PageRequest(f) => {
                    viommu.inject_host_page_request(f.sid, &f.request).unwrap();
                }
                other => panic!("an unrecoverable fault: {other:?}"),
            }
        }
        driver.handle_page_requests();
    }
    assert!(
        rounds > 0,
        "the lazily mapped destination needed a page request"
    );
    let mut raw = [0u8; 32];
    process.read(record, &mut raw).unwrap();
    let done = CompletionRecord::from_bytes(&raw).unwrap();
    assert_eq!(done.status, CompletionStatus::Success, "{done:?}");
    let mut got = [0u8; 25];
    process.read(Gva(dst.0 + 8192), &mut got).unwrap();
    assert_eq!(&got, b"shared through the socket");
    assert!(viommu.stats().page_responses_forwarded > 0);

    // The guest unmaps part of its buffer: its IOTLB invalidation is forwarded to the host.
    let forwarded = viommu.stats().invalidations_forwarded;
    process.munmap(buf, 4096).unwrap();
    let s = viommu.stats();
    assert!(s.invalidations_forwarded > forwarded, "{s:?}");
    assert_eq!(s.host_errors, 0);

    driver.sva_unbind(GUEST_SID, pasid).unwrap();
    let s = viommu.stats();
    assert_eq!((s.unbinds, s.host_errors), (1, 0));
    drop((driver, process, frames));
    viommu.detach_passthrough(GUEST_SID).unwrap();
    drop(viommu);
    drop(file);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// The iommufd selftest's sequences that need no mock driver, over a real `vsva host`
/// process: HELLO opens an iommufd, DEVICE_ADD binds the connection's device; the
/// `iommufd_ioas` IOVA ranges (out array through a user pointer, and the count probe),
/// ALLOW_IOVAS, MAP of the VMM's shared memory, COPY and UNMAP; `get_hw_info` into the
/// VMM's memory; a nest-parent HWPT the device is attached to, EBUSY on destroying it,
/// the invalidation error matrix; DMA of the device landing in the VMM's memory through
/// the IOAS; every ioctl the kind does not serve refused, a pointer outside the shared
/// memory EFAULT, and the connection's close releasing everything.
#[test]
fn iommufd_over_the_socket_runs_the_selftest_sequence() {
    use iommufd::{attach_pt, connect, destroy, fill_iova, io, ioas_alloc};
    use vm_memory::{Bytes, GuestAddress};
    use vsva_uapi::file::UapiFile;
    use vsva_uapi::iommufd::*;
    use vsva_uapi::wire::{read_prefix, Wire};

    let host = start_host("iommufd", HOST_MEMORY, &[]);
    let (probe, empty) = host.probe().unwrap();
    let (f, ram) = connect(host.socket(), RAM);
    let scratch = RAM - 4096;
    let uscratch = ram.addr() + scratch;
    let (sid, dev_id) = f.device_add_bound().unwrap();
    assert!(dev_id != 0 && sid.rid() >= 0x100);
    assert_eq!(f.device_add_bound(), Err(Errno::EEXIST));

    let ioas = ioas_alloc(&f);
    // IOVA_RANGES: the count probe with no array, then the array in the VMM's memory.
    let mut r = IommuIoasIovaRanges {
        size: 32,
        ioas_id: ioas,
        ..Default::default()
    };
    assert_eq!(io(&f, IOMMU_IOAS_IOVA_RANGES, &r), Err(Errno::EMSGSIZE));
    ram.mem
        .write_slice(&[0xff; 64], GuestAddress(scratch))
        .unwrap();
    r.num_iovas = 4;
    r.allowed_iovas = uscratch;
    let out = io(&f, IOMMU_IOAS_IOVA_RANGES, &r).unwrap();
    assert_eq!((out.num_iovas, out.allowed_iovas), (1, uscratch));
    assert_eq!(out.out_iova_alignment, 4096);
    let mut range = [0u8; 16];
    ram.mem
        .read_slice(&mut range, GuestAddress(scratch))
        .unwrap();
    let range: IommuIovaRange = read_prefix(&range, 16);
    assert_eq!(range.start, 0);
    assert!(range.last > RAM);
    // ... and an array outside the shared memory never reaches the host.
    r.allowed_iovas = 0x1000;
    assert_eq!(io(&f, IOMMU_IOAS_IOVA_RANGES, &r), Err(Errno::EFAULT));

    // ALLOW_IOVAS from the VMM's memory: [0, 16 MiB).
    let allowed = IommuIovaRange {
        start: 0,
        last: (16 << 20) - 1,
    };
    ram.mem
        .write_slice(&allowed.to_bytes(), GuestAddress(scratch))
        .unwrap();
    let a = IommuIoasAllowIovas {
        size: 24,
        ioas_id: ioas,
        num_iovas: 1,
        __reserved: 0,
        allowed_iovas: uscratch,
    };
    io(&f, IOMMU_IOAS_ALLOW_IOVAS, &a).unwrap();

    // MAP the VMM's RAM at IOVA 0; a map of memory it never shared is EFAULT.
    let rw = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
    let map = |user_va, length, iova| IommuIoasMap {
        size: 40,
        flags: rw,
        ioas_id: ioas,
        __reserved: 0,
        user_va,
        length,
        iova,
    };
    assert_eq!(
        io(&f, IOMMU_IOAS_MAP, &map(ram.addr() + RAM, 4096, 0)),
        Err(Errno::EFAULT)
    );
    let out = io(&f, IOMMU_IOAS_MAP, &map(ram.addr(), RAM, 0)).unwrap();
    assert_eq!(
        out.user_va,
        ram.addr(),
        "the client gets its own address back"
    );
    // COPY the first MiB to IOVA 8 MiB, then UNMAP it again.
    let copy = IommuIoasCopy {
        size: 40,
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE,
        dst_ioas_id: ioas,
        src_ioas_id: ioas,
        length: 1 << 20,
        dst_iova: 8 << 20,
        src_iova: 0,
    };
    io(&f, IOMMU_IOAS_COPY, &copy).unwrap();
    let unmap = IommuIoasUnmap {
        size: 24,
        ioas_id: ioas,
        iova: 8 << 20,
        length: 1 << 20,
    };
    assert_eq!(io(&f, IOMMU_IOAS_UNMAP, &unmap).unwrap().length, 1 << 20);
    assert_eq!(io(&f, IOMMU_IOAS_UNMAP, &unmap), Err(Errno::ENOENT));

    // GET_HW_INFO into the VMM's memory: the VT-d data, the tail of the buffer zeroed.
    ram.mem
        .write_slice(&[0xff; 64], GuestAddress(scratch))
        .unwrap();
    let mut hw = hw_info(40, 0, dev_id, 0);
    hw.data_len = 32;
    hw.data_uptr = uscratch;
    let out = io(&f, IOMMU_GET_HW_INFO, &hw).unwrap();
    assert_eq!(hw_info_data_type(&out), IOMMU_HW_INFO_TYPE_INTEL_VTD);
    assert_eq!(out.data_len, 24);
    let mut buf = [0u8; 64];
    ram.mem.read_slice(&mut buf, GuestAddress(scratch)).unwrap();
    let vtd: IommuHwInfoVtd = read_prefix(&buf, 24);
    assert_ne!(vtd.cap_reg, 0);
    assert_ne!(vtd.ecap_reg, 0);
    assert_eq!(&buf[24..32], &[0; 8], "the buffer's tail is zeroed");
    assert_eq!(&buf[32..], &[0xff; 32][..], "nothing past data_len");
    // A zero-length buffer takes any pointer, as the kernel's.
    hw.data_len = 0;
    hw.data_uptr = 0x1000;
    assert_eq!(io(&f, IOMMU_GET_HW_INFO, &hw).unwrap().data_len, 24);

    // A nest-parent HWPT over the IOAS; the device attached to it through the same
    // connection (the cdev's ioctls go to the connection's device).
    let parent = io(
        &f,
        IOMMU_HWPT_ALLOC,
        &IommuHwptAlloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
            dev_id,
            pt_id: ioas,
            ..Default::default()
        },
    )
    .unwrap()
    .out_hwpt_id;
    assert_eq!(attach_pt(&f, 0, parent, 0).unwrap().pt_id, parent);
    assert_eq!(destroy(&f, parent), Err(Errno::EBUSY));
    // Invalidating a paging HWPT is EINVAL, the probe of a nested type is not reached.
    let inv = IommuHwptInvalidate {
        size: 32,
        hwpt_id: parent,
        data_uptr: uscratch,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
        entry_len: 24,
        entry_num: 1,
        __reserved: 0,
    };
    assert_eq!(io(&f, IOMMU_HWPT_INVALIDATE, &inv), Err(Errno::EINVAL));
    let far = IommuHwptInvalidate {
        data_uptr: ram.addr() + RAM - 8,
        ..inv
    };
    assert_eq!(io(&f, IOMMU_HWPT_INVALIDATE, &far), Err(Errno::EFAULT));

    // The device's DMA goes through the IOAS into the VMM's memory.
    fill_iova(&f, 0x20_0000, 0x3c3c_3c3c_3c3c_3c3c);
    let mut got = [0u8; 64];
    ram.mem
        .read_slice(&mut got, GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(got, [0x3c; 64], "the device's fill landed in the VMM's RAM");

    // Not served: the cdev's BIND (DEVICE_ADD binds), unknown ioctls, and the type1
    // container's.
    for cmd in [
        VFIO_DEVICE_BIND_IOMMUFD,
        IOMMU_VIOMMU_ALLOC,
        vsva_uapi::vfio::VFIO_IOMMU_MAP_DMA,
        0x3bff,
    ] {
        let mut arg = [0u8; 64];
        assert_eq!(f.ioctl(cmd, &mut arg), Err(Errno::ENOTTY), "{cmd:#x}");
    }

    // Detach, destroy, and closing the connection leaves the host as it was.
    let detach = VfioDeviceDetachIommufdPt {
        argsz: 12,
        flags: 0,
        pasid: 0,
    };
    io(&f, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach).unwrap();
    destroy(&f, parent).unwrap();
    drop(f);
    drop(ram);
    let after = settle(&probe, empty);
    assert_eq!(after, empty);
}

/// `vsva host --strict` with a client that plays a guest and its driver by hand: its
/// stage-1 table (in its shared RAM) sends GVA 0x40_0000.. through a PDE the IOMMU's
/// paging-structure cache keeps. Moving the PDE to another page table with the PASID's
/// invalidation forwarded is clean (STATE counts 0 violations); moving it back without
/// one lets the device's next walk go through the cached PDE, which strict mode finds:
/// STATE counts 1, and the exit report lists it (exit 1).
#[test]
fn strict_mode_counts_a_missing_invalidation_in_state_and_lists_it_at_exit() {
    use vm_memory::{Bytes, GuestAddress};
    use vsva_hw::dma::{CompletionRequest, Descriptor, Operation};
    use vsva_vtd::{flpte::FlPte, walk::PageSize};

    const PDPT: u64 = 0x10_1000;
    const PD: u64 = 0x10_2000;
    const PT1: u64 = 0x10_3000;
    const PT2: u64 = 0x10_4000;
    const GVA: u64 = 0x40_0000;
    let rights = FlPte::RW | FlPte::US;
    let host = start_host("strict", HOST_MEMORY, &["--strict"]);
    let (probe, empty) = host.probe().unwrap();
    assert_eq!(empty.strict_violations, 0);
    let (file, ram) = vmm(host.socket());
    let put = |at: u64, entry: FlPte| ram.mem.write_obj(entry.0, GuestAddress(at)).unwrap();
    let page = |pa: u64| FlPte::page(pa, PageSize::Size4K, rights);
    // PML4 (the bind's gpgd, 0x10_0000) -> PDPT -> PD; PD[2] covers GVA 0x40_0000.
    put(
        bind_data(Pasid::new(1).unwrap()).gpgd.0,
        FlPte::table(PDPT, rights),
    );
    put(PDPT, FlPte::table(PD, rights));
    put(PD + 2 * 8, FlPte::table(PT1, rights));
    // Page i of the range: PT1 maps it to 0x20_i000, PT2 to 0x28_i000.
    for i in 0..3 {
        put(PT1 + i * 8, page(0x20_0000 + i * 0x1000));
        put(PT2 + i * 8, page(0x28_0000 + i * 0x1000));
    }
    let mut f = &file;
    let pasid = f.pasid_alloc(1, 1000).unwrap();
    f.bind_gpasid(&bind_data(pasid)).unwrap();
    file.device_add().unwrap();
    // The device fills 64 bytes at page i of the range with `byte`.
    let fill = |i: u64, byte: u8| {
        let desc = Descriptor {
            pasid: Some(pasid),
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::None,
            op: Operation::Fill {
                pattern: u64::from_ne_bytes([byte; 8]),
                dst: GVA + i * 0x1000,
                size: 64,
            },
        };
        file.device_write(0, &desc.encode()).unwrap();
        assert_eq!(file.device_run().unwrap(), 0, "no page request");
    };
    let at = |gpa: u64| {
        let mut b = [0u8; 64];
        ram.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    };
    let violations = || probe.host_state().unwrap().strict_violations;

    fill(0, 0x11);
    assert_eq!(at(0x20_0000), [0x11; 64]);
    // The clean path: PD[2] to PT2, and the PASID's IOTLB invalidation (which takes the
    // paging-structure caches with it) forwarded; the next page goes through PT2.
    put(PD + 2 * 8, FlPte::table(PT2, rights));
    f.cache_invalidate(&CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(pasid),
            archid: None,
        },
    })
    .unwrap();
    fill(1, 0x22);
    assert_eq!(at(0x28_1000), [0x22; 64]);
    assert_eq!(at(0x20_1000), [0; 64]);
    assert_eq!(violations(), 0, "the clean path");

    // PD[2] back to PT1 without the invalidation: the walk of page 2 starts at the cached
    // PDE and writes where PT2 says (as hardware would); strict mode counts it.
    put(PD + 2 * 8, FlPte::table(PT1, rights));
    fill(2, 0x33);
    assert_eq!(at(0x28_2000), [0x33; 64], "the stale PDE was used");
    assert_eq!(violations(), 1);
    // The count stays (it is no holding); everything else goes back to the baseline.
    f.unbind_gpasid(&bind_data(pasid)).unwrap();
    drop(file);
    drop(ram);
    let after = settle(
        &probe,
        HostState {
            strict_violations: 1,
            ..empty
        },
    );
    assert!(after.holds_as(&empty), "{after:?} vs {empty:?}");
    assert_eq!(after.strict_violations, 1);
    drop(probe);
    let exit = host.stop().unwrap();
    assert!(!exit.success(), "{exit}");
    assert!(exit.nothing_left_behind(), "{exit}");
    assert!(exit.report.contains("strict mode: 1 VIOLATIONS"), "{exit}");
    let listed: Vec<&str> = exit
        .report
        .lines()
        .filter(|l| {
            l.trim_start()
                .starts_with("strict violation: stale translation")
        })
        .collect();
    assert_eq!(listed.len(), 1, "{exit}");
    assert!(listed[0].contains("addr 0x402000"), "{exit}");
}
