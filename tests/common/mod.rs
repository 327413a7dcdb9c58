//! A `vsva host` process for the tests that run real processes (`tests/host.rs`,
//! `tests/vm.rs`), and the bounded waits they share.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vsva_service::protocol::HostState;
use vsva_service::RemoteFile;

/// The longest any wait of these tests lasts.
pub const WAIT: Duration = Duration::from_secs(20);

/// A `vsva host` process in a directory of its own, killed when dropped.
pub struct Host {
    pub child: Child,
    pub path: PathBuf,
    dir: PathBuf,
}

impl Host {
    /// Starts `vsva host --memory memory` with `args` added, and waits for its socket.
    pub fn start(name: &str, memory: &str, args: &[&str]) -> Host {
        let dir = std::env::temp_dir().join(format!("vsva-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.sock");
        let host = Host {
            child: spawn_host(&path, memory, args),
            path,
            dir,
        };
        wait_for(
            || RemoteFile::connect(&host.path).is_ok(),
            "the host's socket",
        );
        host
    }

    /// A connection that reads the host's state, once it is the only one (the connections
    /// `start` made to see the socket up close in the host's own time).
    pub fn probe(&self) -> (RemoteFile, HostState) {
        let probe = RemoteFile::connect(&self.path).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let s = probe.host_state().unwrap();
            if s.connections == 1 {
                return (probe, s);
            }
            assert!(Instant::now() < deadline, "connections never closed: {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM; whether the host exited successfully, and what it printed.
    pub fn stop(mut self) -> (bool, String) {
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let ok = wait_exit(&mut self.child).success();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (ok, out)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawns `vsva host --memory memory --socket path` with `args` added.
pub fn spawn_host(path: &Path, memory: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args(["host", "--memory", memory, "--socket"])
        .arg(path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("vsva host starts")
}

/// Waits (bounded) until `ok` holds.
pub fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
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
