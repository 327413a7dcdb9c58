//! The `vsva host` process of the tests that run real processes (`tests/host.rs`,
//! `tests/vm.rs`, `tests/iommufd_socket.rs`): [`vsva_service::process::HostProcess`] on this
//! build's binary, and the bounded waits these tests share.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use vsva_service::protocol::HostState;
use vsva_service::{client::RemoteFile, process::HostProcess};

/// The longest any wait of these tests lasts.
pub const WAIT: Duration = Duration::from_secs(20);

/// Starts `vsva host --memory memory` with `args` added, in a directory named after
/// `name`, and waits for its socket.
pub fn start_host(name: &str, memory: &str, args: &[&str]) -> HostProcess {
    let mut all = vec!["--memory", memory];
    all.extend_from_slice(args);
    let exe = Path::new(env!("CARGO_BIN_EXE_vsva"));
    HostProcess::start(exe, &format!("test-{name}"), &all).unwrap_or_else(|e| panic!("{e}"))
}

/// SIGTERM; whether the host exited successfully, and what it printed.
pub fn stop(host: HostProcess) -> (bool, String) {
    let exit = host.stop().unwrap_or_else(|e| panic!("{e}"));
    (exit.success(), exit.report)
}

/// Stops the host and asserts it exited successfully with nothing left behind; returns
/// its report.
pub fn stop_clean(host: HostProcess) -> String {
    let (ok, report) = stop(host);
    assert!(ok, "{report}");
    assert!(report.contains("nothing left behind"), "{report}");
    report
}

/// Waits (bounded) for `child` to exit.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "a process did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls the host's state until it equals `want` (bounded); returns the last one.
pub fn settle(probe: &RemoteFile, want: HostState) -> HostState {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = probe.host_state().unwrap();
        if s == want || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
