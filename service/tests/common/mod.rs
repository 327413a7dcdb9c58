//! The host served on a socket in the test's own process, for the tests that talk to it
//! over real `SOCK_SEQPACKET` connections. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vsva_service::client::RemoteFile;
use vsva_service::protocol::HostState;
use vsva_service::{server::HostConfig, server::Report, server::Service};

/// How long a test waits for the host (its interrupt thread, a closing connection).
pub const WAIT: Duration = Duration::from_secs(20);

/// A [`Service`] serving a socket in a directory of its own; dropping it stops the
/// server, waits for it and removes the directory.
pub struct Served {
    /// The socket.
    pub path: PathBuf,
    /// The host behind it.
    pub service: Arc<Service>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Report>>,
    dir: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serves a host made with `config` on a fresh socket.
pub fn serve(config: &HostConfig) -> Served {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vsva-service-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.sock");
    let service = Service::new(config).unwrap();
    let listener = vsva_service::server::bind_socket(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (s, svc) = (stop.clone(), service.clone());
    let thread = std::thread::spawn(move || svc.serve(listener, &s));
    Served {
        path,
        service,
        stop,
        thread: Some(thread),
        dir,
    }
}

impl Served {
    /// Stops the server: its report of what was left.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
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
