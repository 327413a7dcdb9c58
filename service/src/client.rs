//! The client transport: [`RemoteFile`] is a uAPI file served by `vsva host` in another
//! process, implementing the same [`UapiFile`] as the in-process container, so that a VMM
//! runs unchanged against either.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_hw::dma::descriptor::DESCRIPTOR_SIZE;
use vsva_uapi::{
    error::Errno, file::EventNotifier, file::IommuModel, file::UapiFile, file::VfioIoctls,
    request::DmaMap, vfio::VfioIommuType1Fault,
};
use vsva_vtd::{addr::Iova, addr::SourceId};

use crate::protocol::{
    encode_request, is_host_doorbell, HostState, Reply, Request, Welcome, CONNECTIONS_FULL,
    FILE_IOMMUFD, FILE_VFIO_CONTAINER, HEADER_LEN, RUN_RECORDS_MAX, VERSION, WELCOME_RING,
};
use crate::ring::{self, ClientRing};
use crate::socket;

/// A failure to reach the host.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach vsva host at {path}: {source}")]
    Connect {
        /// The socket's path.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The host refused the connection's `HELLO`.
    #[error("vsva host refused the connection: {0}")]
    Refused(Errno),
    /// The host serves its limit of connections, in all or for this process.
    #[error("vsva host refused the connection: it serves its limit of connections, in all or for this process ({0})")]
    Full(Errno),
    /// The host's answer did not follow the protocol.
    #[error("vsva host answered outside the protocol: {0}")]
    Protocol(String),
    /// A memory file could not be made or mapped.
    #[error("memory: {0}")]
    Memory(String),
}

/// Connection state behind the call lock: the next request id.
struct Calls {
    next_id: u32,
    /// Where replies are received.
    buf: socket::RecvBuffer,
    /// How replies are waited for.
    poller: socket::Poller,
    /// The call ring, once the host took it.
    ring: Option<ClientRing>,
    /// How ring replies are waited for.
    spinner: ring::Spinner,
}

/// How a [`RemoteFile`]'s calls travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Through a call ring offered with `HELLO` (docs/protocol.md, "The call ring") when
    /// the host takes it, else frames on the socket; calls that pass file descriptors, and
    /// any too large for the ring, take the socket either way.
    Ring,
    /// Frames on the socket only.
    Socket,
}

/// A uAPI file (a VFIO container) that `vsva host` serves over a UNIX socket.
pub struct RemoteFile {
    sock: OwnedFd,
    calls: Mutex<Calls>,
    welcome: Welcome,
    gone: AtomicBool,
    events: Mutex<Option<EventPump>>,
    /// The kind of file opened.
    kind: u32,
    /// File descriptors ioctls gave, by their number in this process, until taken.
    given: Mutex<BTreeMap<i32, OwnedFd>>,
}

impl std::fmt::Debug for RemoteFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFile")
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

/// The errno a call gets once the host is gone.
pub const HOST_GONE: Errno = Errno::new(libc::ENOTCONN);

impl RemoteFile {
    /// Connects to the host at `path` and opens a VFIO container there.
    pub fn connect(path: &Path) -> Result<RemoteFile, ClientError> {
        Self::connect_kind(path, FILE_VFIO_CONTAINER)
    }

    /// Connects to the host at `path` and opens a file of kind `kind` there
    /// ([`FILE_VFIO_CONTAINER`] or [`crate::protocol::FILE_IOMMUFD`]), with a call ring
    /// unless the environment says `VSVA_TRANSPORT=socket` (to compare the two with the
    /// same programs: `vsva bench`, `vsva load`).
    pub fn connect_kind(path: &Path, kind: u32) -> Result<RemoteFile, ClientError> {
        let transport = match std::env::var_os("VSVA_TRANSPORT") {
            Some(t) if t == "socket" => Transport::Socket,
            _ => Transport::Ring,
        };
        Self::connect_with(path, kind, transport)
    }

    /// Connects to the host at `path` and opens a file of kind `kind` there, its calls
    /// travelling by `transport`.
    pub fn connect_with(
        path: &Path,
        kind: u32,
        transport: Transport,
    ) -> Result<RemoteFile, ClientError> {
        let ring = match transport {
            Transport::Ring => Some(
                ClientRing::new().map_err(|e| ClientError::Memory(format!("call ring: {e}")))?,
            ),
            Transport::Socket => None,
        };
        let sock = socket::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let mut file = RemoteFile {
            sock,
            calls: Mutex::new(Calls {
                next_id: 1,
                buf: socket::RecvBuffer::default(),
                poller: socket::Poller::new(socket::SPIN),
                ring: None,
                spinner: ring::Spinner::new(ring::SPIN),
            }),
            welcome: Welcome {
                version: VERSION,
                flags: 0,
                max_payload: 0,
                max_in_flight: 1,
                max_windows: 0,
                max_window_bytes: 0,
            },
            gone: AtomicBool::new(false),
            events: Mutex::new(None),
            kind,
            given: Mutex::new(BTreeMap::new()),
        };
        let ring_fd: Vec<BorrowedFd<'_>> = ring.iter().map(ClientRing::fd).collect();
        let reply = file
            .call(
                &Request::Hello {
                    min_version: VERSION,
                    max_version: VERSION,
                    file: kind,
                    ring: ring.is_some(),
                },
                &ring_fd,
            )
            .map_err(ClientError::Refused)?;
        drop(ring_fd);
        reply.result.map_err(|e| match e {
            CONNECTIONS_FULL => ClientError::Full(e),
            e => ClientError::Refused(e),
        })?;
        file.welcome = Welcome::from_bytes(&reply.data)
            .ok_or_else(|| ClientError::Protocol("a HELLO reply without its limits".into()))?;
        if file.welcome.flags & WELCOME_RING != 0 {
            let Some(ring) = ring else {
                return Err(ClientError::Protocol(
                    "the host took a call ring it was not offered".into(),
                ));
            };
            file.lock().ring = Some(ring);
        }
        Ok(file)
    }

    /// The version and limits the host granted.
    pub fn welcome(&self) -> Welcome {
        self.welcome
    }

    /// Whether the connection's calls go through a call ring.
    pub fn has_ring(&self) -> bool {
        self.lock().ring.is_some()
    }

    /// Whether the host closed the connection (every call since fails with
    /// [`HOST_GONE`]).
    pub fn host_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` (with `fds`) and waits for its reply, which carries no fd.
    fn call(&self, request: &Request<'_>, fds: &[BorrowedFd<'_>]) -> Result<Reply, Errno> {
        let (reply, given) = self.call_fds(request, fds, true)?;
        if !given.is_empty() {
            tracing::error!(
                "vsva host gave {} fds with a reply that has none",
                given.len()
            );
            return Err(Errno::EIO);
        }
        Ok(reply)
    }

    /// Sends `request` (with `fds`) and waits for its reply and the fds it carries;
    /// through the call ring if there is one, `ring_ok` (the reply carries no fd), no fd
    /// goes with the request and the request and its reply fit the ring's slots.
    fn call_fds(
        &self,
        request: &Request<'_>,
        fds: &[BorrowedFd<'_>],
        ring_ok: bool,
    ) -> Result<(Reply, Vec<OwnedFd>), Errno> {
        if self.host_gone() {
            return Err(HOST_GONE);
        }
        let mut calls = self.lock();
        let id = calls.next_id;
        calls.next_id = calls.next_id.wrapping_add(1);
        let gone = |what: &str, e: Option<std::io::Error>| {
            self.gone.store(true, Ordering::Release);
            tracing::error!("vsva host connection lost ({what}: {e:?})");
            HOST_GONE
        };
        let frame = encode_request(id, request);
        let reply_fits = match request {
            Request::Read { count } => HEADER_LEN + 8 + (*count as usize) <= ring::REPLY_MAX,
            _ => true,
        };
        let Calls {
            buf,
            poller,
            ring,
            spinner,
            ..
        } = &mut *calls;
        if let Some(ring) = ring
            .as_mut()
            .filter(|_| ring_ok && fds.is_empty() && reply_fits)
            .filter(|_| frame.len() <= ring::REQUEST_MAX)
        {
            return self
                .ring_call(ring, spinner, buf, &frame, id)
                .map(|reply| (reply, Vec::new()));
        }
        socket::send(self.sock.as_fd(), &frame, fds).map_err(|e| gone("send", Some(e)))?;
        // The host answers most calls within microseconds: poll for the reply before
        // sleeping on it. A doorbell the host sent for an earlier ring reply the client
        // had found already is passed over.
        let received = loop {
            match poller.recv(self.sock.as_fd(), buf) {
                Ok(Some(r)) if r.fds.is_empty() && is_host_doorbell(&r.bytes) => continue,
                Ok(Some(r)) => break r,
                Ok(None) => return Err(gone("closed", None)),
                Err(e) => return Err(gone("receive", Some(e))),
            }
        };
        let reply = Reply::decode(&received.bytes).map_err(|e| {
            tracing::error!("vsva host reply: {e}");
            Errno::EIO
        })?;
        if reply.id != id {
            tracing::error!("vsva host replied to request {} out of turn", reply.id);
            return Err(Errno::EIO);
        }
        Ok((reply, received.fds))
    }

    /// One call through the call ring: `frame` (request `id`) is posted, with a doorbell
    /// if the host sleeps; the reply is spun for ([`ring::SPIN`], only while it can pay
    /// off: [`ring::Spinner`]), then slept for on the socket until the host's doorbell, the client having published that it sleeps. A
    /// host that breaks the ring's rules, or sends another frame meanwhile, loses the
    /// connection.
    fn ring_call(
        &self,
        ring: &mut ClientRing,
        spinner: &mut ring::Spinner,
        buf: &mut socket::RecvBuffer,
        frame: &[u8],
        id: u32,
    ) -> Result<Reply, Errno> {
        let gone = |what: String| {
            self.gone.store(true, Ordering::Release);
            tracing::error!("vsva host connection lost ({what})");
            HOST_GONE
        };
        if ring.post(frame) {
            socket::send(
                self.sock.as_fd(),
                &encode_request(0, &Request::Doorbell),
                &[],
            )
            .map_err(|e| gone(format!("doorbell: {e}")))?;
        }
        let found = match spinner.wait(|| ring.reply()) {
            Some(found) => found,
            None => {
                ring.set_waiting(true);
                let found = loop {
                    if let Some(found) = ring.reply() {
                        break Ok(found);
                    }
                    match socket::recv_into(self.sock.as_fd(), buf) {
                        Ok(Some(r)) if r.fds.is_empty() && is_host_doorbell(&r.bytes) => {}
                        Ok(Some(_)) => break Err("a frame while a ring reply was due".into()),
                        Ok(None) => break Err("closed".into()),
                        Err(e) => break Err(format!("receive: {e}")),
                    }
                };
                ring.set_waiting(false);
                found.map_err(gone)?
            }
        };
        let bytes = found.map_err(|e| gone(format!("call ring: {e}")))?;
        let reply = Reply::decode(&bytes).map_err(|e| gone(format!("ring reply: {e}")))?;
        if reply.id != id {
            return Err(gone(format!(
                "ring reply to request {} where {id} was due",
                reply.id
            )));
        }
        Ok(reply)
    }

    fn simple(&self, request: &Request<'_>, fds: &[BorrowedFd<'_>]) -> Result<Reply, Errno> {
        let reply = self.call(request, fds)?;
        reply.result?;
        Ok(reply)
    }

    /// Shares `size` bytes of `file` (a memfd; the host seals it against shrinking),
    /// mapped at `addr` in this process, with the host: from then on `MAP_DMA` of user
    /// addresses in `[addr, addr + size)` reaches its pages.
    pub fn add_memory(&self, file: BorrowedFd<'_>, addr: u64, size: u64) -> Result<(), Errno> {
        self.simple(&Request::AddMemory { addr, size }, &[file])
            .map(|_| ())
    }

    /// Plugs a passthrough DMA engine into the host, attached to this connection's
    /// container; returns its requester id on the host.
    pub fn device_add(&self) -> Result<SourceId, Errno> {
        let rid = self.simple(&Request::DeviceAdd, &[])?.result?;
        Ok(SourceId::from_rid(
            u16::try_from(rid).map_err(|_| Errno::EIO)?,
        ))
    }

    /// On an iommufd connection: plugs a passthrough DMA engine into the host, bound to
    /// this iommufd; returns its requester id and its device id in the iommufd.
    pub fn device_add_bound(&self) -> Result<(SourceId, u32), Errno> {
        let reply = self.simple(&Request::DeviceAdd, &[])?;
        let rid = u16::try_from(reply.result?).map_err(|_| Errno::EIO)?;
        let dev_id = reply
            .data
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(Errno::EIO)?;
        Ok((SourceId::from_rid(rid), dev_id))
    }

    /// Writes a descriptor to the device's portal at `offset`.
    pub fn device_write(
        &self,
        offset: u64,
        descriptor: &[u8; DESCRIPTOR_SIZE],
    ) -> Result<(), Errno> {
        self.simple(&Request::DeviceWrite { offset, descriptor }, &[])
            .map(|_| ())
    }

    /// Lets the device work through what was submitted; returns how many descriptors
    /// still wait for a page response.
    pub fn device_run(&self) -> Result<u64, Errno> {
        self.simple(
            &Request::DeviceRun {
                take_records: false,
            },
            &[],
        )?
        .result
    }

    /// [`RemoteFile::device_run`] on a container that also takes, when descriptors wait,
    /// the fault records queued (up to [`RUN_RECORDS_MAX`], as `READ` would give them), so
    /// that a page request needs no `READ` of its own: how many descriptors wait, and the
    /// records' bytes. A reply whose records are not whole, or too many, is `EIO`.
    pub fn device_run_taking_records(&self) -> Result<(u64, Vec<u8>), Errno> {
        const RECORD: usize = std::mem::size_of::<VfioIommuType1Fault>();
        let reply = self.simple(&Request::DeviceRun { take_records: true }, &[])?;
        let waiting = reply.result?;
        let records = reply.data.get(8..).ok_or(Errno::EIO)?;
        if records.len() % RECORD != 0 || records.len() > RUN_RECORDS_MAX * RECORD {
            return Err(Errno::EIO);
        }
        Ok((waiting, records.to_vec()))
    }

    /// Reads the device's 64-bit register at `offset` in its register BAR
    /// (`DEVICE_REG_READ`).
    pub fn device_reg_read(&self, offset: u64) -> Result<u64, Errno> {
        let reply = self.simple(&Request::DeviceRegRead { offset }, &[])?;
        reply
            .data
            .as_slice()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| Errno::EIO)
    }

    /// Writes `value` to the device's 64-bit register at `offset` in its register BAR
    /// (`DEVICE_REG_WRITE`).
    pub fn device_reg_write(&self, offset: u64, value: u64) -> Result<(), Errno> {
        self.simple(&Request::DeviceRegWrite { offset, value }, &[])
            .map(|_| ())
    }

    /// Gives the host `eventfd` to add 1 to for each fault record it queues on this file
    /// (`SET_EVENTFD`), or with `None` takes the notifier away; for a VMM that polls the
    /// eventfd itself rather than through [`UapiFile::set_event_notifier`].
    pub fn set_eventfd(&self, eventfd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
        let fds: Vec<BorrowedFd<'_>> = eventfd.into_iter().collect();
        self.simple(&Request::SetEventfd, &fds).map(|_| ())
    }

    /// What the host holds, host-wide.
    pub fn host_state(&self) -> Result<HostState, Errno> {
        let reply = self.simple(&Request::State, &[])?;
        HostState::from_bytes(&reply.data).ok_or(Errno::EIO)
    }

    /// Takes the file descriptor an ioctl gave as `fd` (its number in this process, as
    /// the ioctl wrote it in its argument): from then on the caller owns it.
    pub fn take_fd(&self, fd: i32) -> Option<OwnedFd> {
        self.given
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fd)
    }

    /// Takes the fault queue `IOMMU_FAULT_QUEUE_ALLOC` gave as `fd`, as a file.
    pub fn fault_queue(&self, fd: i32) -> Option<Arc<dyn UapiFile>> {
        self.take_fd(fd)
            .map(|fd| Arc::new(FaultQueueFd(fd)) as Arc<dyn UapiFile>)
    }

    /// Takes the vEVENT queue `IOMMU_VEVENTQ_ALLOC` gave as `fd` (an SMMUv3 host), as a
    /// file: each `read` gives one event, `EAGAIN` when none waits.
    pub fn veventq(&self, fd: i32) -> Option<Arc<dyn UapiFile>> {
        self.fault_queue(fd)
    }

    /// An ioctl whose reply gives a file descriptor, in the u32 field at `at`: the fd is
    /// kept for [`RemoteFile::take_fd`] and its number written in the field.
    fn ioctl_giving_fd(&self, cmd: u32, arg: &mut [u8], at: usize) -> Result<usize, Errno> {
        let (reply, mut fds) = self.call_fds(&Request::Ioctl { cmd, arg }, &[], false)?;
        let n = reply.result? as usize;
        if reply.data.len() != arg.len() || fds.len() != 1 || arg.len() < at + 4 {
            tracing::error!("vsva host's reply to ioctl {cmd:#x} does not give one fd");
            return Err(Errno::EIO);
        }
        arg.copy_from_slice(&reply.data);
        let fd = fds.remove(0);
        let raw = fd.as_raw_fd();
        arg[at..at + 4].copy_from_slice(&raw.to_le_bytes());
        self.given
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(raw, fd);
        Ok(n)
    }
}

/// The caller's fd number `fd`, borrowed for one call.
fn borrow<'a>(fd: i32) -> BorrowedFd<'a> {
    // SAFETY: the number comes from an ioctl argument the caller filled with one of its
    // open fds, as the kernel's `fget` takes it; it is only used for the call the caller
    // is making (an fcntl, then sendmsg), during which the caller keeps it open.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// A queue file `vsva host` serves ([`crate::fault`]): one end of a socket pair,
/// non-blocking. On a fault queue `read` gives one whole group of `iommu_hwpt_pgfault`
/// records (`EAGAIN` when none waits), `write` sends `iommu_hwpt_page_response`s; on a
/// vEVENT queue `read` gives one event. Readiness is the fd's own (poll it for `POLLIN`).
#[derive(Debug)]
pub struct FaultQueueFd(pub OwnedFd);

impl FaultQueueFd {
    /// Waits at most `timeout` for the queue to be readable (a group waits, or the host
    /// closed its end); whether it is.
    pub fn wait_readable(&self, timeout: std::time::Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let timeout = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
    }
}

impl AsFd for FaultQueueFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl UapiFile for FaultQueueFd {
    /// A fault queue file has no ioctl.
    fn ioctl(&self, _cmd: u32, _arg: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::ENOTTY)
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        rustix::io::read(&self.0, buf).map_err(|e| Errno::new(e.raw_os_error()))
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        rustix::io::write(&self.0, buf).map_err(|e| Errno::new(e.raw_os_error()))
    }

    /// The socket's readiness is the notification: a VMM polls the fd, as it polls a
    /// kernel fault queue file; a notifier is not taken.
    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        if notifier.is_some() {
            tracing::warn!("a served fault queue notifies through its fd's readiness only");
        }
    }
}

impl UapiFile for RemoteFile {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        let served = crate::iommufd::served(cmd).filter(|_| self.kind == FILE_IOMMUFD);
        if let Some(at) = served.and_then(|s| s.fd_out) {
            return self.ioctl_giving_fd(cmd, arg, at);
        }
        let file = served
            .and_then(|s| s.file)
            .and_then(|how| arg.get(how.fd_at..how.fd_at + 4))
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .filter(|&fd| fd >= 0 && rustix::io::fcntl_getfd(borrow(fd)).is_ok());
        // The memory file the argument names goes with the request; a number that is not
        // an open fd sends none, which the host answers with EBADF.
        let fds: Vec<BorrowedFd<'_>> = file.map(borrow).into_iter().collect();
        let reply = self.call(&Request::Ioctl { cmd, arg }, &fds)?;
        // A failed call's argument comes back as the call left it, when the host gives it.
        match (reply.result, reply.data.len() == arg.len()) {
            (Ok(n), true) => {
                arg.copy_from_slice(&reply.data);
                Ok(n as usize)
            }
            (Ok(_), false) => Err(Errno::EIO),
            (Err(e), true) => {
                arg.copy_from_slice(&reply.data);
                Err(e)
            }
            (Err(e), false) => Err(e),
        }
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        let count = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let reply = self.simple(&Request::Read { count }, &[])?;
        let n = reply.data.len();
        if n > buf.len() || reply.result? as usize != n {
            return Err(Errno::EIO);
        }
        buf[..n].copy_from_slice(&reply.data);
        Ok(n)
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        Ok(self.simple(&Request::Write(buf), &[])?.result? as usize)
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        *events = None;
        let result = match notifier {
            None => self.simple(&Request::SetEventfd, &[]).map(|_| ()),
            Some(n) => EventPump::start(n).and_then(|pump| {
                self.simple(&Request::SetEventfd, &[pump.fd.as_fd()])?;
                *events = Some(pump);
                Ok(())
            }),
        };
        if let Err(e) = result {
            tracing::error!("setting the fault notifier on vsva host: {e}");
        }
    }
}

/// An eventfd the host signals and a thread that turns each signal into a notification.
struct EventPump {
    fd: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventPump {
    fn start(notifier: Arc<dyn EventNotifier>) -> Result<EventPump, Errno> {
        use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
        let fd = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| Errno::new(e.raw_os_error()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (pfd, pstop) = (fd.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vsva-fault-events".into())
            .spawn(move || {
                let tick = Timespec {
                    tv_sec: 0,
                    tv_nsec: 20_000_000,
                };
                while !pstop.load(Ordering::Acquire) {
                    let mut fds = [PollFd::new(&*pfd, PollFlags::IN)];
                    if !matches!(rustix::event::poll(&mut fds, Some(&tick)), Ok(n) if n > 0) {
                        continue;
                    }
                    let mut count = [0u8; 8];
                    if rustix::io::read(&*pfd, &mut count) == Ok(8) {
                        for _ in 0..u64::from_ne_bytes(count) {
                            notifier.notify();
                        }
                    }
                }
            })
            .map_err(|_| Errno::ENOMEM)?;
        Ok(EventPump {
            fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A VM's RAM as a VMM shares it with the host: a memfd (sealed against shrinking and
/// growing) mapped into this process through vm-memory at guest address 0.
pub struct SharedRam {
    /// The memory file.
    pub file: File,
    /// The mapping.
    pub mem: Arc<GuestMemoryMmap>,
    /// Its size in bytes.
    pub size: u64,
}

impl SharedRam {
    /// `size` bytes of RAM (a multiple of 4 KiB).
    pub fn new(size: u64) -> Result<SharedRam, ClientError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let err = |e: &dyn std::fmt::Display| ClientError::Memory(e.to_string());
        let fd = rustix::fs::memfd_create(
            "vsva-vm-ram",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| err(&e))?;
        let file = File::from(fd);
        file.set_len(size).map_err(|e| err(&e))?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)
            .map_err(|e| err(&e))?;
        let mapped = file.try_clone().map_err(|e| err(&e))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(mapped, 0)),
        )])
        .map_err(|e| err(&e))?;
        Ok(SharedRam {
            file,
            mem: Arc::new(mem),
            size,
        })
    }

    /// This process's address of the RAM's first byte.
    pub fn addr(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .map_or(0, |p| p as u64)
    }

    /// Shares the RAM with the host through `file`.
    pub fn share(&self, file: &RemoteFile) -> Result<(), Errno> {
        file.add_memory(self.file.as_fd(), self.addr(), self.size)
    }

    /// A type1 VMM's set-up of its container `file`: nested translation
    /// (`VFIO_SET_IOMMU` with the nesting type), this RAM shared (`ADD_MEMORY`) and all of
    /// it mapped readable and writable at IOVA 0 (`VFIO_IOMMU_MAP_DMA`). A refusal names
    /// the step and its errno.
    pub fn nesting_container(&self, file: &RemoteFile) -> Result<(), (&'static str, Errno)> {
        let mut ioctls = file;
        ioctls
            .set_iommu(IommuModel::Type1Nesting)
            .map_err(|e| ("VFIO_SET_IOMMU", e))?;
        self.share(file).map_err(|e| ("ADD_MEMORY", e))?;
        ioctls
            .map_dma(&DmaMap {
                iova: Iova(0),
                vaddr: self.addr(),
                size: self.size,
                read: true,
                write: true,
            })
            .map_err(|e| ("VFIO_IOMMU_MAP_DMA", e))
    }
}
