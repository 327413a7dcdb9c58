//! `SOCK_SEQPACKET` UNIX sockets carrying one frame per message, with file descriptors as
//! `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::io::Errno as SysErrno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::protocol::MAX_FRAME;

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
