//! This test binary run again as a client process (`tests/host.rs`,
//! `tests/iommufd_socket.rs`): one test of it plays the client when an environment
//! variable names the host's socket, and says "ready" once it holds what it should.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::WAIT;

/// Runs test `test` of this binary alone with `env` set to `path` and its stderr as
/// `stderr`, and waits (bounded) until it prints "ready"; kills it and panics if it does
/// not.
pub fn spawn_ready(test: &str, env: &str, path: &Path, stderr: Stdio) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(env, path)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            // libtest prints "test <name> ... " before the test's own output.
            if line.is_ok_and(|l| l.trim_end().ends_with("ready")) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(WAIT).is_err() {
        let _ = child.kill();
        panic!("the client process {test} never got ready");
    }
    child
}
