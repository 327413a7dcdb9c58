//! `SOCK_SEQPACKET` UNIX sockets carrying one frame per message, with file descriptors as
//! `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno as SysErrno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::protocol::MAX_FRAME;

/// How long a side polls its socket for the other side's frame before it sleeps in
/// `recvmsg` ([`Poller`]): longer than most answers take when both threads have a core
/// (a few microseconds), shorter than one wake-up of a sleeping thread on a virtual
/// machine whose idle vCPUs halt (tens of microseconds, docs/performance-history.md), so that a
/// frame that comes within it is taken without the wake-up and a poll that finds nothing
/// costs less than the wake-up it tried to spare.
pub const SPIN: Duration = Duration::from_micros(10);

/// File descriptors one frame may carry (more are received and closed).
pub const MAX_FDS: usize = 4;

/// A frame as it arrived.
#[derive(Debug)]
pub struct Received {
    /// The frame's bytes (at most [`MAX_FRAME`]).
    pub bytes: Vec<u8>,
    /// The message was longer than [`MAX_FRAME`] and was cut.
    pub truncated: bool,
    /// File descriptors that came with it (closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// Binds and listens on `path`, a new socket only its owner may connect to (mode 0600).
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    // The socket file is created with the mode the umask leaves; a umask of 0177 makes it
    // 0600 from the start, so no other user ever sees it connectable.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = rustix::net::bind(&fd, &addr);
    rustix::process::umask(old);
    bound?;
    rustix::net::listen(&fd, 64)?;
    Ok(fd)
}

/// Connects to the socket at `path`.
pub fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// Sends one frame with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(frame)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(_) => return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE)),
            Err(SysErrno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one frame without fds, failing with `EAGAIN` rather than waiting for room.
pub fn send_nowait(sock: BorrowedFd<'_>, frame: &[u8]) -> std::io::Result<()> {
    match rustix::net::send(sock, frame, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE)),
        Err(e) => Err(e.into()),
    }
}

/// A buffer for [`recv_into`]: room for the largest frame, allocated and zeroed once
/// rather than for every frame.
pub struct RecvBuffer(Vec<u8>);

impl Default for RecvBuffer {
    fn default() -> Self {
        RecvBuffer(vec![0u8; MAX_FRAME])
    }
}

/// Receives one frame; `Ok(None)` when the peer closed the connection.
pub fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<Received>> {
    recv_into(sock, &mut RecvBuffer::default())
}

/// [`recv`] through `buf`: only the frame's own bytes are copied out.
pub fn recv_into(sock: BorrowedFd<'_>, buf: &mut RecvBuffer) -> std::io::Result<Option<Received>> {
    recv_with(sock, RecvFlags::empty(), &mut buf.0)
}

/// Longest run of receives a [`Poller`] makes without polling after its polls came up
/// empty (a power of two).
const MAX_BACKOFF: u32 = 64;

/// Receives frames polling first: for up to its budget the socket is read without
/// waiting (`MSG_DONTWAIT`), and only then does the thread sleep until a frame comes. A
/// frame is the same either way; the poll only spares the two wake-ups when the peer
/// answers soon. When the peer does not (it is busy, or the machine has more runnable
/// threads than cores and the peer waits for one), a poll only burns a core the peer may
/// need: after a poll that came up empty the next receives sleep at once, twice as many
/// after each further empty poll (up to `MAX_BACKOFF`), and a poll that finds its frame
/// polls every receive again.
#[derive(Debug)]
pub struct Poller {
    budget: Duration,
    /// Receives left that sleep without polling.
    skip: u32,
    /// How many receives the next empty poll skips.
    backoff: u32,
}

impl Poller {
    /// A poller with `budget` (zero never polls).
    pub fn new(budget: Duration) -> Poller {
        Poller {
            budget,
            skip: 0,
            backoff: 1,
        }
    }

    /// [`recv_into`], polling first when the last polls paid off.
    pub fn recv(
        &mut self,
        sock: BorrowedFd<'_>,
        buf: &mut RecvBuffer,
    ) -> std::io::Result<Option<Received>> {
        if self.budget.is_zero() {
            return recv_into(sock, buf);
        }
        if self.skip > 0 {
            self.skip -= 1;
            return recv_into(sock, buf);
        }
        let start = Instant::now();
        loop {
            match recv_with(sock, RecvFlags::DONTWAIT, &mut buf.0) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                done => {
                    self.backoff = 1;
                    return done;
                }
            }
            if start.elapsed() >= self.budget {
                break;
            }
            std::hint::spin_loop();
        }
        self.skip = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        recv_into(sock, buf)
    }
}

/// Receives one frame if one is queued (`EAGAIN` if none); `Ok(None)` when the peer
/// closed the connection.
pub fn recv_nowait(sock: BorrowedFd<'_>) -> std::io::Result<Option<Received>> {
    recv_with(sock, RecvFlags::DONTWAIT, &mut RecvBuffer::default().0)
}

fn recv_with(
    sock: BorrowedFd<'_>,
    flags: RecvFlags,
    bytes: &mut [u8],
) -> std::io::Result<Option<Received>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC | flags,
        ) {
            Ok(m) => break m,
            Err(SysErrno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    let truncated = msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > MAX_FRAME;
    if msg.bytes == 0 && !truncated && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(Received {
        bytes: bytes[..msg.bytes.min(MAX_FRAME)].to_vec(),
        truncated,
        fds,
    }))
}

/// Shuts both directions of `sock` down, waking a thread blocked on it.
pub fn shutdown(sock: impl AsFd) {
    let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt::{set_socket_timeout, Timeout};

    /// A connected pair; `b`'s receives give up after `timeout` (EAGAIN) instead of
    /// waiting for ever, so a receive that finds nothing ends.
    fn pair(timeout: Duration) -> (OwnedFd, OwnedFd) {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        set_socket_timeout(&b, Timeout::Recv, Some(timeout)).unwrap();
        (a, b)
    }

    fn would_block(r: std::io::Result<Option<Received>>) -> bool {
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    #[test]
    fn a_queued_frame_is_taken_by_the_poll_with_its_fds() {
        let (a, b) = pair(Duration::from_secs(10));
        let (c, _d) = pair(Duration::from_secs(10));
        let mut poller = Poller::new(Duration::from_secs(10));
        let mut buf = RecvBuffer::default();
        for i in 0..3u8 {
            send(a.as_fd(), &[i; 40], &[c.as_fd()]).unwrap();
            let r = poller.recv(b.as_fd(), &mut buf).unwrap().unwrap();
            assert_eq!((r.bytes, r.truncated, r.fds.len()), (vec![i; 40], false, 1));
            assert_eq!((poller.skip, poller.backoff), (0, 1));
        }
        drop(a);
        assert!(poller.recv(b.as_fd(), &mut buf).unwrap().is_none());
        assert_eq!((poller.skip, poller.backoff), (0, 1));
    }

    #[test]
    fn empty_polls_back_off_exponentially_and_a_found_frame_resets_them() {
        // Nothing is sent: every receive polls for 1 us at most, then sleeps until the
        // receive timeout.
        let (a, b) = pair(Duration::from_millis(20));
        let mut poller = Poller::new(Duration::from_micros(1));
        let mut buf = RecvBuffer::default();
        let mut polled = Vec::new();
        for _ in 0..12 {
            let skipped_before = poller.skip;
            assert!(would_block(poller.recv(b.as_fd(), &mut buf)));
            polled.push(skipped_before == 0);
        }
        // Polls at receives 0, 2 (after skipping 1), 5 (after 2), 10 (after 4).
        let at: Vec<usize> = (0..12).filter(|&i| polled[i]).collect();
        assert_eq!(at, [0, 2, 5, 10]);
        assert_eq!(poller.backoff, 16);
        // Skipped receives still take a frame (sleeping for it).
        send(a.as_fd(), b"late", &[]).unwrap();
        let r = poller.recv(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(r.bytes, b"late");
        // Once the skips are used up, a poll that finds its frame polls every receive again.
        while poller.skip > 0 {
            assert!(would_block(poller.recv(b.as_fd(), &mut buf)));
        }
        send(a.as_fd(), b"soon", &[]).unwrap();
        assert_eq!(
            poller.recv(b.as_fd(), &mut buf).unwrap().unwrap().bytes,
            b"soon"
        );
        assert_eq!((poller.skip, poller.backoff), (0, 1));
    }

    #[test]
    fn the_backoff_is_bounded() {
        let (_a, b) = pair(Duration::from_millis(1));
        let mut poller = Poller::new(Duration::from_micros(1));
        let mut buf = RecvBuffer::default();
        for _ in 0..(MAX_BACKOFF as usize * 3) {
            assert!(would_block(poller.recv(b.as_fd(), &mut buf)));
            assert!(poller.backoff <= MAX_BACKOFF && poller.skip <= MAX_BACKOFF);
        }
        assert_eq!(poller.backoff, MAX_BACKOFF);
    }

    #[test]
    fn a_zero_budget_never_polls() {
        let (a, b) = pair(Duration::from_millis(20));
        let mut poller = Poller::new(Duration::ZERO);
        let mut buf = RecvBuffer::default();
        assert!(would_block(poller.recv(b.as_fd(), &mut buf)));
        assert_eq!((poller.skip, poller.backoff), (0, 1));
        send(a.as_fd(), b"x", &[]).unwrap();
        assert_eq!(
            poller.recv(b.as_fd(), &mut buf).unwrap().unwrap().bytes,
            b"x"
        );
    }

    #[test]
    fn frames_between_threads_arrive_in_order_whether_polled_or_slept_for() {
        // A ping-pong with a peer thread: each reply is found by the poll or slept for,
        // depending on scheduling; either way every frame arrives, in order, intact.
        let (a, b) = pair(Duration::from_secs(30));
        let peer = std::thread::spawn(move || {
            let mut poller = Poller::new(SPIN);
            let mut buf = RecvBuffer::default();
            while let Some(r) = poller.recv(a.as_fd(), &mut buf).unwrap() {
                send(a.as_fd(), &r.bytes, &[]).unwrap();
            }
        });
        let mut poller = Poller::new(SPIN);
        let mut buf = RecvBuffer::default();
        for i in 0..500u32 {
            send(b.as_fd(), &i.to_le_bytes(), &[]).unwrap();
            let r = poller.recv(b.as_fd(), &mut buf).unwrap().unwrap();
            assert_eq!(r.bytes, i.to_le_bytes());
        }
        shutdown(&b);
        peer.join().unwrap();
    }
}
