//! Finding the emulator and waiting for a QEMU run, what both oracles ([`crate::Machine`], [`crate::x86`]) do after
//! starting their `qemu-system-*` child: bounded in time, killed and reaped when it takes
//! longer, its standard error kept for the report.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How a run ended.
pub(crate) enum Ended {
    /// The child exited with `status`, having written `stderr`.
    Exited { status: ExitStatus, stderr: String },
    /// It was still running after the time allowed, and was killed.
    TimedOut,
}

/// Waits at most `timeout` for `child`, looking every 10 ms; kills and reaps it after that.
pub(crate) fn wait_bounded(mut child: Child, timeout: Duration) -> std::io::Result<Ended> {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Ended::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Ok(Ended::Exited { status, stderr })
}

/// The first `name` in a directory of PATH, if any.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
