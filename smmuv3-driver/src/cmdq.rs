//! The command queue (IHI 0070 §3.5, §4): commands are written at the producer index and
//! published with one CMDQ_PROD write per batch; a CMD_SYNC at the end of a batch is
//! complete once CMDQ_CONS has moved past it (`arm_smmu_cmdq_issue_cmdlist` with `sync`,
//! polling for completion as `__arm_smmu_cmdq_poll_until_consumed` does).

use vsva_mem::PhysMem;
use vsva_smmuv3::regs::{gerror, offset};
use vsva_smmuv3::{cmd::Cmd, cmd::CmdError, cmd::SyncCs, features::Features, regs::Queue};

use crate::{Error, Registers, POLL_LIMIT};

/// CMD_SYNC without a completion signal: software polls CMDQ_CONS.
pub(crate) const SYNC: Cmd = Cmd::Sync {
    cs: SyncCs::None,
    msh: 0,
    msi_attr: 0,
    msi_data: 0,
    msi_addr: 0,
};

/// The driver's side of the command queue: where it is and the producer pointer it
/// published last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandQueue {
    queue: Queue,
}

impl CommandQueue {
    /// A queue of 2^`log2size` commands at `base`, both pointers 0.
    pub fn new(base: u64, log2size: u8) -> Self {
        CommandQueue {
            queue: Queue {
                base,
                log2size,
                prod: 0,
                cons: 0,
            },
        }
    }

    /// The queue as the driver last saw it.
    pub fn queue(&self) -> Queue {
        self.queue
    }

    /// Refuses a command that [`Cmd::decode`] would not give back for `features`: the SMMU
    /// would stop on it with CERROR_ILL.
    pub fn check(cmd: &Cmd, features: &Features) -> Result<(), Error> {
        match Cmd::decode(cmd.encode(), features) {
            Ok(back) if back == *cmd => Ok(()),
            _ => Err(Error::IllegalCommand(*cmd)),
        }
    }

    fn read_cons<R: Registers>(&mut self, regs: &R) -> Result<u32, Error> {
        let cons = regs.read32(offset::CMDQ_CONS)?;
        self.queue.cons = cons & ((2 << self.queue.log2size) - 1);
        Ok(cons)
    }

    /// Issues `cmds` followed by a CMD_SYNC and waits until the SMMU consumed the sync.
    /// Every command is checked first, so an illegal one queues nothing. A command the
    /// queue stops on anyway is recovered from (`recover`, the global error handler) and
    /// reported once the batch completed.
    pub fn issue_sync<R, M>(
        &mut self,
        regs: &R,
        mem: &M,
        features: &Features,
        cmds: &[Cmd],
    ) -> Result<(), Error>
    where
        R: Registers,
        M: PhysMem + ?Sized,
    {
        for cmd in cmds {
            Self::check(cmd, features)?;
        }
        let mut failure = None;
        for cmd in cmds.iter().chain(std::iter::once(&SYNC)) {
            if self.queue.is_full() {
                regs.write(offset::CMDQ_PROD, 4, self.queue.prod as u64)?;
                self.wait(regs, mem, |q| !q.is_full(), &mut failure)?;
            }
            let addr = self.queue.entry_address(self.queue.prod, 16);
            let [d0, d1] = cmd.encode();
            mem.write_u64(addr, d0)?;
            mem.write_u64(addr + 8, d1)?;
            self.queue.prod = self.queue.next(self.queue.prod);
        }
        regs.write(offset::CMDQ_PROD, 4, self.queue.prod as u64)?;
        self.wait(regs, mem, Queue::is_empty, &mut failure)?;
        failure.map_or(Ok(()), Err)
    }

    /// Polls CMDQ_CONS until `done`, recovering a stopped queue on the way (the
    /// GERROR.CMDQ_ERR part of `arm_smmu_gerror_handler`; other global errors stay active
    /// for [`crate::SmmuDriver::handle_gerror`]).
    fn wait<R, M>(
        &mut self,
        regs: &R,
        mem: &M,
        done: fn(&Queue) -> bool,
        failure: &mut Option<Error>,
    ) -> Result<(), Error>
    where
        R: Registers,
        M: PhysMem + ?Sized,
    {
        for _ in 0..POLL_LIMIT {
            self.read_cons(regs)?;
            if done(&self.queue) {
                return Ok(());
            }
            let gerrorn = regs.read32(offset::GERRORN)?;
            if (regs.read32(offset::GERROR)? ^ gerrorn) & gerror::CMDQ_ERR != 0 {
                if let Some(e) = self.skip_err(regs, mem)? {
                    failure.get_or_insert(e);
                }
                regs.write(offset::GERRORN, 4, (gerrorn ^ gerror::CMDQ_ERR) as u64)?;
            }
        }
        Err(Error::SyncTimeout)
    }

    /// `arm_smmu_cmdq_skip_err`: the queue stopped at CMDQ_CONS with CMDQ_CONS.ERR. An
    /// illegal command is overwritten with a CMD_SYNC so that the queue moves on when the
    /// error is acknowledged; after an abort the fetch is retried, and after an ATC
    /// invalidation time-out the CMD_SYNC it stopped on is repeated. Returns what the
    /// queue stopped on, `None` when CONS.ERR names no error.
    pub(crate) fn skip_err<R, M>(&mut self, regs: &R, mem: &M) -> Result<Option<Error>, Error>
    where
        R: Registers,
        M: PhysMem + ?Sized,
    {
        let cons = self.read_cons(regs)?;
        let error = match (cons >> 24) & 0x7f {
            0 => return Ok(None),
            1 => CmdError::Ill,
            2 => CmdError::Abt,
            _ => CmdError::AtcInvSync,
        };
        let addr = self.queue.entry_address(self.queue.cons, 16);
        let raw = [mem.read_u64(addr)?, mem.read_u64(addr + 8)?];
        tracing::error!(?raw, %error, "SMMU command queue error");
        if error == CmdError::Ill {
            let [d0, d1] = SYNC.encode();
            mem.write_u64(addr, d0)?;
            mem.write_u64(addr + 8, d1)?;
        }
        Ok(Some(Error::CommandError { error, raw }))
    }
}

#[cfg(test)]
mod tests {
    use vsva_hw::memory::HostMemory;
    use vsva_hw::smmuv3::{Smmu, SmmuConfig};
    use vsva_smmuv3::regs::{cr0, gerror, offset};
    use vsva_smmuv3::{cmd::Cmd, cmd::CmdError, features::Features, regs::RegError};

    use super::*;

    struct Mmio(Smmu);

    impl Registers for Mmio {
        fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
            self.0.mmio_read(offset, size)
        }
        fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
            self.0.mmio_write(offset, size, value)
        }
    }

    /// An illegal command already in the queue stops it; the driver's recovery turns it
    /// into a CMD_SYNC, acknowledges the error, and the batch after it completes.
    #[test]
    fn skip_err_recovers_an_illegal_command() {
        let mem = HostMemory::new(1 << 20).unwrap();
        let regs = Mmio(Smmu::new(mem.clone(), SmmuConfig::default()));
        let base = 0x1000;
        regs.write(offset::CMDQ_BASE, 8, base | 2).unwrap();
        regs.write(offset::CR0, 4, cr0::CMDQEN as u64).unwrap();
        let mut q = CommandQueue::new(base, 2);
        let f = Features::VSVA;
        // Another producer's command the SMMU refuses: opcode 0x7f.
        let bad = [0x7f, 0];
        mem.write_u64(base, bad[0]).unwrap();
        mem.write_u64(base + 8, bad[1]).unwrap();
        q.queue.prod = 1;
        // Five commands through a queue of four: the driver waits for space too.
        let cmds = [Cmd::TlbiNhAsid { vmid: 1, asid: 2 }; 5];
        let r = q.issue_sync(&regs, &*mem, &f, &cmds);
        assert_eq!(
            r,
            Err(Error::CommandError {
                error: CmdError::Ill,
                raw: bad
            })
        );
        let cons = regs.read32(offset::CMDQ_CONS).unwrap();
        assert_eq!(cons & 0xf, q.queue().prod);
        let active = regs.read32(offset::GERROR).unwrap() ^ regs.read32(offset::GERRORN).unwrap();
        assert_eq!(active & gerror::CMDQ_ERR, 0);
        // The next batch meets no error.
        assert_eq!(q.issue_sync(&regs, &*mem, &f, &cmds[..1]), Ok(()));
    }
}
