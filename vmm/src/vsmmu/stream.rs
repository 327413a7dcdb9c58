//! Passthrough streams: the guest's STE of each (IHI 0070 §5.2) becomes the host
//! configuration of the device's container.
//!
//! What a stream does follows SMMU_CR0.SMMUEN and SMMU_GBPA (§6.3.9) while the SMMU is
//! disabled, and its STE once it is enabled: an ILLEGAL STE (or one that cannot be found)
//! aborts, as do V = 0 and Config = abort; Config = bypass leaves the guest physical
//! addresses of stage 2; Config = S1 translate hands the guest's CD table to the host.

use vsva_smmuv3::regs::{cr0, offset, GBPA_ABORT};
use vsva_smmuv3::{
    event::Event, event::EventType, lookup::ConfigFault, regs::Irq, ste::BadSte, ste::Config,
    ste::Eats, ste::Ste,
};
use vsva_uapi::{request::PasidConfig, request::PasidTableConfig};
use vsva_vtd::{addr::Gpa, addr::SourceId};

use super::iommufd::{nested_ste, VSTE_ABORT, VSTE_BYPASS};
use super::{Host, SmmuIommufdDevice, StreamHost, VSmmu, VSmmuError};
use crate::error::HostCall;
use crate::viommu::lock;
use std::sync::Arc;

/// What the host does with a passthrough device's transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostConfig {
    /// Stage 2 alone (no PASID table attached): the guest bypasses its stage 1.
    Stage2,
    /// Every transaction aborts (an attached table with `IOMMU_PASID_CONFIG_ABORT`).
    Abort,
    /// The guest's CD table translates, nested over stage 2.
    Translate(PasidTableConfig),
}

/// One passthrough device.
pub(crate) struct Stream {
    /// The StreamID the guest sees.
    pub sid: u32,
    /// The device's host requester id.
    pub host_sid: SourceId,
    /// The device's VFIO container or its device on the VM's iommufd.
    pub host: StreamHost,
    /// What the host was last successfully told.
    pub config: HostConfig,
    /// Whether the guest's STE enables ATS and PRI for the device (EATS).
    pub ats: bool,
    /// Whether the device stalls its faults (`VSmmu::set_stall_capable`).
    pub can_stall: bool,
    /// Whether the guest's STE disables stage-1 stalls (S1STALLD).
    pub s1stalld: bool,
}

/// STE word 1's S1STALLD (IHI 0070 §5.2).
const STE1_S1STALLD: u64 = 1 << 27;

/// The abort configuration of an attached table.
const ABORT: PasidTableConfig = PasidTableConfig {
    base_ptr: Gpa(0),
    pasid_bits: 0,
    config: PasidConfig::Abort,
};

impl VSmmu {
    /// Attaches the passthrough device with guest StreamID `sid` and host requester id
    /// `host_sid`, whose VFIO container is `host`. The device follows the vSMMU's current
    /// state at once (after reset: GBPA aborts its transactions).
    pub fn attach_passthrough(
        &self,
        sid: u32,
        host_sid: SourceId,
        host: Host,
    ) -> Result<(), VSmmuError> {
        self.attach_stream(sid, host_sid, StreamHost::Container(host))
    }

    /// Attaches the passthrough device with guest StreamID `sid` and host requester id
    /// `host_sid` on the VM's iommufd: `dev`, whose vDEVICE's virtual StreamID must be
    /// `sid` (the host turns the vSIDs of the guest's commands into the device's). Its
    /// STE follows the vSMMU's current state at once as a nested HWPT.
    pub fn attach_iommufd(
        &self,
        sid: u32,
        host_sid: SourceId,
        dev: Arc<SmmuIommufdDevice>,
    ) -> Result<(), VSmmuError> {
        if dev.vsid() != sid {
            return Err(VSmmuError::Unsupported(
                "a vDEVICE whose vSID is not the StreamID",
            ));
        }
        self.attach_stream(sid, host_sid, StreamHost::Iommufd(dev.clone()))?;
        dev.serve_page_requests(host_sid);
        Ok(())
    }

    fn attach_stream(
        &self,
        sid: u32,
        host_sid: SourceId,
        host: StreamHost,
    ) -> Result<(), VSmmuError> {
        let _serial = lock(&self.cmdq);
        if (sid as u64) >> self.config.features.sid_bits != 0 {
            return Err(VSmmuError::BadStreamId(sid));
        }
        {
            let mut streams = lock(&self.streams);
            if streams.iter().any(|s| s.sid == sid) {
                return Err(VSmmuError::AlreadyAttached(sid));
            }
            if streams.iter().any(|s| s.host_sid == host_sid) {
                return Err(VSmmuError::HostDeviceAttached(host_sid));
            }
            streams.push(Stream {
                sid,
                host_sid,
                host,
                config: HostConfig::Stage2,
                ats: false,
                can_stall: false,
                s1stalld: false,
            });
        }
        self.resync_streams(|s| s == sid, None);
        Ok(())
    }

    /// Detaches the passthrough device with guest StreamID `sid`, detaching the guest's
    /// table from its container first.
    pub fn detach_passthrough(&self, sid: u32) -> Result<(), VSmmuError> {
        let _serial = lock(&self.cmdq);
        // Stalls the guest never answered end before the device goes.
        self.terminate_stalls(sid);
        let stream = {
            let mut streams = lock(&self.streams);
            let at = streams
                .iter()
                .position(|s| s.sid == sid)
                .ok_or(VSmmuError::NoStream(sid))?;
            streams.remove(at)
        };
        if stream.config != HostConfig::Stage2 {
            match &stream.host {
                StreamHost::Container(host) => {
                    let r = host.detach_pasid_table();
                    self.host_call(r, || HostCall::DetachPasidTable);
                }
                StreamHost::Iommufd(dev) => {
                    let r = dev.stage2();
                    self.host_call(r, || HostCall::NestedHwpt(VSTE_BYPASS));
                }
            }
        }
        Ok(())
    }

    /// What the host does for the passthrough device with StreamID `sid`.
    pub fn host_config(&self, sid: u32) -> Result<HostConfig, VSmmuError> {
        lock(&self.streams)
            .iter()
            .find(|s| s.sid == sid)
            .map(|s| s.config)
            .ok_or(VSmmuError::NoStream(sid))
    }

    /// The passthrough streams `which` selects (by StreamID): (StreamID, host, current).
    pub(super) fn streams_where(
        &self,
        which: impl Fn(u32) -> bool,
    ) -> Vec<(u32, SourceId, StreamHost, HostConfig)> {
        lock(&self.streams)
            .iter()
            .filter(|s| which(s.sid))
            .map(|s| (s.sid, s.host_sid, s.host.clone(), s.config))
            .collect()
    }

    /// Re-reads the configuration of the streams `which` selects and makes the host
    /// follow it. Host calls are made without the stream lock held. With `report`, an STE
    /// that cannot be used is recorded in the event queue (see [`VSmmu::guest_config`]).
    pub(super) fn resync_streams(
        &self,
        which: impl Fn(u32) -> bool,
        mut report: Option<&mut Vec<Irq>>,
    ) {
        for (sid, _, host, current) in self.streams_where(which) {
            let (wanted, ats, vste) = self.guest_config(sid, report.as_deref_mut());
            let s1stalld = vste[1] & STE1_S1STALLD != 0;
            if wanted != current {
                // The host's STE changes, which ends its stalled transactions (§3.12.2):
                // the guest's stalls of the device are answered Abort.
                self.terminate_stalls(sid);
            }
            let reached = match &host {
                StreamHost::Container(host) => self.reconfigure(host, current, wanted),
                StreamHost::Iommufd(dev) => self.reconfigure_nested(dev, current, wanted, vste),
            };
            if let Some(s) = lock(&self.streams).iter_mut().find(|s| s.sid == sid) {
                s.config = reached;
                s.ats = ats && matches!(reached, HostConfig::Translate(_));
                s.s1stalld = s1stalld;
            }
        }
    }

    /// The host configuration the guest's registers and STE ask for `sid`, whether the STE
    /// enables ATS, and the STE words of a nested HWPT standing for it (iommufd).
    ///
    /// With `report` (the guest invalidated this one STE: it says the STE is ready), a
    /// C_BAD_STREAMID, F_STE_FETCH or C_BAD_STE condition is recorded in the event queue,
    /// as the device's next transaction would record it; an STE with V = 0 aborts without
    /// an event. Enabling the SMMU and the wide invalidations record nothing: no
    /// transaction has used the STE yet.
    fn guest_config(
        &self,
        sid: u32,
        report: Option<&mut Vec<Irq>>,
    ) -> (HostConfig, bool, [u64; 2]) {
        let found = match self.guest_ste(sid) {
            GuestSte::Disabled { abort: true } => return (HostConfig::Abort, false, VSTE_ABORT),
            GuestSte::Disabled { abort: false } => return (HostConfig::Stage2, false, VSTE_BYPASS),
            GuestSte::Enabled(found) => found,
        };
        let ste = match found {
            Ok(ste) => ste,
            Err(ConfigFault::BadSte(BadSte::NotValid)) => {
                return (HostConfig::Abort, false, VSTE_ABORT)
            }
            Err(fault) => {
                let event = match fault {
                    ConfigFault::SteFetch { addr } => Event {
                        addr2: addr,
                        ..Event::new(EventType::SteFetch, sid, None)
                    },
                    ConfigFault::BadStreamId => Event::new(EventType::BadStreamId, sid, None),
                    _ => Event::new(EventType::BadSte, sid, None),
                };
                if let Some(irqs) = report {
                    self.record_event(&event, irqs);
                }
                return (HostConfig::Abort, false, VSTE_ABORT);
            }
        };
        let ats = ste.eats != Eats::Abort;
        match ste.config {
            Config::Abort => (HostConfig::Abort, false, VSTE_ABORT),
            Config::Bypass => (HostConfig::Stage2, false, VSTE_BYPASS),
            // Stage 2 is not offered: decode refused the other Configs as ILLEGAL.
            _ => (
                HostConfig::Translate(table_config(&ste)),
                ats,
                nested_ste(&ste.encode()),
            ),
        }
    }

    /// Takes a device on the VM's iommufd from `current` to `wanted`, whose STE words are
    /// `vste`; returns where it is afterwards. A refused translating STE leaves the device
    /// aborting.
    fn reconfigure_nested(
        &self,
        dev: &SmmuIommufdDevice,
        current: HostConfig,
        wanted: HostConfig,
        vste: [u64; 2],
    ) -> HostConfig {
        let r = dev.set_vste(vste);
        if self.host_call(r, || HostCall::NestedHwpt(vste)) {
            if let HostConfig::Translate(_) = wanted {
                if current != wanted {
                    self.count(|s| s.table_attaches += 1);
                }
            }
            return wanted;
        }
        if matches!(wanted, HostConfig::Translate(_)) {
            let r = dev.set_vste(VSTE_ABORT);
            if self.host_call(r, || HostCall::NestedHwpt(VSTE_ABORT)) {
                return HostConfig::Abort;
            }
        }
        current
    }

    /// Takes the host from `current` to `wanted`; returns where it is afterwards. The host
    /// allows no direct change from one translating table to another: the table is
    /// detached first. A refused translating attach leaves the device aborting.
    fn reconfigure(&self, host: &Host, current: HostConfig, wanted: HostConfig) -> HostConfig {
        if current == wanted {
            return current;
        }
        let mut at = current;
        let detach = |at: &mut HostConfig| {
            let r = host.detach_pasid_table();
            if self.host_call(r, || HostCall::DetachPasidTable) {
                *at = HostConfig::Stage2;
            }
        };
        let attach = |at: &mut HostConfig, cfg: PasidTableConfig, to: HostConfig| {
            let r = host.attach_pasid_table(&cfg);
            let ok = self.host_call(r, || HostCall::AttachPasidTable(cfg));
            if ok {
                *at = to;
                if let HostConfig::Translate(_) = to {
                    self.count(|s| s.table_attaches += 1);
                }
            }
            ok
        };
        match wanted {
            HostConfig::Stage2 => detach(&mut at),
            HostConfig::Abort => {
                attach(&mut at, ABORT, HostConfig::Abort);
            }
            HostConfig::Translate(cfg) => {
                if let HostConfig::Translate(_) = at {
                    detach(&mut at);
                }
                if !attach(&mut at, cfg, wanted) && at != HostConfig::Abort {
                    attach(&mut at, ABORT, HostConfig::Abort);
                }
            }
        }
        at
    }
}

/// What the guest's registers make of a stream's transactions.
pub(super) enum GuestSte {
    /// SMMU_CR0.SMMUEN is clear: SMMU_GBPA aborts them (`abort`) or lets them bypass.
    Disabled {
        /// GBPA.ABORT.
        abort: bool,
    },
    /// The SMMU is enabled: the stream's STE, or why it has none.
    Enabled(Result<Ste, ConfigFault>),
}

impl VSmmu {
    /// The guest's configuration of the stream `sid` (§6.3.9, §3.3): GBPA while the SMMU
    /// is disabled, its STE in the stream table otherwise.
    pub(super) fn guest_ste(&self, sid: u32) -> GuestSte {
        let (enabled, gbpa, table) = {
            let regs = lock(&self.regs);
            (
                regs.cr0ack() & cr0::SMMUEN != 0,
                regs.read(offset::GBPA, 4).unwrap_or(GBPA_ABORT as u64) as u32,
                regs.stream_table(),
            )
        };
        if !enabled {
            return GuestSte::Disabled {
                abort: gbpa & GBPA_ABORT != 0,
            };
        }
        GuestSte::Enabled(match table {
            Ok(t) => t.find_ste(&*self.mem, &self.config.features, sid),
            // A reserved stream table format finds no STE.
            Err(_) => Err(ConfigFault::BadStreamId),
        })
    }
}

/// The `iommu_pasid_table_config` of an STE that translates with stage 1.
fn table_config(ste: &Ste) -> PasidTableConfig {
    PasidTableConfig {
        base_ptr: Gpa(ste.s1_context_ptr),
        pasid_bits: ste.s1cdmax,
        config: PasidConfig::Translate {
            s1fmt: ste.s1fmt.raw() as u8,
            s1dss: ste.s1dss.raw() as u8,
        },
    }
}
