//! What the AArch64 oracle tests share: the seeded generator, the data nonces, the IPS
//! encodings, the fault syndrome of a walker fault and a scratch directory.

use vsva_smmuv3::{AddressSize, FaultKind, WalkFault};

/// SplitMix64: small, seedable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn in_range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }
}

/// The nonce a data word holds before any store: its own address, marked.
pub fn nonce(pa: u64) -> u64 {
    pa ^ 0xd47a_0000_0000_0000
}

/// The IPS (TCR_EL1, CD) and PS (VTCR_EL2, STE.S2PS) encodings and their sizes.
pub const IPS: [(u64, AddressSize); 7] = [
    (0, AddressSize::Bits32),
    (1, AddressSize::Bits36),
    (2, AddressSize::Bits40),
    (3, AddressSize::Bits42),
    (4, AddressSize::Bits44),
    (5, AddressSize::Bits48),
    (6, AddressSize::Bits52),
];

/// The walker's fault as the DFSC a CPU reports (Arm ARM D17.2, ESR_ELx ISS for a Data Abort).
pub fn dfsc(f: &WalkFault) -> Option<u64> {
    let base = match f.kind {
        FaultKind::AddrSize => 0b00_0000,
        FaultKind::Translation => 0b00_0100,
        FaultKind::Access => 0b00_1000,
        FaultKind::Permission => 0b00_1100,
        FaultKind::WalkEabt => return None,
    };
    Some(base | u64::from(f.level))
}

/// A fresh directory for this process and thread, named with `tag`.
pub fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vsva-qemu-oracle-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// The seed a run without `VSVA_QEMU_ORACLE_SEED` uses: the same probes in every CI run,
/// so that a result does not depend on when the test ran (the x86 oracle does the same).
const DEFAULT_SEED: u64 = 0x05ee_da64;

/// `VSVA_QEMU_ORACLE_SEED` if set (to replay another run), else [`DEFAULT_SEED`].
pub fn seed() -> u64 {
    std::env::var("VSVA_QEMU_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}
