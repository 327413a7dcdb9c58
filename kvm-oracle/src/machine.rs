//! One KVM virtual machine with one vCPU in 64-bit long mode, used as an MMU oracle.
//!
//! The VM's RAM is a window of vsva's host memory (`HostMemory`, GPA = HPA), so page tables
//! that vsva's builder writes there are the ones the CPU walks, and the accessed/dirty bits
//! the CPU sets are visible to the host. Each probe restarts the vCPU at the ring-0 entry
//! of the harness ([`crate::guest`]), which reloads CR3 and performs one access at the
//! requested privilege; the result comes back as an MMIO exit (a store to the report
//! page) or, from the exception handlers, as a port-I/O exit.

use std::ffi::CStr;
use std::sync::Arc;
use vsva_mem::PhysMem;

use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_hw::{memory::HostMemory, memory::HostMemoryError};
use vsva_vtd::{addr::Gpa, addr::Hpa};

use crate::guest::{self, HarnessPage};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// A non-canonical value left in RAX, so code reached by mistake faults at once.
const POISON: u64 = 0x8000_0000_dead_0000;

/// Errors of the oracle.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The KVM device does not exist on this machine (opening it gave ENOENT): the only
    /// failure tests skip on, with this reason.
    #[error("KVM is unavailable: {0}")]
    Unavailable(String),
    /// The host's KVM cannot run the harness (a property it lacks).
    #[error("KVM cannot run the oracle: {0}")]
    Unsuitable(String),
    /// A KVM call failed (opening the device included, unless it is missing).
    #[error("KVM {call} failed: {source}")]
    Kvm {
        /// The ioctl that failed, such as "KVM_GET_REGS".
        call: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting up guest memory failed.
    #[error(transparent)]
    Memory(#[from] HostMemoryError),
    /// The RAM size is not a multiple of 2 MiB, or reaches the report page.
    #[error("guest RAM size {0:#x} must be a multiple of 2 MiB between 2 MiB and 32 GiB")]
    BadRamSize(u64),
    /// The vCPU stopped for a reason the harness does not produce.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
}

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> OracleError {
    move |source| OracleError::Kvm { call, source }
}

/// Paging features of the vCPU, as KVM reports it can expose them (5-level paging only
/// when KVM also accepts CR4.LA57).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeatures {
    /// 5-level paging (`CPUID.7.0:ECX[16]`).
    pub la57: bool,
    /// 1 GiB pages (`CPUID.80000001h:EDX[26]`).
    pub gbpages: bool,
    /// Supervisor-mode execution prevention (`CPUID.7.0:EBX[7]`).
    pub smep: bool,
    /// MAXPHYADDR (`CPUID.80000008h:EAX[7:0]`): address bits above it are reserved in
    /// paging entries.
    pub max_phys_bits: u8,
    /// The CPU is AMD's (or Hygon's), whose reserved-bit rules differ slightly from Intel's.
    pub amd: bool,
}

/// Paging mode of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// 4-level paging (CR4.LA57 = 0).
    Level4,
    /// 5-level paging (CR4.LA57 = 1).
    Level5,
}

/// Privilege of a probe's access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// Ring 0.
    Supervisor,
    /// Ring 3.
    User,
}

/// What a probe does at its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// An 8-byte load.
    Read,
    /// An 8-byte store of the value.
    Write(u64),
    /// A jump to the address, where [`guest::exec_snippet`] must be for it to succeed.
    Execute,
}

/// One access by the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// CR3: the guest-physical address of the top-level table.
    pub cr3: u64,
    /// 4- or 5-level paging (CR4.LA57).
    pub mode: PagingMode,
    /// CR0.WP: when clear, supervisor writes ignore read-only entries.
    pub write_protect: bool,
    /// CR4.SMEP: when set, supervisor instruction fetches from user pages fault.
    pub smep: bool,
    /// Ring of the access: supervisor (CPL 0) or user (CPL 3).
    pub privilege: Privilege,
    /// Linear address; 8-byte aligned for data accesses.
    pub va: u64,
    /// Read, write (with its value) or execute.
    pub access: Access,
}

/// What the vCPU reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read completed with this value.
    Read(u64),
    /// A write completed.
    Written,
    /// An execute probe ran the snippet carrying this token.
    Executed(u64),
    /// A page fault.
    PageFault {
        /// The page-fault error code (bits in [`pf`]).
        error_code: u64,
        /// CR2: the linear address that faulted.
        cr2: u64,
    },
    /// Any other exception, with the top two words of its frame (RIP and CS, or the
    /// error code and RIP).
    Exception {
        /// The exception vector, such as 13 for #GP.
        vector: u8,
        /// The two words at the top of the exception frame, top first.
        frame: [u64; 2],
    },
}

/// Page-fault error code bits (Intel SDM Vol. 3 §4.7).
pub mod pf {
    /// The fault was a protection violation (clear: a not-present entry).
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was made in user mode.
    pub const USER: u64 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RESERVED: u64 = 1 << 3;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;
}

/// A long-mode VM with one vCPU whose RAM is vsva host memory.
pub struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    memory: Arc<HostMemory>,
    guest: GuestMemoryMmap,
    region: kvm_userspace_memory_region,
    features: CpuFeatures,
    base_sregs: kvm_sregs,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("ram", &self.memory.size())
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Starts a VM with `ram_size` bytes of RAM at guest-physical 0 (a multiple of
    /// 2 MiB; sparse, so only touched pages cost memory) and installs the harness.
    /// Returns [`OracleError::Unavailable`] only when `/dev/kvm` does not exist; any other
    /// failure (no permission, a failing KVM call) is an error of its own.
    pub fn new(ram_size: u64) -> Result<Self, OracleError> {
        Self::with_device(c"/dev/kvm", ram_size)
    }

    /// [`Machine::new`] with the KVM device at `path`.
    pub fn with_device(path: &CStr, ram_size: u64) -> Result<Self, OracleError> {
        if ram_size < 2 << 20 || ram_size % (2 << 20) != 0 || ram_size > guest::REPORT_GPA {
            return Err(OracleError::BadRamSize(ram_size));
        }
        let kvm = Kvm::new_with_path(path).map_err(|e| {
            if e.errno() == libc::ENOENT {
                OracleError::Unavailable(format!("{}: {e}", path.to_string_lossy()))
            } else {
                OracleError::Kvm {
                    call: "opening the KVM device",
                    source: e,
                }
            }
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut features = features_of(cpuid.as_slice());
        if guest::REPORT_GPA
            .checked_shr(u32::from(features.max_phys_bits))
            .unwrap_or(0)
            != 0
        {
            return Err(OracleError::Unsuitable(format!(
                "a {}-bit physical address width leaves no room for the report page",
                features.max_phys_bits
            )));
        }

        let memory = HostMemory::new(ram_size)?;
        let guest = memory.guest_memory(&[(Gpa(0), Hpa(0), ram_size)])?;
        let host = guest
            .get_host_address(GuestAddress(0))
            .map_err(|e| OracleError::Memory(HostMemoryError::GuestWindow(e.to_string())))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram_size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `ram_size` bytes owned by `guest`, which
        // the machine keeps until the VM is dropped.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

        install_harness(&memory)?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        long_mode_sregs(&mut sregs);
        // KVM may list LA57 in its supported CPUID and still refuse CR4.LA57 in
        // KVM_SET_SREGS (the PVM backend does): 5-level paging is offered only when the
        // vCPU takes it.
        if features.la57 {
            let mut level5 = sregs;
            level5.cr4 |= CR4_LA57;
            features.la57 = vcpu.set_sregs(&level5).is_ok();
        }
        Ok(Machine {
            _kvm: kvm,
            vm,
            vcpu,
            memory,
            guest,
            region,
            features,
            base_sregs: sregs,
        })
    }

    /// Makes KVM forget every translation it derived from the guest's page tables. Needed
    /// after the host rewrites tables the vCPU has already used: where KVM shadows guest
    /// tables in software (no two-dimensional paging, or PVM), its shadow copies only
    /// follow the guest's own writes. Re-registering the memory slot drops them all.
    pub fn forget_translations(&mut self) -> Result<(), OracleError> {
        let empty = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: deleting the slot, then registering the same live mapping again (see
        // `new`).
        unsafe {
            self.vm
                .set_user_memory_region(empty)
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            self.vm
                .set_user_memory_region(self.region)
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
        }
    }

    /// The VM's RAM as vsva physical memory (GPA = address in it).
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.memory
    }

    /// What the vCPU supports.
    pub fn features(&self) -> CpuFeatures {
        self.features
    }

    /// Runs one probe. The tables under `probe.cr3` must map the harness
    /// ([`guest::HARNESS_PAGES`]), and `probe.va` must lie outside its top-level slot and
    /// outside [`guest::hypervisor_hole`].
    pub fn probe(&mut self, probe: &Probe) -> Result<Outcome, OracleError> {
        let mut sregs = self.base_sregs;
        sregs.cr3 = probe.cr3;
        if probe.write_protect {
            sregs.cr0 |= CR0_WP;
        }
        if probe.mode == PagingMode::Level5 {
            sregs.cr4 |= CR4_LA57;
        }
        if probe.smep {
            sregs.cr4 |= CR4_SMEP;
        }
        self.vcpu
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let (op, value) = match probe.access {
            Access::Read => (guest::OP_READ, 0),
            Access::Write(v) => (guest::OP_WRITE, v),
            Access::Execute => (guest::OP_EXECUTE, 0),
        };
        let (user, stub) = match probe.privilege {
            Privilege::Supervisor => (0, guest::KERNEL_CODE.va + guest::SUPERVISOR_STUB_OFFSET),
            Privilege::User => (1, guest::USER_CODE.va),
        };
        let regs = kvm_regs {
            rip: guest::KERNEL_CODE.va,
            rflags: 0x2,
            rsp: guest::KERNEL_STACK.va + 4096,
            rax: POISON,
            rbx: guest::REPORT.va,
            rcx: probe.cr3,
            rdx: user,
            rdi: probe.va,
            rsi: op,
            r8: value,
            r9: guest::USER_STACK.va + 4096,
            r10: stub,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let outcome = self.run(probe.access);
        self.complete_io()?;
        outcome
    }

    /// Runs the vCPU until the harness reports.
    fn run(&mut self, access: Access) -> Result<Outcome, OracleError> {
        const DONE: u64 = guest::REPORT_GPA + guest::REPORT_DONE;
        const EXEC: u64 = guest::REPORT_GPA + guest::REPORT_EXEC;
        loop {
            let port = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) => port,
                Ok(VcpuExit::MmioWrite(addr, data)) if data.len() == 8 => {
                    let value = u64::from_le_bytes(data.try_into().expect("8 bytes"));
                    return match (addr, access) {
                        (DONE, Access::Read) => Ok(Outcome::Read(value)),
                        (DONE, Access::Write(_)) => Ok(Outcome::Written),
                        (EXEC, Access::Execute) => Ok(Outcome::Executed(value)),
                        _ => Err(OracleError::UnexpectedExit(format!(
                            "{access:?} probe stored {value:#x} at {addr:#x}"
                        ))),
                    };
                }
                Ok(VcpuExit::Intr) => continue,
                Ok(exit) => return Err(OracleError::UnexpectedExit(format!("{exit:?}"))),
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            let regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
            return match port {
                guest::PORT_PAGE_FAULT => Ok(Outcome::PageFault {
                    error_code: regs.rbx,
                    cr2: regs.rax,
                }),
                guest::PORT_EXCEPTION => Ok(Outcome::Exception {
                    vector: regs.rcx as u8,
                    frame: [regs.rdx, regs.rsi],
                }),
                other => Err(OracleError::UnexpectedExit(format!(
                    "output to port {other:#x} at rip {:#x}",
                    regs.rip
                ))),
            };
        }
    }

    /// Lets KVM finish the instruction that exited (KVM completes an MMIO or port access
    /// on the next `KVM_RUN`, and would otherwise do so over the next probe's registers)
    /// without entering the guest again.
    fn complete_io(&mut self) -> Result<(), OracleError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let done = match self.vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(kvm_err("KVM_RUN")(e)),
            Ok(exit) => Err(OracleError::UnexpectedExit(format!(
                "{exit:?} while completing I/O"
            ))),
        };
        self.vcpu.set_kvm_immediate_exit(0);
        done
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.memory.release_guest_memory(&self.guest);
    }
}

/// Reads the paging features out of KVM's supported CPUID.
fn features_of(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> CpuFeatures {
    let leaf = |function: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == 0)
    };
    let vendor = leaf(0).map(|e| {
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&e.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&e.edx.to_le_bytes());
        v[8..].copy_from_slice(&e.ecx.to_le_bytes());
        v
    });
    let leaf7 = leaf(7);
    CpuFeatures {
        la57: leaf7.is_some_and(|e| e.ecx & (1 << 16) != 0),
        smep: leaf7.is_some_and(|e| e.ebx & (1 << 7) != 0),
        gbpages: leaf(0x8000_0001).is_some_and(|e| e.edx & (1 << 26) != 0),
        max_phys_bits: leaf(0x8000_0008).map_or(0, |e| (e.eax & 0xff) as u8),
        amd: matches!(&vendor, Some(v) if v == b"AuthenticAMD" || v == b"HygonGenuine"),
    }
}

/// Copies the harness pages into RAM.
fn install_harness(memory: &HostMemory) -> Result<(), OracleError> {
    let pages: [(HarnessPage, Vec<u8>); 4] = [
        (guest::KERNEL_CODE, guest::kernel_code_page()),
        (guest::DESCRIPTORS, guest::descriptors_page()),
        (guest::IDT, guest::idt_page()),
        (guest::USER_CODE, guest::user_code_page()),
    ];
    for (page, bytes) in pages {
        memory
            .write(page.gpa, &bytes)
            .map_err(HostMemoryError::from)?;
    }
    Ok(())
}

fn code_segment(dpl: u8, selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

fn data_segment(dpl: u8, selector: u16) -> kvm_segment {
    kvm_segment {
        type_: 0x3,
        db: 1,
        l: 0,
        ..code_segment(dpl, selector)
    }
}

/// Ring-0 long mode: flat segments, the harness GDT/IDT/TSS, paging with PAE and NXE.
/// CR3, CR0.WP, CR4.LA57 and CR4.SMEP are set per probe.
fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.cs = code_segment(0, guest::KERNEL_CS);
    let data = data_segment(0, guest::KERNEL_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: guest::DESCRIPTORS.va + guest::TSS_OFFSET,
        limit: 0x67,
        selector: guest::TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = guest::DESCRIPTORS.va;
    sregs.gdt.limit = (guest::GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = guest::IDT.va;
    sregs.idt.limit = (guest::IDT_VECTORS * 16 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_kvm_device_is_unavailable() {
        let missing = Machine::with_device(c"/dev/vsva-no-such-kvm", 2 << 20);
        assert!(
            matches!(missing, Err(OracleError::Unavailable(ref why)) if why.contains("/dev/vsva-no-such-kvm")),
            "{:?}",
            missing.err()
        );
        // A device that is not KVM: its ioctls fail, and that is an error, not a skip.
        let not_kvm = Machine::with_device(c"/dev/null", 2 << 20);
        assert!(
            matches!(
                not_kvm,
                Err(OracleError::Kvm {
                    call: "KVM_CREATE_VM",
                    ..
                })
            ),
            "{:?}",
            not_kvm.err()
        );
        // A path that cannot be opened read-write for another reason (EISDIR).
        let dir = Machine::with_device(c"/", 2 << 20);
        assert!(
            matches!(dir, Err(OracleError::Kvm { ref source, .. }) if source.errno() == libc::EISDIR),
            "{:?}",
            dir.err()
        );
    }
}
