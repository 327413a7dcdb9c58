//! The command queue (IHI 0070 §4): commands are read from host memory between
//! CMDQ_CONS and CMDQ_PROD while CR0.CMDQEN is set and GERROR.CMDQ_ERR is inactive. An
//! illegal command (CERROR_ILL) or an unreadable one (CERROR_ABT) stops the queue with
//! CMDQ_CONS pointing at it, CMDQ_CONS.ERR naming the error and GERROR.CMDQ_ERR active
//! until software acknowledges it in GERRORN (§7.1).

use vsva_smmuv3::regs::{gerror, Irq};
use vsva_smmuv3::{cmd::Cmd, cmd::PriResp, cmd::ResumeAction, cmd::SyncCs};
use vsva_vtd::{addr::Pasid, inv_desc::AddrRange};

use super::stall::Outcome;
use super::Smmu;
use crate::dma::port::{DevTlbInvalidation, PrgResponse};
use vsva_vtd::inv_desc::ResponseCode;

impl Smmu {
    /// Consumes every produced command, in order. Device callbacks (ATC invalidation, page
    /// responses) run without the state lock held, and a CMD_SYNC completes after every
    /// earlier command has.
    pub(super) fn consume_commands(&self) {
        let _serial = self.cmdq_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = self.lock().regs.cmdq_to_consume() else {
            return;
        };
        let mut cons = queue.cons;
        let mut error = None;
        // PROD is fixed for this pass; each step moves CONS one entry closer to it.
        while !(vsva_smmuv3::regs::Queue { cons, ..queue }).is_empty() {
            match Cmd::fetch(&self.mem, &queue, cons, &self.features) {
                Ok(cmd) => self.execute(&cmd),
                Err((e, raw)) => {
                    tracing::debug!(?raw, %e, "SMMU command queue error");
                    error = Some(e);
                    break;
                }
            }
            cons = queue.next(cons);
        }
        let mut state = self.lock();
        state.regs.cmdq_consumed(cons, error);
        if error.is_some() {
            self.signal(&mut state.regs, Irq::Gerror);
        }
    }

    /// Performs one command.
    fn execute(&self, cmd: &Cmd) {
        Smmu::count(&self.stats.commands);
        if let Cmd::Sync { .. } = cmd {
            // The invalidations before it are complete once no transaction that used what
            // they removed is still moving bytes (§3.21.1 CMD_SYNC).
            self.drain.drain();
        }
        match *cmd {
            Cmd::AtcInv {
                sid,
                ssid,
                global,
                addr,
                size,
            } => {
                if let Some(ep) = self.endpoint(sid) {
                    // Size: the range is 2^Size 4 KiB pages, naturally aligned.
                    ep.invalidate_devtlb(DevTlbInvalidation {
                        pasid: ssid.and_then(|s| Pasid::new(s).ok()),
                        global,
                        range: AddrRange::from_address_mask(addr, size),
                    });
                }
            }
            Cmd::PriResp {
                sid,
                ssid,
                prg_index,
                resp,
            } => {
                if let Some(ep) = self.endpoint(sid) {
                    ep.page_response(PrgResponse {
                        pasid: ssid.and_then(|s| Pasid::new(s).ok()),
                        prgi: prg_index,
                        code: match resp {
                            PriResp::Success => ResponseCode::Success,
                            PriResp::Deny => ResponseCode::InvalidRequest,
                            PriResp::Fail => ResponseCode::ResponseFailure,
                        },
                    });
                }
            }
            Cmd::Sync {
                cs: SyncCs::Irq,
                msi_data,
                msi_addr,
                ..
            } if msi_addr != 0 => {
                if !self.msi_write(msi_addr, msi_data) {
                    let mut state = self.lock();
                    self.raise_gerror(&mut state.regs, gerror::MSI_CMDQ_ABT_ERR);
                }
            }
            // §4.7.2: a resume of a STAG the stream has not stalled is ignored.
            Cmd::Resume { sid, action, stag } => {
                let outcome = match action {
                    ResumeAction::Retry => Outcome::Retry,
                    ResumeAction::Abort | ResumeAction::Terminate => Outcome::Terminate,
                };
                if self.lock().stalls.resume(sid, stag, outcome) && outcome == Outcome::Terminate {
                    Smmu::count(&self.stats.stalls_terminated);
                }
            }
            Cmd::StallTerm { sid } => {
                let n = self.lock().stalls.terminate_where(|s| s == sid);
                self.count_n(&self.stats.stalls_terminated, n);
            }
            // CS=SEV and CS=NONE signal nothing a model can observe beyond CMDQ_CONS
            // moving past the command; prefetches are hints.
            Cmd::Sync { .. } | Cmd::PrefetchConfig { .. } | Cmd::PrefetchAddr { .. } => {}
            _ => {
                let mut state = self.lock();
                // vsva terminates the stalled transactions of a stream whose STE is
                // invalidated: the configuration they stalled under may be gone.
                let n = match *cmd {
                    Cmd::CfgiSte { sid, .. } => state.stalls.terminate_where(|s| s == sid),
                    Cmd::CfgiSteRange { range: 31, .. } => state.stalls.terminate_where(|_| true),
                    Cmd::CfgiSteRange { sid, range } => {
                        let shift = range as u32 + 1;
                        state.stalls.terminate_where(|s| s >> shift == sid >> shift)
                    }
                    _ => 0,
                };
                self.count_n(&self.stats.stalls_terminated, n);
                state.config.invalidate(cmd);
                state.tlb.invalidate(cmd);
                state.walk_cache.invalidate(cmd);
                state.s2_walk_cache.invalidate(cmd);
            }
        }
    }
}
