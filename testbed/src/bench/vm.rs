//! A VM on a host, the whole stack of [`crate::stack`], with a guest process bound to the
//! passthrough device: what the workloads of the host's ioctl path ([`super::uapi`]) and of
//! the guest's forwarded path ([`super::forward`]) drive.

use std::sync::Arc;

use vsva_guest::{process::Process, process::Prot};
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_hw::memory::PAGE_SIZE;
use vsva_vtd::{addr::Gva, addr::Pasid, flpte::FlPagingMode};

use super::BenchError;
use crate::stack::{Host, Uapi, Vm};

/// Sparse host memory.
const HOST_MEMORY: u64 = 1 << 30;
/// Guest RAM.
const RAM: u64 = 64 << 20;
/// Resident pages of the bound process's buffer.
pub const BUFFER_PAGES: u64 = 16;
/// The VM's PASID quota: room for the bound-PASID memory count and the workloads' own.
pub const QUOTA: u32 = 2048;
/// The word device fills write.
const FILL_PATTERN: u64 = 0x5a5a_a5a5_0f0f_f0f0;

/// The VM, its bound process and the process's mappings.
struct Tenant {
    vm: Vm,
    process: Arc<Process>,
    pasid: Pasid,
    buffer: Gva,
    record: Gva,
}

/// A host (IOMMU not strict) with one VM whose guest has bound a 4-level process to the
/// passthrough device; the device has filled the process's resident buffer once, so the
/// IOMMU and the device TLB hold its translations. Shut down as a VMM does when dropped.
pub struct BenchVm {
    host: Host,
    /// Present until the VM is dropped.
    tenant: Option<Tenant>,
}

impl BenchVm {
    /// Boots the VM on the VFIO type1 container with a PASID quota of [`QUOTA`], binds
    /// the process and fills its buffer.
    pub fn new() -> Result<Self, BenchError> {
        Self::with_uapi(Uapi::Type1)
    }

    /// The same with the VM reaching the host through `uapi`.
    pub fn with_uapi(uapi: Uapi) -> Result<Self, BenchError> {
        let host = Host::new(HOST_MEMORY, false)?;
        let vm = Vm::with_uapi(&host, 0, RAM, QUOTA, uapi)?;
        let started = Self::start(&vm);
        let (process, pasid, buffer, record) = match started {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(down) = vm.shutdown() {
                    tracing::warn!("bench VM shutdown after a failed start: {down}");
                }
                return Err(e);
            }
        };
        let bench = BenchVm {
            host,
            tenant: Some(Tenant {
                vm,
                process,
                pasid,
                buffer,
                record,
            }),
        };
        bench.fill(buffer, BUFFER_PAGES * PAGE_SIZE)?;
        Ok(bench)
    }

    fn start(vm: &Vm) -> Result<(Arc<Process>, Pasid, Gva, Gva), BenchError> {
        let process = vm.spawn(FlPagingMode::FourLevel)?;
        let buffer = process.mmap(BUFFER_PAGES * PAGE_SIZE, Prot::READ_WRITE)?;
        let record = process.mmap(PAGE_SIZE, Prot::READ_WRITE)?;
        let pasid = vm.bind(&process)?;
        Ok((process, pasid, buffer, record))
    }

    fn tenant(&self) -> &Tenant {
        self.tenant
            .as_ref()
            .expect("the tenant is present until the VM is dropped")
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.tenant().vm
    }

    /// The bound process.
    pub fn process(&self) -> &Arc<Process> {
        &self.tenant().process
    }

    /// The process's PASID (guest and host PASID are the same).
    pub fn pasid(&self) -> Pasid {
        self.tenant().pasid
    }

    /// The first page of the process's resident buffer of [`BUFFER_PAGES`] pages.
    pub fn buffer(&self) -> Gva {
        self.tenant().buffer
    }

    /// The device fills `len` bytes at `dst` in the process's address space, and the
    /// process reads its completion record: it must report success.
    pub fn fill(&self, dst: Gva, len: u64) -> Result<(), BenchError> {
        let t = self.tenant();
        let op = Operation::Fill {
            pattern: FILL_PATTERN,
            dst: dst.0,
            size: len as u32,
        };
        let rec = t.vm.run(&t.process, t.pasid, op, t.record)?;
        if rec.status != CompletionStatus::Success || u64::from(rec.bytes_completed) != len {
            return Err(BenchError::Check(format!(
                "a device fill of {len} bytes at {dst} completed with {rec:?}"
            )));
        }
        Ok(())
    }
}

impl Drop for BenchVm {
    /// The process goes first (it maps guest RAM), then the VM, leaving nothing on the host.
    fn drop(&mut self) {
        if let Some(Tenant { vm, process, .. }) = self.tenant.take() {
            drop(process);
            if let Err(e) = vm.shutdown() {
                tracing::warn!("bench VM shutdown: {e}");
            }
        }
    }
}
