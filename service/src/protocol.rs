//! The wire protocol between a VMM and `vsva host` (docs/protocol.md is its specification).
//!
//! Every frame is one `SOCK_SEQPACKET` message: a 16-byte little-endian [`Header`] and
//! `len` payload bytes. A request's payload carries the uAPI's own bytes (an ioctl's
//! command and argument, a `read` count, `write` bytes); its reply carries the result or
//! the errno and the bytes the host gives back. File descriptors (the VM's RAM memfd, the
//! fault-queue eventfd) travel as `SCM_RIGHTS` on the frame that names them.

use vsva_hw::dma::descriptor::DESCRIPTOR_SIZE;
use vsva_uapi::error::Errno;

/// The first four bytes of every frame: "VSVA".
pub const MAGIC: u32 = u32::from_le_bytes(*b"VSVA");
/// The protocol version this implementation speaks.
pub const VERSION: u16 = 1;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 16;
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// The largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
/// Requests a client may have sent and not yet seen answered.
pub const MAX_IN_FLIGHT: u32 = 16;
/// The reply bit of [`Header::kind`].
pub const REPLY: u16 = 0x8000;
/// The kind of the reply to a frame whose own kind cannot be answered (unknown kind, or a
/// header that does not decode).
pub const ERROR_REPLY: u16 = 0xFFFF;
/// The errno of the frame a host sends a connection it refuses because it, or the
/// client's process, holds its limit of connections.
pub const CONNECTIONS_FULL: Errno = Errno::new(libc::EUSERS);
/// Bytes of the [`HostState`] a `STATE` reply carries.
pub const HOST_STATE_LEN: usize = 17 * 8;
/// The file kind of a VFIO type1 container (`/dev/vfio/vfio`).
pub const FILE_VFIO_CONTAINER: u32 = 1;
/// The file kind of an iommufd (`/dev/iommu`), with the connection's device bound to it.
pub const FILE_IOMMUFD: u32 = 2;
/// The `HELLO` flag that offers a call ring (the ring file rides as `SCM_RIGHTS`).
pub const HELLO_RING: u32 = 1;
/// The welcome flag that says the host took the call ring: the connection's calls may go
/// through it.
pub const WELCOME_RING: u16 = 1;
/// `DEVICE_RUN` `flags` bit 0: the reply also carries the fault records the container
/// queued, when descriptors wait for a page response (docs/protocol.md, `DEVICE_RUN`).
pub const RUN_TAKE_RECORDS: u32 = 1;
/// The most fault records one `DEVICE_RUN` reply carries.
pub const RUN_RECORDS_MAX: usize = 16;
/// The kind of the doorbell a host sends a client that sleeps for its ring reply
/// ([`Kind::Doorbell`] with [`REPLY`] set); it is not a reply and has no payload.
pub const HOST_DOORBELL: u16 = Kind::Doorbell as u16 | REPLY;

/// The header of every frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The protocol version; [`VERSION`].
    pub version: u16,
    /// What the frame is: a [`Kind`], with [`REPLY`] set on replies.
    pub kind: u16,
    /// The request's id, chosen by the client; its reply carries the same.
    pub id: u32,
    /// Payload bytes after the header.
    pub len: u32,
}

impl Header {
    /// The header's 16 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// A frame that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a header.
    #[error("frame of {0} bytes is shorter than the 16-byte header")]
    Short(usize),
    /// Longer than [`MAX_FRAME`] (the socket truncated it).
    #[error("frame longer than {MAX_FRAME} bytes")]
    Oversized,
    /// The magic is not "VSVA".
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// A version this host does not speak.
    #[error("protocol version {0} is not spoken here (version {VERSION} is)")]
    Version(u16),
    /// `len` disagrees with the bytes that arrived.
    #[error("header says {said} payload bytes, {got} arrived")]
    Length {
        /// The header's `len`.
        said: u32,
        /// Payload bytes received.
        got: usize,
    },
    /// A kind no request has.
    #[error("unknown message kind {0:#06x}")]
    UnknownKind(u16),
    /// The payload's size is wrong for its kind.
    #[error("{kind:?} payload of {len} bytes is malformed")]
    Payload {
        /// The request's kind.
        kind: Kind,
        /// The payload's length.
        len: usize,
    },
}

impl FrameError {
    /// The errno a reply carries for this error.
    pub fn errno(&self) -> Errno {
        match self {
            FrameError::Oversized => Errno::new(libc::EMSGSIZE),
            FrameError::Version(_) => Errno::new(libc::EPROTO),
            FrameError::UnknownKind(_) => Errno::ENOTTY,
            _ => Errno::EINVAL,
        }
    }
}

/// The requests, by [`Header::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Opens the connection's file: versions and the file kind.
    Hello = 1,
    /// `ioctl(fd, cmd, arg)`.
    Ioctl = 2,
    /// `read(fd, buf, count)`.
    Read = 3,
    /// `write(fd, buf, count)`.
    Write = 4,
    /// Shares a memory file (the VM's RAM) mapped at a user address of the client.
    AddMemory = 5,
    /// Sets (with an eventfd) or clears (without) the fault-queue notifier.
    SetEventfd = 6,
    /// What the host holds, host-wide.
    State = 7,
    /// Plugs a passthrough DMA engine into the host for the connection's file.
    DeviceAdd = 8,
    /// Writes a descriptor to the device's portal.
    DeviceWrite = 9,
    /// Lets the device work through what was submitted.
    DeviceRun = 10,
    /// Reads one of the device's 64-bit registers (BAR 0).
    DeviceRegRead = 11,
    /// Writes one of the device's 64-bit registers (BAR 0).
    DeviceRegWrite = 12,
    /// The client posted a request on the call ring while the host slept: look at the
    /// ring. Not answered.
    Doorbell = 13,
}

impl Kind {
    /// The kind of `raw`, a request kind.
    pub fn from_raw(raw: u16) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Hello,
            2 => Kind::Ioctl,
            3 => Kind::Read,
            4 => Kind::Write,
            5 => Kind::AddMemory,
            6 => Kind::SetEventfd,
            7 => Kind::State,
            8 => Kind::DeviceAdd,
            9 => Kind::DeviceWrite,
            10 => Kind::DeviceRun,
            11 => Kind::DeviceRegRead,
            12 => Kind::DeviceRegWrite,
            13 => Kind::Doorbell,
            _ => return None,
        })
    }
}

/// A decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `HELLO`: the versions the client speaks, the file it opens, and whether it offers
    /// a call ring.
    Hello {
        /// Lowest version the client speaks.
        min_version: u16,
        /// Highest version the client speaks.
        max_version: u16,
        /// The file kind ([`FILE_VFIO_CONTAINER`] or [`FILE_IOMMUFD`]).
        file: u32,
        /// A call ring is offered ([`HELLO_RING`]; the ring file rides as `SCM_RIGHTS`).
        ring: bool,
    },
    /// `IOCTL`: the command and the argument bytes.
    Ioctl {
        /// The ioctl number.
        cmd: u32,
        /// The argument (the structure it points to, or an integer's 8 bytes).
        arg: &'a [u8],
    },
    /// `READ` of up to `count` bytes.
    Read {
        /// Bytes asked for.
        count: u32,
    },
    /// `WRITE` of the bytes.
    Write(&'a [u8]),
    /// `ADD_MEMORY`: the memory file (an `SCM_RIGHTS` fd) mapped at `addr` in the client.
    AddMemory {
        /// The client's user address of the file's first byte.
        addr: u64,
        /// Bytes of the file shared.
        size: u64,
    },
    /// `SET_EVENTFD` (the eventfd, if any, rides as `SCM_RIGHTS`).
    SetEventfd,
    /// `STATE`.
    State,
    /// `DEVICE_ADD`.
    DeviceAdd,
    /// `DEVICE_WRITE` of one descriptor at a portal offset.
    DeviceWrite {
        /// Offset in the portal.
        offset: u64,
        /// The descriptor's bytes.
        descriptor: &'a [u8; DESCRIPTOR_SIZE],
    },
    /// `DEVICE_RUN`; with `take_records` ([`RUN_TAKE_RECORDS`]) the reply carries the
    /// fault records queued while descriptors wait.
    DeviceRun {
        /// The payload's `flags` held [`RUN_TAKE_RECORDS`].
        take_records: bool,
    },
    /// `DEVICE_REG_READ` of the register at a BAR 0 offset.
    DeviceRegRead {
        /// Offset of the register.
        offset: u64,
    },
    /// `DEVICE_REG_WRITE` of a value to the register at a BAR 0 offset.
    DeviceRegWrite {
        /// Offset of the register.
        offset: u64,
        /// The value written.
        value: u64,
    },
    /// `DOORBELL`: a request waits on the call ring.
    Doorbell,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes a frame's header, checking it against the bytes that arrived.
pub fn decode_header(frame: &[u8]) -> Result<Header, FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Short(frame.len()));
    }
    if frame.len() > MAX_FRAME {
        return Err(FrameError::Oversized);
    }
    let magic = u32_at(frame, 0);
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let header = Header {
        version: u16_at(frame, 4),
        kind: u16_at(frame, 6),
        id: u32_at(frame, 8),
        len: u32_at(frame, 12),
    };
    if header.version != VERSION {
        return Err(FrameError::Version(header.version));
    }
    let got = frame.len() - HEADER_LEN;
    if header.len as usize != got {
        return Err(FrameError::Length {
            said: header.len,
            got,
        });
    }
    Ok(header)
}

/// Decodes a request frame (header checked, payload sized for its kind).
pub fn decode_request(frame: &[u8]) -> Result<(Header, Request<'_>), FrameError> {
    let header = decode_header(frame)?;
    let kind = Kind::from_raw(header.kind).ok_or(FrameError::UnknownKind(header.kind))?;
    let p = &frame[HEADER_LEN..];
    let bad = || FrameError::Payload { kind, len: p.len() };
    let request = match kind {
        Kind::Hello if p.len() == 8 || (p.len() == 16 && u64_at(p, 8) == u64::from(HELLO_RING)) => {
            Request::Hello {
                min_version: u16_at(p, 0),
                max_version: u16_at(p, 2),
                file: u32_at(p, 4),
                ring: p.len() == 16,
            }
        }
        Kind::Ioctl if p.len() >= 4 => Request::Ioctl {
            cmd: u32_at(p, 0),
            arg: &p[4..],
        },
        Kind::Read if p.len() == 4 => Request::Read {
            count: u32_at(p, 0),
        },
        Kind::Write => Request::Write(p),
        Kind::AddMemory if p.len() == 16 => Request::AddMemory {
            addr: u64_at(p, 0),
            size: u64_at(p, 8),
        },
        Kind::SetEventfd if p.is_empty() => Request::SetEventfd,
        Kind::State if p.is_empty() => Request::State,
        Kind::DeviceAdd if p.is_empty() => Request::DeviceAdd,
        Kind::DeviceWrite if p.len() == 8 + DESCRIPTOR_SIZE => Request::DeviceWrite {
            offset: u64_at(p, 0),
            descriptor: p[8..].try_into().expect("descriptor size"),
        },
        Kind::DeviceRun if p.is_empty() => Request::DeviceRun {
            take_records: false,
        },
        Kind::DeviceRun
            if p.len() == 8 && u32_at(p, 0) == RUN_TAKE_RECORDS && u32_at(p, 4) == 0 =>
        {
            Request::DeviceRun { take_records: true }
        }
        Kind::DeviceRegRead if p.len() == 8 => Request::DeviceRegRead {
            offset: u64_at(p, 0),
        },
        Kind::DeviceRegWrite if p.len() == 16 => Request::DeviceRegWrite {
            offset: u64_at(p, 0),
            value: u64_at(p, 8),
        },
        Kind::Doorbell if p.is_empty() => Request::Doorbell,
        _ => return Err(bad()),
    };
    Ok((header, request))
}

/// Encodes a request frame with id `id`.
pub fn encode_request(id: u32, request: &Request<'_>) -> Vec<u8> {
    let (kind, payload) = match request {
        Request::Hello {
            min_version,
            max_version,
            file,
            ring,
        } => {
            let mut p = Vec::with_capacity(16);
            p.extend_from_slice(&min_version.to_le_bytes());
            p.extend_from_slice(&max_version.to_le_bytes());
            p.extend_from_slice(&file.to_le_bytes());
            if *ring {
                p.extend_from_slice(&HELLO_RING.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
            }
            (Kind::Hello, p)
        }
        Request::Ioctl { cmd, arg } => {
            let mut p = Vec::with_capacity(4 + arg.len());
            p.extend_from_slice(&cmd.to_le_bytes());
            p.extend_from_slice(arg);
            (Kind::Ioctl, p)
        }
        Request::Read { count } => (Kind::Read, count.to_le_bytes().to_vec()),
        Request::Write(bytes) => (Kind::Write, bytes.to_vec()),
        Request::AddMemory { addr, size } => {
            let mut p = addr.to_le_bytes().to_vec();
            p.extend_from_slice(&size.to_le_bytes());
            (Kind::AddMemory, p)
        }
        Request::SetEventfd => (Kind::SetEventfd, Vec::new()),
        Request::State => (Kind::State, Vec::new()),
        Request::DeviceAdd => (Kind::DeviceAdd, Vec::new()),
        Request::DeviceWrite { offset, descriptor } => {
            let mut p = offset.to_le_bytes().to_vec();
            p.extend_from_slice(&descriptor[..]);
            (Kind::DeviceWrite, p)
        }
        Request::DeviceRun { take_records } => match take_records {
            false => (Kind::DeviceRun, Vec::new()),
            true => (
                Kind::DeviceRun,
                [RUN_TAKE_RECORDS, 0].map(u32::to_le_bytes).concat(),
            ),
        },
        Request::DeviceRegRead { offset } => (Kind::DeviceRegRead, offset.to_le_bytes().to_vec()),
        Request::DeviceRegWrite { offset, value } => {
            let mut p = offset.to_le_bytes().to_vec();
            p.extend_from_slice(&value.to_le_bytes());
            (Kind::DeviceRegWrite, p)
        }
        Request::Doorbell => (Kind::Doorbell, Vec::new()),
    };
    frame(kind as u16, id, &payload)
}

/// The doorbell a host sends a client ([`HOST_DOORBELL`], id 0, no payload).
pub fn host_doorbell() -> Vec<u8> {
    frame(HOST_DOORBELL, 0, &[])
}

/// Whether `frame` is a host's doorbell.
pub fn is_host_doorbell(frame: &[u8]) -> bool {
    decode_header(frame).is_ok_and(|h| h.kind == HOST_DOORBELL && h.len == 0)
}

fn frame(kind: u16, id: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        version: VERSION,
        kind,
        id,
        len: payload.len() as u32,
    };
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&header.to_bytes());
    f.extend_from_slice(payload);
    f
}

/// A reply: the result (a non-negative value, or an errno) and the bytes given back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's kind, or [`ERROR_REPLY`] (without [`REPLY`] added).
    pub kind: u16,
    /// The request's id.
    pub id: u32,
    /// The call's result or its errno.
    pub result: Result<u64, Errno>,
    /// The bytes given back (an ioctl's argument after the call, the bytes read, ...).
    pub data: Vec<u8>,
}

impl Reply {
    /// The reply frame: the header (kind with [`REPLY`] set), an i64 result (negative:
    /// minus the errno), then the data.
    pub fn encode(&self) -> Vec<u8> {
        let result: i64 = match self.result {
            Ok(v) => v.min(i64::MAX as u64) as i64,
            Err(e) => -i64::from(e.raw()),
        };
        let mut p = Vec::with_capacity(8 + self.data.len());
        p.extend_from_slice(&result.to_le_bytes());
        p.extend_from_slice(&self.data);
        frame(self.kind | REPLY, self.id, &p)
    }

    /// Decodes a reply frame.
    pub fn decode(bytes: &[u8]) -> Result<Reply, FrameError> {
        let header = decode_header(bytes)?;
        let p = &bytes[HEADER_LEN..];
        if header.kind & REPLY == 0 {
            return Err(FrameError::UnknownKind(header.kind));
        }
        if p.len() < 8 {
            return Err(FrameError::Length {
                said: header.len,
                got: p.len(),
            });
        }
        let raw = i64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        let result = if raw < 0 {
            Err(Errno::new(raw.saturating_neg().min(i32::MAX as i64) as i32))
        } else {
            Ok(raw as u64)
        };
        Ok(Reply {
            kind: match header.kind {
                ERROR_REPLY => ERROR_REPLY,
                k => k & !REPLY,
            },
            id: header.id,
            result,
            data: p[8..].to_vec(),
        })
    }
}

/// What a `HELLO` reply's data says: the version chosen and the connection's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The version the connection speaks.
    pub version: u16,
    /// [`WELCOME_RING`] when the host took the call ring `HELLO` offered.
    pub flags: u16,
    /// The largest payload the host accepts.
    pub max_payload: u32,
    /// Requests the client may have unanswered.
    pub max_in_flight: u32,
    /// Memory files the connection may share.
    pub max_windows: u32,
    /// Bytes of memory the connection may share in all.
    pub max_window_bytes: u64,
}

impl Welcome {
    /// Bytes of the encoding.
    pub const LEN: usize = 24;

    /// The 24 bytes: u16 version, u16 flags, u32 max_payload, u32 max_in_flight,
    /// u32 max_windows, u64 max_window_bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.max_payload.to_le_bytes());
        b.extend_from_slice(&self.max_in_flight.to_le_bytes());
        b.extend_from_slice(&self.max_windows.to_le_bytes());
        b.extend_from_slice(&self.max_window_bytes.to_le_bytes());
        b
    }

    /// Decodes the 24 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Welcome> {
        (b.len() == Self::LEN).then(|| Welcome {
            version: u16_at(b, 0),
            flags: u16_at(b, 2),
            max_payload: u32_at(b, 4),
            max_in_flight: u32_at(b, 8),
            max_windows: u32_at(b, 12),
            max_window_bytes: u64_at(b, 16),
        })
    }
}

/// What the host holds, host-wide (a `STATE` reply's data): what a leak check compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// Connections open now.
    pub connections: u64,
    /// Host memory allocated (tables, queues, shared windows).
    pub allocated_bytes: u64,
    /// Memory files shared by connections.
    pub windows: u64,
    /// Bytes of those files.
    pub window_bytes: u64,
    /// PASIDs allocated.
    pub pasids: u64,
    /// Domain ids in use by the host driver.
    pub domain_ids: u64,
    /// Devices attached to a domain.
    pub devices: u64,
    /// Page request routes of the host driver.
    pub page_request_routes: u64,
    /// Page request sinks (fault queues) registered with the host driver.
    pub page_request_sinks: u64,
    /// IOTLB entries of the physical IOMMU.
    pub iotlb: u64,
    /// Context-cache entries of the physical IOMMU.
    pub context_cache: u64,
    /// PASID-cache entries of the physical IOMMU.
    pub pasid_cache: u64,
    /// DMA mappings (`VFIO_IOMMU_MAP_DMA`) the open files hold.
    pub dma_mappings: u64,
    /// PASIDs bound (`VFIO_IOMMU_BIND`) in the open files.
    pub binds: u64,
    /// Page request groups waiting for a page response, in the open files.
    pub page_requests: u64,
    /// Fault records (page requests, unrecoverable faults) queued and not read yet.
    pub faults_unread: u64,
    /// Strict-mode violations found since the host started (`vsva host --strict`): each
    /// a cached translation used after the tables changed without the invalidation that
    /// would have removed it. A count, not a holding: it never goes down.
    pub strict_violations: u64,
}

impl HostState {
    fn fields(&self) -> [u64; 17] {
        [
            self.connections,
            self.allocated_bytes,
            self.windows,
            self.window_bytes,
            self.pasids,
            self.domain_ids,
            self.devices,
            self.page_request_routes,
            self.page_request_sinks,
            self.iotlb,
            self.context_cache,
            self.pasid_cache,
            self.dma_mappings,
            self.binds,
            self.page_requests,
            self.faults_unread,
            self.strict_violations,
        ]
    }

    /// Whether `self` holds what `other` does: every field but `strict_violations`.
    pub fn holds_as(&self, other: &HostState) -> bool {
        self.fields()[..16] == other.fields()[..16]
    }

    /// The seventeen u64 fields in declaration order.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.fields().iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// Decodes the seventeen fields.
    pub fn from_bytes(b: &[u8]) -> Option<HostState> {
        if b.len() != HOST_STATE_LEN {
            return None;
        }
        let f = |i: usize| u64_at(b, 8 * i);
        Some(HostState {
            connections: f(0),
            allocated_bytes: f(1),
            windows: f(2),
            window_bytes: f(3),
            pasids: f(4),
            domain_ids: f(5),
            devices: f(6),
            page_request_routes: f(7),
            page_request_sinks: f(8),
            iotlb: f(9),
            context_cache: f(10),
            pasid_cache: f(11),
            dma_mappings: f(12),
            binds: f(13),
            page_requests: f(14),
            faults_unread: f(15),
            strict_violations: f(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let arg = [1u8, 2, 3, 4, 5];
        let requests = [
            Request::Hello {
                min_version: 1,
                max_version: 1,
                file: FILE_VFIO_CONTAINER,
                ring: false,
            },
            Request::Hello {
                min_version: 1,
                max_version: 1,
                file: FILE_IOMMUFD,
                ring: true,
            },
            Request::Ioctl {
                cmd: 0x3b71,
                arg: &arg,
            },
            Request::Ioctl { cmd: 7, arg: &[] },
            Request::Read { count: 4096 },
            Request::Write(&arg),
            Request::AddMemory {
                addr: 0x7f00_0000_0000,
                size: 2 << 20,
            },
            Request::SetEventfd,
            Request::State,
            Request::DeviceAdd,
            Request::DeviceWrite {
                offset: 64,
                descriptor: &[7; DESCRIPTOR_SIZE],
            },
            Request::DeviceRun {
                take_records: false,
            },
            Request::DeviceRun { take_records: true },
            Request::DeviceRegRead { offset: 0x20 },
            Request::DeviceRegWrite {
                offset: 0x20,
                value: 3,
            },
            Request::Doorbell,
        ];
        for (i, r) in requests.iter().enumerate() {
            let f = encode_request(i as u32, r);
            let (h, d) = decode_request(&f).unwrap();
            assert_eq!(h.id, i as u32);
            assert_eq!(&d, r);
        }
    }

    #[test]
    fn bad_frames_say_what_is_wrong() {
        let good = encode_request(9, &Request::Read { count: 8 });
        assert_eq!(decode_request(&good[..15]), Err(FrameError::Short(15)));
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(matches!(decode_request(&magic), Err(FrameError::Magic(_))));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(decode_request(&version), Err(FrameError::Version(2)));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            decode_request(&long),
            Err(FrameError::Length { said: 4, got: 5 })
        );
        let mut kind = good.clone();
        kind[6] = 0x42;
        assert_eq!(decode_request(&kind), Err(FrameError::UnknownKind(0x42)));
        let short_read = frame(Kind::Read as u16, 1, &[0, 0]);
        assert_eq!(
            decode_request(&short_read),
            Err(FrameError::Payload {
                kind: Kind::Read,
                len: 2
            })
        );
        let stateful = frame(Kind::State as u16, 1, &[0]);
        assert!(decode_request(&stateful).is_err());
        // `DEVICE_RUN` takes no payload or exactly `flags` = 1 and a zero word.
        for payload in [
            &[0u8; 4][..],
            &[0; 8],
            &[2, 0, 0, 0, 0, 0, 0, 0],
            &[3, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 1, 0, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            assert_eq!(
                decode_request(&frame(Kind::DeviceRun as u16, 1, payload)),
                Err(FrameError::Payload {
                    kind: Kind::DeviceRun,
                    len: payload.len()
                }),
                "{payload:?}"
            );
        }
        assert_eq!(
            decode_request(&vec![0; MAX_FRAME + 1]),
            Err(FrameError::Oversized)
        );
        assert_eq!(FrameError::Oversized.errno().raw(), libc::EMSGSIZE);
        assert_eq!(FrameError::UnknownKind(3).errno(), Errno::ENOTTY);
    }

    #[test]
    fn replies_round_trip_results_and_errnos() {
        for result in [Ok(0), Ok(1 << 40), Err(Errno::EPERM), Err(Errno::ENOSPC)] {
            let r = Reply {
                kind: Kind::Ioctl as u16,
                id: 77,
                result,
                data: vec![9; 12],
            };
            let f = r.encode();
            assert_eq!(u16_at(&f, 6), Kind::Ioctl as u16 | REPLY);
            assert_eq!(Reply::decode(&f).unwrap(), r);
        }
        assert!(Reply::decode(&encode_request(1, &Request::State)).is_err());
        let error = Reply {
            kind: ERROR_REPLY,
            id: 0,
            result: Err(Errno::ENOTTY),
            data: Vec::new(),
        };
        assert_eq!(Reply::decode(&error.encode()).unwrap(), error);
    }

    #[test]
    fn welcome_and_state_round_trip() {
        let w = Welcome {
            version: 1,
            flags: WELCOME_RING,
            max_payload: MAX_PAYLOAD as u32,
            max_in_flight: 16,
            max_windows: 4,
            max_window_bytes: 1 << 30,
        };
        assert_eq!(Welcome::from_bytes(&w.to_bytes()), Some(w));
        let s = HostState {
            connections: 1,
            pasid_cache: 12,
            iotlb: 3,
            strict_violations: 2,
            ..HostState::default()
        };
        assert_eq!(HostState::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(s.to_bytes()[16 * 8..], 2u64.to_le_bytes());
        assert_eq!(HostState::from_bytes(&[0; HOST_STATE_LEN - 1]), None);
        // Holding the same is every field but the violations.
        let clean = HostState {
            strict_violations: 0,
            ..s
        };
        assert!(s.holds_as(&clean) && s != clean);
        assert!(!s.holds_as(&HostState { iotlb: 4, ..s }));
    }

    proptest! {
        /// Any bytes decode to a request or an error, and never panic; what decodes
        /// re-encodes to the same frame.
        #[test]
        fn random_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok((h, r)) = decode_request(&bytes) {
                prop_assert_eq!(encode_request(h.id, &r), bytes);
            }
        }

        /// A valid header with a random kind and payload decodes or fails cleanly.
        #[test]
        fn random_payloads_after_a_good_header(kind in 0u16..15, payload in proptest::collection::vec(any::<u8>(), 0..40)) {
            let f = frame(kind, 5, &payload);
            if let Ok((h, r)) = decode_request(&f) {
                prop_assert_eq!(h.kind, kind);
                prop_assert_eq!(encode_request(5, &r), f);
            }
        }
    }
}
