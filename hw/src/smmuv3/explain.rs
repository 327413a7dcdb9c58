//! Explanations of the model: a [`SmmuExplanation`] of a transaction from the model's
//! stream table, with the caches neither used nor changed and no access or dirty flag set.

use vsva_smmuv3::explain::SmmuExplanation;
use vsva_smmuv3::{walk::AccessRequest, walk::WalkRecord};

use super::Smmu;

impl Smmu {
    /// Explains how a transaction would be translated now, from the tables in memory.
    pub fn explain(
        &self,
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        access: AccessRequest,
    ) -> SmmuExplanation {
        let mut walk = WalkRecord::default();
        let state = self.lock();
        let (ste, cd, result) = self.resolve(&state, sid, ssid, addr, access, &mut walk);
        SmmuExplanation {
            sid,
            ssid,
            addr,
            ste,
            cd,
            walk,
            result,
        }
    }
}
