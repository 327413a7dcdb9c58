//! A `vsva vm` process of the tests that run real processes (`tests/vm.rs`,
//! `tests/smmu_vm.rs`): its stdout read line by line on a thread, every wait bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use super::common::{wait_exit, WAIT};

/// A `vsva vm` process with its stdout read line by line on a thread.
pub struct VmProcess {
    /// The process (the tests signal it).
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl VmProcess {
    pub fn start(host: &Path, args: &[&str]) -> VmProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vsva"))
            .arg("vm")
            .arg("--socket")
            .arg(host)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vsva vm starts");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        VmProcess {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for the line `want`.
    pub fn wait_line(&mut self, want: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.seen.iter().any(|l| l == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("vsva vm never printed {want:?}: {:?}", self.seen),
            }
        }
    }

    /// Lets a paused VM go on.
    pub fn resume(&mut self) {
        drop(self.stdin.take());
    }

    /// Waits (bounded) for the exit; its status code, stdout lines and stderr.
    pub fn finish(mut self) -> (Option<i32>, Vec<String>, String) {
        self.resume();
        let status = wait_exit(&mut self.child);
        self.seen.extend(self.lines.try_iter());
        let deadline = Instant::now() + WAIT;
        // The reader thread sees the end of stdout once the process is gone.
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), self.seen, err)
    }
}

/// Runs `vsva args…` to its exit (bounded); its status, stdout and stderr.
pub fn run_vsva(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vsva starts");
    let status = wait_exit(&mut child);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}
