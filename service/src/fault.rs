//! A served iommufd queue file: the fault queue `IOMMU_FAULT_QUEUE_ALLOC` gives a client,
//! or the vEVENT queue `IOMMU_VEVENTQ_ALLOC` gives it on an SMMUv3 host, as a file
//! descriptor it reads (and, for a fault queue, writes) itself.
//!
//! The host cannot hand out the queue file itself (it lives in the host process), so it
//! hands out one end of a `SOCK_SEQPACKET` socket pair, non-blocking, and a thread of the
//! host (the [`QueuePump`]) serves the other end. A fault queue ([`FaultPump`]):
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
//!
//! A vEVENT queue ([`VeventPump`]): each event the queue gives (its
//! `iommufd_vevent_header` and its 32-byte `iommu_vevent_arm_smmuv3` record, or a header
//! alone with `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`) becomes one message, so a `read` gives one
//! event; `EAGAIN` when none is waiting. The queue takes no writes: a message the client
//! writes is dropped. The pump stops when the client closes its end or the vEVENT queue
//! object is destroyed (the client then reads end-of-file).

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::io::Errno as SysErrno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use vsva_host::iommufd::fault::FaultFile;
use vsva_host::iommufd::vevent::VeventqFile;
use vsva_uapi::iommufd::{
    IommuHwptPgfault, IommuVeventArmSmmuv3, IommufdVeventHeader, IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
};
use vsva_uapi::wire::read_prefix;
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};

/// Bytes of one `iommu_hwpt_pgfault` record.
const RECORD: usize = std::mem::size_of::<IommuHwptPgfault>();
/// Bytes the pump reads from the queue at once, and the largest response message it takes.
const CHUNK: usize = RECORD * 256;
/// Bytes of a vEVENT header.
const VEVENT_HEADER: usize = std::mem::size_of::<IommufdVeventHeader>();
/// Bytes of an SMMUv3 vEVENT's data.
const VEVENT_SMMU: usize = std::mem::size_of::<IommuVeventArmSmmuv3>();
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

/// A queue file the host serves on a socket pair: what one `read` of it gives, cut into
/// the messages the client reads one at a time.
pub trait QueueFile: UapiFile + Send + Sync + 'static {
    /// The name of the pump's thread.
    const THREAD: &'static str;

    /// The messages of `bytes`, which one `read` of the file gave.
    fn messages(bytes: &[u8]) -> Vec<Vec<u8>>;
}

impl QueueFile for FaultFile {
    const THREAD: &'static str = "vsva-fault-queue";

    fn messages(bytes: &[u8]) -> Vec<Vec<u8>> {
        groups(bytes)
    }
}

impl QueueFile for VeventqFile {
    const THREAD: &'static str = "vsva-vevent-queue";

    fn messages(bytes: &[u8]) -> Vec<Vec<u8>> {
        vevents(bytes)
    }
}

/// The thread serving one queue's socket; stopped and joined when dropped.
pub struct QueuePump<F: QueueFile> {
    file: Weak<F>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// The pump of a fault queue.
pub type FaultPump = QueuePump<FaultFile>;
/// The pump of a vEVENT queue.
pub type VeventPump = QueuePump<VeventqFile>;

impl<F: QueueFile> QueuePump<F> {
    /// Starts serving `file`; returns the pump and the client's end of the socket.
    pub fn start(file: &Arc<F>) -> Result<(QueuePump<F>, OwnedFd), Errno> {
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
            .name(F::THREAD.into())
            .spawn(move || pump(&weak, &ours, &pwake, &pstop))
            .map_err(|_| Errno::new(libc::EAGAIN))?;
        file.set_event_notifier(Some(Arc::new(EventfdNotifier(notifier))));
        Ok((
            QueuePump {
                file: Arc::downgrade(file),
                stop,
                wake,
                thread: Some(thread),
            },
            theirs,
        ))
    }

    /// The queue served, while its object lives.
    pub fn file(&self) -> Option<Arc<F>> {
        self.file.upgrade()
    }
}

impl<F: QueueFile> Drop for QueuePump<F> {
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

/// Splits whole vEVENTs read from an SMMUv3 vEVENT queue into one message each: a header
/// and its record, or a lost-events header alone.
fn vevents(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = bytes.get(at..at + VEVENT_HEADER) {
        let header: IommufdVeventHeader = read_prefix(h, VEVENT_HEADER);
        let len = if header.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
            VEVENT_HEADER
        } else {
            VEVENT_HEADER + VEVENT_SMMU
        };
        let Some(event) = bytes.get(at..at + len) else {
            tracing::error!("vEVENT queue: a read ended inside an event");
            break;
        };
        out.push(event.to_vec());
        at += len;
    }
    out
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

/// Serves the socket until `stop`, the client closing its end or the queue object going.
fn pump<F: QueueFile>(file: &Weak<F>, sock: &OwnedFd, wake: &OwnedFd, stop: &AtomicBool) {
    let mut outgoing: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Acquire) {
        if outgoing.is_empty() {
            let Some(f) = file.upgrade() else { break };
            match f.read(&mut buf) {
                Ok(n) => outgoing.extend(F::messages(&buf[..n])),
                Err(Errno::EAGAIN) => {}
                Err(e) => tracing::warn!("{}: read: {e}", F::THREAD),
            }
        }
        while let Some(m) = outgoing.front() {
            match rustix::net::send(sock, m, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Ok(_) => {
                    outgoing.pop_front();
                }
                Err(SysErrno::AGAIN) => break,
                Err(e) => {
                    tracing::debug!("{}: the client's end is gone ({e})", F::THREAD);
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
                tracing::error!("{}: poll: {e}", F::THREAD);
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

/// Hands every response message waiting on the socket to the queue (a vEVENT queue refuses
/// them); false when the client closed its end (`hup`: the socket said so, and an empty
/// read is its end, not an empty message).
fn responses<F: QueueFile>(
    file: &Weak<F>,
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
                tracing::debug!("{}: receive: {e}", F::THREAD);
                return false;
            }
        };
        if n > buf.len() {
            tracing::debug!("{}: a message of {n} bytes is refused", F::THREAD);
            continue;
        }
        let Some(f) = file.upgrade() else {
            return false;
        };
        match f.write(&buf[..n]) {
            Ok(done) if done == n => {}
            Ok(done) => tracing::debug!("{}: {done} of {n} bytes taken", F::THREAD),
            Err(e) => tracing::debug!("{}: a message was refused: {e}", F::THREAD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsva_uapi::wire::Wire;

    #[test]
    fn each_vevent_is_one_message_and_a_lost_events_header_stands_alone() {
        let event = |sequence: u32, fill: u64| {
            let mut b = IommufdVeventHeader { flags: 0, sequence }
                .to_bytes()
                .to_vec();
            b.extend(IommuVeventArmSmmuv3 { evt: [fill; 4] }.to_bytes());
            b
        };
        let lost = IommufdVeventHeader {
            flags: IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
            sequence: 9,
        }
        .to_bytes()
        .to_vec();
        let bytes = [event(0, 1), event(1, 2), lost.clone()].concat();
        assert_eq!(vevents(&bytes), [event(0, 1), event(1, 2), lost]);
        assert_eq!(vevents(&[]), Vec::<Vec<u8>>::new());
        // A read cut inside an event gives the whole ones before it.
        assert_eq!(vevents(&bytes[..VEVENT_HEADER + 5]), Vec::<Vec<u8>>::new());
        assert_eq!(vevents(&bytes[..50]), [event(0, 1)]);
    }
}
