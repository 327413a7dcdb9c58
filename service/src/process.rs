//! A `vsva host` child process, as `vsva load`, `vsva demo --split` and the tests that run
//! real processes start it: spawned in a directory of its own, waited for (bounded) until
//! its socket serves, stopped with SIGTERM for its exit report, killed when dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::RemoteFile;
use crate::protocol::HostState;

/// The longest a start, a probe or a stop waits for the host.
pub const HOST_WAIT: Duration = Duration::from_secs(30);
/// Bytes of the host's stderr kept for an error (the last ones).
const STDERR_KEPT: usize = 16 << 10;
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(10);

/// Why a host process could not be started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HostProcessError {
    /// Its directory could not be made, or the program not started.
    #[error("starting vsva host: {0}")]
    Spawn(std::io::Error),
    /// It exited before it served its socket.
    #[error("vsva host exited ({status}) before it served its socket{}", stderr_tail(.stderr))]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// What it wrote on stderr (the last 16 KiB).
        stderr: String,
    },
    /// It did not serve, answer or exit within [`HOST_WAIT`].
    #[error("vsva host: {what} within {}s{}", HOST_WAIT.as_secs(), stderr_tail(.stderr))]
    TimedOut {
        /// What it did not do.
        what: &'static str,
        /// What it wrote on stderr (the last 16 KiB).
        stderr: String,
    },
    /// Its `STATE` failed.
    #[error("vsva host STATE: {0}")]
    State(vsva_uapi::error::Errno),
}

fn stderr_tail(stderr: &str) -> String {
    let s = stderr.trim_end();
    if s.is_empty() {
        String::new()
    } else {
        format!("; its stderr:\n{s}")
    }
}

/// How a host process ended after [`HostProcess::stop`].
#[derive(Clone, Debug)]
pub struct HostExit {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it printed on stdout: its exit report.
    pub report: String,
    /// What it wrote on stderr (the last 16 KiB).
    pub stderr: String,
    /// Whether its socket was still there after it exited (a host removes it at exit).
    pub socket_left_behind: bool,
}

impl HostExit {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Whether its report says it held nothing more at the end than at the start.
    pub fn nothing_left_behind(&self) -> bool {
        self.report.contains("nothing left behind")
    }
}

impl std::fmt::Display for HostExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vsva host exited ({}): {}{}",
            self.status,
            self.report.trim_end(),
            stderr_tail(&self.stderr)
        )
    }
}

/// The last [`STDERR_KEPT`] bytes of what a child wrote on stderr, each line also passed
/// on to this process's stderr as it comes.
#[derive(Clone, Default)]
struct StderrTail(Arc<Mutex<String>>);

impl StderrTail {
    fn collect(&self, from: impl Read + Send + 'static) -> JoinHandle<()> {
        let tail = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut t = tail.0.lock().unwrap_or_else(PoisonError::into_inner);
                t.push_str(&line);
                t.push('\n');
                if t.len() > STDERR_KEPT {
                    let mut cut = t.len() - STDERR_KEPT;
                    while !t.is_char_boundary(cut) {
                        cut += 1;
                    }
                    t.drain(..cut);
                }
            }
        })
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A running child.
struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<()>>,
}

/// A `vsva host` process serving `socket` in a directory of its own (removed with it).
pub struct HostProcess {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    socket: PathBuf,
    running: Mutex<Option<Running>>,
    stderr: Mutex<StderrTail>,
}

impl HostProcess {
    /// Runs `exe host --socket <dir>/host.sock` with `args` added, in a new directory
    /// `vsva-<name>-<pid>` under the temporary directory, and waits (bounded) until the
    /// socket takes a connection. A host that exits first is an error with its stderr.
    pub fn start<S: AsRef<OsStr>>(
        exe: &Path,
        name: &str,
        args: &[S],
    ) -> Result<HostProcess, HostProcessError> {
        let dir = std::env::temp_dir().join(format!("vsva-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(HostProcessError::Spawn)?;
        let host = HostProcess {
            exe: exe.to_path_buf(),
            args: args.iter().map(|a| a.as_ref().to_os_string()).collect(),
            socket: dir.join("host.sock"),
            dir,
            running: Mutex::new(None),
            stderr: Mutex::default(),
        };
        host.restart()?;
        Ok(host)
    }

    /// Starts the host again on the same socket with the same arguments (after
    /// [`HostProcess::kill`]; a host still running is killed first) and waits for it as
    /// [`HostProcess::start`] does.
    pub fn restart(&self) -> Result<(), HostProcessError> {
        self.kill();
        let tail = StderrTail::default();
        *self.stderr.lock().unwrap_or_else(PoisonError::into_inner) = tail.clone();
        let mut child = Command::new(&self.exe)
            .arg("host")
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(HostProcessError::Spawn)?;
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                s
            })
        });
        let stderr = child.stderr.take().map(|e| tail.collect(e));
        *self.running() = Some(Running {
            child,
            stdout,
            stderr,
        });
        self.wait_until("did not serve its socket", || {
            RemoteFile::connect(&self.socket).is_ok()
        })
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.running().as_ref().map(|r| r.child.id())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the host wrote on stderr so far (the last 16 KiB).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .text()
    }

    /// Connects a new VFIO container.
    pub fn connect(&self) -> Result<RemoteFile, crate::client::ClientError> {
        RemoteFile::connect(&self.socket)
    }

    /// A connection that reads the host's state, once it is the host's only one (the
    /// connections made to see the socket up close in the host's own time): the baseline
    /// a leak check compares with.
    pub fn probe(&self) -> Result<(RemoteFile, HostState), HostProcessError> {
        let mut probe = None;
        let mut state = HostState::default();
        self.wait_until("did not settle to one connection", || {
            if probe.is_none() {
                probe = RemoteFile::connect(&self.socket).ok();
            }
            match probe.as_ref().map(RemoteFile::host_state) {
                Some(Ok(s)) => {
                    state = s;
                    s.connections == 1
                }
                Some(Err(_)) => {
                    probe = None;
                    false
                }
                None => false,
            }
        })?;
        let probe = probe.expect("the wait ended with a probe");
        Ok((probe, state))
    }

    /// Polls `ok` until it holds, failing when the host exits first or [`HOST_WAIT`]
    /// passes.
    fn wait_until(
        &self,
        what: &'static str,
        mut ok: impl FnMut() -> bool,
    ) -> Result<(), HostProcessError> {
        let deadline = Instant::now() + HOST_WAIT;
        loop {
            if ok() {
                return Ok(());
            }
            let mut running = self.running();
            let exited = match running.as_mut().map(|r| r.child.try_wait()) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            if let Some(status) = exited {
                if let Some(t) = running.take().and_then(|r| r.stderr) {
                    let _ = t.join();
                }
                return Err(HostProcessError::Exited {
                    status,
                    stderr: self.stderr(),
                });
            }
            drop(running);
            if Instant::now() > deadline {
                return Err(HostProcessError::TimedOut {
                    what,
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM and waits (bounded) for the host to tear down and exit; its exit
    /// report. A host that does not exit in time is killed, and that is an error.
    pub fn stop(self) -> Result<HostExit, HostProcessError> {
        let Some(mut r) = self.running().take() else {
            return Err(HostProcessError::TimedOut {
                what: "was not running to stop",
                stderr: self.stderr(),
            });
        };
        // SAFETY: kill(2) of our own child, not yet reaped (so its pid is still ours).
        unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + HOST_WAIT;
        let status = loop {
            match r.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    return Err(HostProcessError::TimedOut {
                        what: "did not exit after SIGTERM",
                        stderr: self.stderr(),
                    });
                }
            }
        };
        let report = r.stdout.and_then(|t| t.join().ok()).unwrap_or_default();
        if let Some(t) = r.stderr {
            let _ = t.join();
        }
        Ok(HostExit {
            status,
            report,
            stderr: self.stderr(),
            socket_left_behind: self.socket.exists(),
        })
    }

    /// Kills the host (SIGKILL) and reaps it, as a crash would end it; its socket is left
    /// behind, stale. Nothing happens when it is not running.
    pub fn kill(&self) {
        let taken = self.running().take();
        if let Some(mut r) = taken {
            let _ = r.child.kill();
            let _ = r.child.wait();
            if let Some(t) = r.stderr {
                let _ = t.join();
            }
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_exits_before_serving_is_an_error_with_its_stderr() {
        use std::os::unix::fs::PermissionsExt;
        // A stand-in for the binary that complains on stderr and exits 3, whatever its
        // arguments and working directory.
        let dir = std::env::temp_dir().join(format!("vsva-not-a-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("not-a-host");
        std::fs::write(&exe, "#!/bin/sh\necho \"no socket here: $1\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = HostProcess::start(&exe, "process-test", &["--memory", "1M"]);
        let _ = std::fs::remove_dir_all(&dir);
        let err = started.err().expect("the stand-in serves no socket");
        match &err {
            HostProcessError::Exited { status, stderr } => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "no socket here: host\n");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .ends_with("its stderr:\nno socket here: host"),
            "{err}"
        );
    }
}
