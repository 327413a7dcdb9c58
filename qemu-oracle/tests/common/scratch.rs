//! What every QEMU oracle test shares, AArch64 and x86: a scratch directory for the RAM
//! file and the run's output, and the seed of its random probes. The x86 tests include
//! this file alone (`#[path]`), the AArch64 ones through `common`.

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

/// `VSVA_QEMU_ORACLE_SEED` if set (to replay another run), else `default` (the test's own,
/// the same in every CI run).
pub fn seed(default: u64) -> u64 {
    std::env::var("VSVA_QEMU_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
