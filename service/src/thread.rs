//! A host served in a thread of the calling process: the [`Service`] object stays at hand
//! (its stream table, VMIDs, strict-mode record) while VMs connect to its socket as to
//! `vsva host`. For embedders that run the host beside their own code, the bench's
//! cross-process probes and the tests that look inside the host.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::server::{bind_socket, HostConfig, Report, Service, ServiceError};

/// A [`Service`] serving `host.sock` in a directory of its own, on a thread of this
/// process. Dropping it stops the server, waits for it and removes the directory.
pub struct HostThread {
    /// The socket VMs connect to.
    pub path: PathBuf,
    /// The host behind it.
    pub service: Arc<Service>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Report>>,
    dir: PathBuf,
}

impl HostThread {
    /// Builds a host with `config` and serves it on a fresh socket under the temporary
    /// directory (named after `name`, this process and a counter).
    pub fn start(name: &str, config: &HostConfig) -> Result<HostThread, ServiceError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vsva-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let path = dir.join("host.sock");
        std::fs::create_dir_all(&dir).map_err(|source| ServiceError::Socket {
            path: path.display().to_string(),
            source,
        })?;
        let service = Service::new(config)?;
        let listener = bind_socket(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, svc) = (stop.clone(), service.clone());
        let thread = std::thread::spawn(move || svc.serve(listener, &s));
        Ok(HostThread {
            path,
            service,
            stop,
            thread: Some(thread),
            dir,
        })
    }

    /// Stops the server and returns its report of what was served and left.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .expect("the thread runs until finish or drop")
            .join()
            .expect("the host's serving thread panicked")
    }
}

impl Drop for HostThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
