//! A served iommufd fault queue: the file `IOMMU_FAULT_QUEUE_ALLOC` gives a client, as a
//! file descriptor it reads and writes itself.
//!
//! The host cannot hand out the fault queue file itself (it lives in the host process), so
//! it hands out one end of a `SOCK_SEQPACKET` socket pair, non-blocking, and a thread of
//! the host (the [`FaultPump`]) serves the other end:
//! - each whole page request group the queue delivers (`iommu_hwpt_pgfault` records, one
//!   cookie a group, `drivers/iommu/iommufd/eventq.c`) becomes one message, so a `read`
//!   gives one whole group; `EAGAIN` when none is waiting;
//! - each message the client writes is a run of `iommu_hwpt_page_response`s, handed to the
//!   queue's `write`, which answers the groups by cookie.
//!
//! A socket has no answer to a write: a response the queue refuses (unknown cookie or code,
//! a length that is not whole responses, as the kernel's `EINVAL`) is dropped, with the
//! ones before it in the same message done, and the client's `write` has succeeded. When
//! the client closes its end the pump stops; the queue's groups stay with the fault object
//! until it is destroyed or the connection closes, as a kernel fault object outlives its fd.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno as SysErrno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use vsva_host::iommufd::fault::FaultFile;
use vsva_uapi::iommufd::IommuHwptPgfault;
use vsva_uapi::wire::read_prefix;
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};

/// Bytes of one `iommu_hwpt_pgfault` record.
const RECORD: usize = std::mem::size_of::<IommuHwptPgfault>();
/// Bytes the pump reads from the queue at once, and the largest response message it takes.
const CHUNK: usize = RECORD * 256;
/// How often the pump looks at its stop flag when nothing happens.
const TICK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

fn errno(e: SysErrno) -> Errno {
    Errno::new(e.raw_os_error())
}

/// Adds 1 to an eventfd for each notification.
pub(crate) struct EventfdNotifier(pub(crate) OwnedFd);

impl EventNotifier for EventfdNotifier {
    fn notify(&self) {
        if let Err(e) = rustix::io::write(&self.0, &1u64.to_ne_bytes()) {
            tracing::debug!("fault eventfd: {e}");
        }
    }
}

/// The thread serving one fault queue's socket; stopped and joined when dropped.
pub struct FaultPump {
    file: Weak<FaultFile>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl FaultPump {
    /// Starts serving `file`; returns the pump and the client's end of the socket.
    pub fn start(file: &Arc<FaultFile>) -> Result<(FaultPump, OwnedFd), Errno> {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(errno)?;
        let wake = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(errno)?,
        );
        let notifier = wake
            .try_clone()
            .map_err(|e| Errno::new(e.raw_os_error().unwrap_or(libc::EMFILE)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (weak, pstop, pwake) = (Arc::downgrade(file), stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("vsva-fault-queue".into())
            .spawn(move || pump(&weak, &ours, &pwake, &pstop))
            .map_err(|_| Errno::new(libc::EAGAIN))?;
        file.set_event_notifier(Some(Arc::new(EventfdNotifier(notifier))));
        Ok((
            FaultPump {
                file: Arc::downgrade(file),
                stop,
                wake,
                thread: Some(thread),
            },
            theirs,
        ))
    }

    /// The queue served, while its fault object lives.
    pub fn file(&self) -> Option<Arc<FaultFile>> {
        self.file.upgrade()
    }
}

impl Drop for FaultPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(f) = self.file.upgrade() {
            f.set_event_notifier(None);
        }
    }
}

/// Splits whole groups read from the queue into one message each (the records of a group
/// share its cookie, and a group's records are consecutive).
fn groups(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut cookie = None;
    for rec in bytes.chunks_exact(RECORD) {
        let r: IommuHwptPgfault = read_prefix(rec, RECORD);
        match out.last_mut() {
            Some(last) if cookie == Some(r.cookie) => last.extend_from_slice(rec),
            _ => out.push(rec.to_vec()),
        }
        cookie = Some(r.cookie);
    }
    out
}

/// Serves the socket until `stop`, the client closing its end or the fault object going.
fn pump(file: &Weak<FaultFile>, sock: &OwnedFd, wake: &OwnedFd, stop: &AtomicBool) {
    let mut outgoing: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Acquire) {
        if outgoing.is_empty() {
            let Some(f) = file.upgrade() else { break };
            match f.read(&mut buf) {
                Ok(n) => outgoing.extend(groups(&buf[..n])),
                Err(Errno::EAGAIN) => {}
                Err(e) => tracing::warn!("fault queue: read: {e}"),
            }
        }
        while let Some(m) = outgoing.front() {
            match rustix::net::send(sock, m, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Ok(_) => {
                    outgoing.pop_front();
                }
                Err(SysErrno::AGAIN) => break,
                Err(e) => {
                    tracing::debug!("fault queue: the client's end is gone ({e})");
                    return;
                }
            }
        }
        let mut flags = PollFlags::IN;
        if !outgoing.is_empty() {
            flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::new(wake, PollFlags::IN), PollFd::new(sock, flags)];
        match rustix::event::poll(&mut fds, Some(&TICK)) {
            Ok(_) | Err(SysErrno::INTR) => {}
            Err(e) => {
                tracing::error!("fault queue: poll: {e}");
                return;
            }
        }
        let (woken, client) = (fds[0].revents(), fds[1].revents());
        if !woken.is_empty() {
            let mut count = [0u8; 8];
            let _ = rustix::io::read(wake, &mut count);
        }
        let hup = client.intersects(PollFlags::HUP | PollFlags::ERR);
        if (hup || client.contains(PollFlags::IN)) && !responses(file, sock.as_fd(), &mut buf, hup)
        {
            return;
        }
    }
}

/// Hands every response message waiting on the socket to the queue; false when the client
/// closed its end (`hup`: the socket said so, and an empty read is its end, not an empty
/// message).
fn responses(
    file: &Weak<FaultFile>,
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    hup: bool,
) -> bool {
    loop {
        let got = rustix::net::recv(sock, &mut *buf, RecvFlags::DONTWAIT | RecvFlags::TRUNC);
        let n = match got {
            Ok((0, _)) if hup => return false,
            Ok((0, _)) => continue,
            Ok((_, n)) => n,
            Err(SysErrno::AGAIN) => return true,
            Err(SysErrno::INTR) => continue,
            Err(e) => {
                tracing::debug!("fault queue: receive: {e}");
                return false;
            }
        };
        if n > buf.len() {
            tracing::debug!("fault queue: a response message of {n} bytes is refused");
            continue;
        }
        let Some(f) = file.upgrade() else {
            return false;
        };
        match f.write(&buf[..n]) {
            Ok(done) if done == n => {}
            Ok(done) => tracing::debug!("fault queue: {done} of {n} response bytes taken"),
            Err(e) => tracing::debug!("fault queue: a response was refused: {e}"),
        }
    }
}
