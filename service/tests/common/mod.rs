//! The host served on a socket in the test's own process, for the tests that talk to it
//! over real `SOCK_SEQPACKET` connections. Each test binary uses part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vsva_service::client::RemoteFile;
use vsva_service::protocol::HostState;
use vsva_service::{server::HostConfig, thread::HostThread};

/// How long a test waits for the host (its interrupt thread, a closing connection).
pub const WAIT: Duration = Duration::from_secs(20);

/// A host served in this test's process.
pub type Served = HostThread;

/// Serves a host made with `config` on a fresh socket.
pub fn serve(config: &HostConfig) -> Served {
    HostThread::start("service-test", config).unwrap()
}

/// Polls the host state until `ok` accepts it (at most [`WAIT`]), returning the last one.
pub fn settle(probe: &RemoteFile, ok: impl Fn(&HostState) -> bool) -> HostState {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = probe.host_state().unwrap();
        if ok(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
