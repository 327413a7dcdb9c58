//! The shared-memory call ring (docs/protocol.md, "The call ring"): a memfd a client
//! offers with `HELLO`, holding one request slot and one reply slot, so that a call is two
//! copies in shared memory instead of a `sendmsg` and a `recvmsg` each way, and a side that
//! waits for the other spins (bounded) instead of sleeping while the other is running.
//!
//! The client owns the request slot and the words `req_seq`, `req_len` and
//! `client_waiting`; the host owns the reply slot and `resp_seq`, `resp_len` and
//! `host_sleeping`. A side never trusts what the other wrote: lengths and sequence
//! numbers are checked, and a frame is copied out of the ring once, then decoded from the
//! copy. Lost wake-ups are ruled out by the store, fence, load order on both sides (a
//! side that is about to sleep publishes it, fences, and looks once more; the other
//! publishes its frame, fences, and reads whether the first sleeps): at least one of the
//! two sees the other's store.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::fs::SealFlags;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

/// Bytes of a ring file.
pub const RING_BYTES: usize = 16 << 10;
/// `req_seq`: the number of the request in the request slot (client, u32).
pub const REQ_SEQ: usize = 0x00;
/// `req_len`: the bytes of that request frame (client, u32).
pub const REQ_LEN: usize = 0x04;
/// `host_sleeping`: 1 while the host's thread sleeps on the socket, 0 while it runs
/// (host, u32).
pub const HOST_SLEEPING: usize = 0x40;
/// `resp_seq`: the number of the request the reply slot answers (host, u32).
pub const RESP_SEQ: usize = 0x80;
/// `resp_len`: the bytes of that reply frame (host, u32).
pub const RESP_LEN: usize = 0x84;
/// `client_waiting`: 1 while the client sleeps on the socket for its reply (client, u32).
pub const CLIENT_WAITING: usize = 0xC0;
/// Offset of the request slot.
pub const REQUEST_AT: usize = 0x1000;
/// The largest request frame the ring carries.
pub const REQUEST_MAX: usize = 0x1000;
/// Offset of the reply slot.
pub const REPLY_AT: usize = 0x2000;
/// The largest reply frame the ring carries.
pub const REPLY_MAX: usize = 0x2000;

/// How long the host's connection thread spins on the ring for the next request after
/// each reply, and how long a client spins for its reply, before sleeping on the socket:
/// longer than an idle vCPU's wake-up on the machine the project is measured on (~24 µs,
/// docs/performance-history.md), so a side that would wake the other finds it still spinning.
pub const SPIN: Duration = Duration::from_micros(50);

/// Longest run of waits a [`Spinner`] makes without spinning after its spins came up
/// empty on a busy machine (a power of two).
const MAX_BACKOFF: u32 = 64;

/// How long a reading of the machine's runnable threads stands before it is read again
/// (per process).
const LOAD_FRESH: Duration = Duration::from_millis(1);

/// A broken ring: the peer wrote what the protocol does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The ring file is not a sealable memfd of [`RING_BYTES`] bytes.
    #[error("the ring file is not a memfd of {RING_BYTES} bytes sealed against resizing")]
    File,
    /// A sequence number that is not the next one.
    #[error("ring sequence {got} where {want} (or no change) was due")]
    Sequence {
        /// The number due.
        want: u32,
        /// The number found.
        got: u32,
    },
    /// A length that does not fit its slot.
    #[error("ring frame of {0} bytes does not fit its slot")]
    Length(u32),
}

/// A mapped ring file.
pub struct Ring {
    region: MmapRegion<()>,
    /// Kept open as long as the mapping; the file is what the peer maps too.
    file: File,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// A new, zeroed ring file, sealed against resizing, and its mapping (the client's
    /// side).
    pub fn create() -> std::io::Result<Ring> {
        use rustix::fs::MemfdFlags;
        let fd = rustix::fs::memfd_create(
            "vsva-call-ring",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(RING_BYTES as u64)?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)?;
        Self::map(file)
    }

    /// Maps a ring file a client sent (the host's side): it must be a memfd of exactly
    /// [`RING_BYTES`] bytes that is, or can be, sealed against shrinking and growing, so
    /// that the client cannot take the mapped pages away under the host.
    pub fn adopt(fd: OwnedFd) -> Result<Ring, RingError> {
        // A file that is already sealed shut keeps the seals it has; checked below.
        let _ = rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW);
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|_| RingError::File)?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(RingError::File);
        }
        let stat = rustix::fs::fstat(&fd).map_err(|_| RingError::File)?;
        if stat.st_size != RING_BYTES as i64 {
            return Err(RingError::File);
        }
        Self::map(File::from(fd)).map_err(|_| RingError::File)
    }

    fn map(file: File) -> std::io::Result<Ring> {
        let mapped = file.try_clone()?;
        let region = MmapRegion::from_file(FileOffset::new(mapped, 0), RING_BYTES)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Ring { region, file })
    }

    /// The ring file, to send to the host.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        self.region
            .get_atomic_ref::<AtomicU32>(at)
            .expect("ring words lie in the mapping, aligned")
    }

    /// Copies `frame` into the slot at `at` (the caller checked it fits).
    fn put(&self, at: usize, frame: &[u8]) {
        self.region
            .get_slice(at, frame.len())
            .expect("a checked frame fits its slot")
            .copy_from(frame);
    }

    /// Copies `len` bytes out of the slot at `at` (the caller checked it fits).
    fn get(&self, at: usize, len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; len];
        self.region
            .get_slice(at, len)
            .expect("a checked frame fits its slot")
            .copy_to(&mut frame);
        frame
    }
}

/// Spins until `ready` gives something or `budget` has passed, with `spin_loop` hints.
/// The core is not yielded: on a machine with more runnable threads than cores a yield
/// can hand it to another process for a whole time slice (milliseconds), far longer than
/// the sleep and wake-up the spin tries to spare.
pub fn spin<T>(budget: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(t) = ready() {
            return Some(t);
        }
        if start.elapsed() >= budget {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// Whether `loadavg` (the text of `/proc/loadavg`) counts more runnable threads than
/// `cores`: its fourth field is `running/total`, the threads running or ready to run
/// right now, the reader included. `None` when the text does not say.
fn runnable_beyond(loadavg: &str, cores: usize) -> Option<bool> {
    let field = loadavg.split_ascii_whitespace().nth(3)?;
    let (running, _) = field.split_once('/')?;
    Some(running.parse::<usize>().ok()? > cores)
}

/// Live [`SpinRegardlessOfLoad`] guards of the process.
static SPIN_REGARDLESS: AtomicUsize = AtomicUsize::new(0);

/// While a guard is alive, [`oversubscribed`] answers no, so every [`Spinner`] of the
/// process spins its whole budget whatever the machine's load. For measuring the spinning
/// path alone (`vsva bench`'s socket probe, whose host is a thread of the same process):
/// the adaptive answer lets the load of the moment choose, call by call, whether both
/// sides spin or sleep, so a figure would be whichever mix of the two that moment chose.
#[derive(Debug)]
#[must_use = "the spinning lasts while the guard is alive"]
pub struct SpinRegardlessOfLoad(());

impl SpinRegardlessOfLoad {
    /// Spins regardless of load until the guard is dropped.
    pub fn begin() -> SpinRegardlessOfLoad {
        SPIN_REGARDLESS.fetch_add(1, Ordering::AcqRel);
        SpinRegardlessOfLoad(())
    }
}

impl Drop for SpinRegardlessOfLoad {
    fn drop(&mut self) {
        SPIN_REGARDLESS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the machine now has more runnable threads than cores this process may use,
/// so that a thread that spins may be holding the core its peer waits for. Read from
/// `/proc/loadavg` at most once per `LOAD_FRESH` per process (a stale answer is used
/// meanwhile); `true` when it cannot be read, the cautious answer; `false` while a
/// [`SpinRegardlessOfLoad`] is alive.
pub fn oversubscribed() -> bool {
    if SPIN_REGARDLESS.load(Ordering::Acquire) > 0 {
        return false;
    }
    static EPOCH: OnceLock<(Instant, usize)> = OnceLock::new();
    /// Nanoseconds after the epoch of the last reading, plus one (0: never read).
    static READ_AT: AtomicU64 = AtomicU64::new(0);
    static BUSY: AtomicBool = AtomicBool::new(true);
    let (epoch, cores) = *EPOCH.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (Instant::now(), cores)
    });
    let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
    let last = READ_AT.load(Ordering::Acquire);
    let fresh = u64::try_from(LOAD_FRESH.as_nanos()).expect("a millisecond fits");
    // One thread reads; the others keep the last answer until it has.
    if (last == 0 || now.saturating_sub(last) >= fresh)
        && READ_AT
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        let busy = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| runnable_beyond(&text, cores))
            .unwrap_or(true);
        BUSY.store(busy, Ordering::Release);
        return busy;
    }
    BUSY.load(Ordering::Acquire)
}

/// Bounded spins that spin only while they can pay off. A wait spins only when every
/// runnable thread of the machine has a core ([`oversubscribed`] says no), so the peer
/// it waits for is running, and can answer, while it spins. A spin that comes up empty
/// on such a machine changes nothing (the peer was busy with other work, and the spin
/// took a core nobody wanted); one that comes up empty on a busy machine makes the next
/// waits look once and sleep at once, 1, 2, 4, ... up to `MAX_BACKOFF` of them after
/// each further empty spin, and a spin that finds what it waits for ends the back-off.
#[derive(Debug)]
pub struct Spinner {
    budget: Duration,
    /// Waits left that do not spin.
    skip: u32,
    /// How many waits the next empty spin on a busy machine skips.
    backoff: u32,
    /// Whether the machine has more runnable threads than cores ([`oversubscribed`]).
    busy: fn() -> bool,
}

impl Spinner {
    /// A spinner with `budget` per spin (zero never spins).
    pub fn new(budget: Duration) -> Spinner {
        Spinner {
            budget,
            skip: 0,
            backoff: 1,
            busy: oversubscribed,
        }
    }

    /// [`spin`] for `ready`, or one look when spinning cannot pay off now.
    pub fn wait<T>(&mut self, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
        if self.budget.is_zero() || self.skip > 0 || (self.busy)() {
            self.skip = self.skip.saturating_sub(1);
            return ready();
        }
        match spin(self.budget, ready) {
            Some(t) => {
                self.backoff = 1;
                Some(t)
            }
            None => {
                if (self.busy)() {
                    self.skip = self.backoff;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
                None
            }
        }
    }
}

/// The client's side of a ring.
#[derive(Debug)]
pub struct ClientRing {
    ring: Ring,
    /// The number of the last request posted.
    seq: u32,
}

impl ClientRing {
    /// A new ring.
    pub fn new() -> std::io::Result<ClientRing> {
        Ok(ClientRing {
            ring: Ring::create()?,
            seq: 0,
        })
    }

    /// The ring file, to send with `HELLO`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.fd()
    }

    /// Posts `frame` (at most [`REQUEST_MAX`] bytes) as the next request; whether the
    /// host sleeps and needs a doorbell to see it.
    pub fn post(&mut self, frame: &[u8]) -> bool {
        assert!(frame.len() <= REQUEST_MAX, "the caller checks the size");
        self.seq = self.seq.wrapping_add(1);
        self.ring.put(REQUEST_AT, frame);
        self.ring
            .word(REQ_LEN)
            .store(frame.len() as u32, Ordering::Relaxed);
        self.ring.word(REQ_SEQ).store(self.seq, Ordering::Release);
        fence(Ordering::SeqCst);
        self.ring.word(HOST_SLEEPING).load(Ordering::Relaxed) != 0
    }

    /// The reply to the last request posted, if the host has written it.
    pub fn reply(&self) -> Option<Result<Vec<u8>, RingError>> {
        let got = self.ring.word(RESP_SEQ).load(Ordering::Acquire);
        if got != self.seq {
            return Some(Err(RingError::Sequence {
                want: self.seq,
                got,
            }))
            .filter(|_| got != self.seq.wrapping_sub(1));
        }
        let len = self.ring.word(RESP_LEN).load(Ordering::Relaxed);
        if len as usize > REPLY_MAX {
            return Some(Err(RingError::Length(len)));
        }
        Some(Ok(self.ring.get(REPLY_AT, len as usize)))
    }

    /// Publishes that the client sleeps on the socket for its reply (`true`) or runs
    /// (`false`); after publishing a sleep the caller looks for the reply once more.
    pub fn set_waiting(&self, waiting: bool) {
        self.ring
            .word(CLIENT_WAITING)
            .store(u32::from(waiting), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}

/// The host's side of a ring.
#[derive(Debug)]
pub struct HostRing {
    ring: Ring,
    /// The number of the last request taken.
    seq: u32,
}

impl HostRing {
    /// The ring a client sent.
    pub fn new(ring: Ring) -> HostRing {
        HostRing { ring, seq: 0 }
    }

    /// The next request, if the client posted one: its frame, copied out of the ring.
    /// A number other than the last one or the next, or a length beyond the slot, is an
    /// error (the connection is to be closed).
    pub fn take(&mut self) -> Result<Option<Vec<u8>>, RingError> {
        let got = self.ring.word(REQ_SEQ).load(Ordering::Acquire);
        if got == self.seq {
            return Ok(None);
        }
        let want = self.seq.wrapping_add(1);
        if got != want {
            return Err(RingError::Sequence { want, got });
        }
        let len = self.ring.word(REQ_LEN).load(Ordering::Relaxed);
        if len as usize > REQUEST_MAX {
            return Err(RingError::Length(len));
        }
        self.seq = want;
        Ok(Some(self.ring.get(REQUEST_AT, len as usize)))
    }

    /// Writes `frame` as the reply to the request taken last; whether the client sleeps
    /// and needs a doorbell to see it. A frame larger than [`REPLY_MAX`] is refused
    /// unwritten.
    pub fn answer(&self, frame: &[u8]) -> Result<bool, RingError> {
        if frame.len() > REPLY_MAX {
            return Err(RingError::Length(frame.len() as u32));
        }
        self.ring.put(REPLY_AT, frame);
        self.ring
            .word(RESP_LEN)
            .store(frame.len() as u32, Ordering::Relaxed);
        self.ring.word(RESP_SEQ).store(self.seq, Ordering::Release);
        fence(Ordering::SeqCst);
        Ok(self.ring.word(CLIENT_WAITING).load(Ordering::Relaxed) != 0)
    }

    /// Publishes that the host's thread sleeps on the socket (`true`) or runs (`false`);
    /// after publishing a sleep the caller takes once more before it sleeps.
    pub fn set_sleeping(&self, sleeping: bool) {
        self.ring
            .word(HOST_SLEEPING)
            .store(u32::from(sleeping), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Writes `value` at `at` of the control page, as a client (for tests that play a
    /// lying client against the host).
    #[cfg(test)]
    fn poke(&self, at: usize, value: u32) {
        self.ring.word(at).store(value, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client ring and the host's mapping of the same file.
    fn pair() -> (ClientRing, HostRing) {
        let client = ClientRing::new().unwrap();
        let fd = client.fd().try_clone_to_owned().unwrap();
        let host = HostRing::new(Ring::adopt(fd).unwrap());
        (client, host)
    }

    #[test]
    fn requests_and_replies_pass_in_order_with_doorbells_only_for_sleepers() {
        let (mut client, mut host) = pair();
        assert_eq!(host.take(), Ok(None));
        for i in 1..=5u8 {
            host.set_sleeping(i % 2 == 0);
            let doorbell = client.post(&vec![i; usize::from(i) * 100]);
            assert_eq!(doorbell, i % 2 == 0);
            assert!(client.reply().is_none(), "no reply before the host answers");
            assert_eq!(host.take(), Ok(Some(vec![i; usize::from(i) * 100])));
            assert_eq!(host.take(), Ok(None), "a request is taken once");
            client.set_waiting(i % 3 == 0);
            assert_eq!(host.answer(&[i; 7]), Ok(i % 3 == 0));
            assert_eq!(client.reply(), Some(Ok(vec![i; 7])));
        }
        assert_eq!(
            host.answer(&vec![0; REPLY_MAX + 1]),
            Err(RingError::Length(REPLY_MAX as u32 + 1))
        );
        assert_eq!(
            client.reply(),
            Some(Ok(vec![5; 7])),
            "a refused reply is unwritten"
        );
    }

    #[test]
    fn a_lying_client_is_caught_by_sequence_and_length() {
        let (mut client, mut host) = pair();
        client.post(b"one");
        assert_eq!(host.take(), Ok(Some(b"one".to_vec())));
        // A number that skips one.
        host.poke(REQ_SEQ, 3);
        assert_eq!(host.take(), Err(RingError::Sequence { want: 2, got: 3 }));
        // A length beyond the slot.
        host.poke(REQ_SEQ, 2);
        host.poke(REQ_LEN, REQUEST_MAX as u32 + 1);
        assert_eq!(host.take(), Err(RingError::Length(REQUEST_MAX as u32 + 1)));
        host.poke(REQ_LEN, u32::MAX);
        assert_eq!(host.take(), Err(RingError::Length(u32::MAX)));
        // Nothing was taken by the refusals: the next honest request is number 2.
        host.poke(REQ_LEN, 2);
        assert_eq!(host.take(), Ok(Some(client.ring.get(REQUEST_AT, 2))));
    }

    #[test]
    fn a_host_reply_out_of_turn_or_too_long_is_an_error() {
        let (mut client, host) = pair();
        client.post(b"x");
        // The host answers without taking: the reply names request 0, the last one.
        host.answer(b"early").unwrap();
        assert!(client.reply().is_none());
        host.ring.word(RESP_SEQ).store(7, Ordering::Release);
        assert_eq!(
            client.reply(),
            Some(Err(RingError::Sequence { want: 1, got: 7 }))
        );
        host.ring.word(RESP_SEQ).store(1, Ordering::Release);
        host.ring
            .word(RESP_LEN)
            .store(REPLY_MAX as u32 + 8, Ordering::Release);
        assert_eq!(
            client.reply(),
            Some(Err(RingError::Length(REPLY_MAX as u32 + 8)))
        );
    }

    #[test]
    fn only_a_memfd_of_the_ring_size_sealed_against_resizing_is_adopted() {
        use rustix::fs::MemfdFlags;
        let memfd = |size: u64, seals: SealFlags, sealable: bool| {
            let flags = if sealable {
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING
            } else {
                MemfdFlags::CLOEXEC
            };
            let fd = rustix::fs::memfd_create("t", flags).unwrap();
            rustix::fs::ftruncate(&fd, size).unwrap();
            if !seals.is_empty() {
                rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
            }
            fd
        };
        let n = RING_BYTES as u64;
        assert!(Ring::adopt(memfd(n, SealFlags::empty(), true)).is_ok());
        assert!(Ring::adopt(memfd(n, SealFlags::SHRINK | SealFlags::GROW, true)).is_ok());
        for bad in [
            memfd(n - 4096, SealFlags::empty(), true),
            memfd(n + 4096, SealFlags::empty(), true),
            memfd(0, SealFlags::empty(), true),
            memfd(n, SealFlags::empty(), false),
            memfd(n, SealFlags::SEAL, true),
        ] {
            assert_eq!(Ring::adopt(bad).unwrap_err(), RingError::File);
        }
        // Not a memfd at all: a socket.
        let (a, _b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert_eq!(Ring::adopt(a).unwrap_err(), RingError::File);
        // Once adopted, the client cannot shrink it away under the host.
        let fd = memfd(n, SealFlags::empty(), true);
        let keep = fd.try_clone().unwrap();
        let _ring = Ring::adopt(fd).unwrap();
        assert!(rustix::fs::ftruncate(&keep, 0).is_err());
    }

    thread_local! {
        /// The answers [`scripted`] gives, in order.
        static SCRIPT: std::cell::RefCell<std::collections::VecDeque<bool>> =
            std::cell::RefCell::default();
    }

    /// A machine-load probe that gives the answers the test scripted, and fails the test
    /// when asked once more than scripted.
    fn scripted() -> bool {
        SCRIPT
            .with(|s| s.borrow_mut().pop_front())
            .expect("a probe the test did not script")
    }

    fn script(answers: &[bool]) {
        SCRIPT.with(|s| s.borrow_mut().extend(answers));
    }

    #[test]
    fn empty_spins_on_a_busy_machine_back_off_and_a_find_resets_them() {
        let mut spinner = Spinner {
            busy: scripted,
            ..Spinner::new(Duration::from_micros(1))
        };
        // Each spin starts on an idle machine and comes up empty on a busy one.
        let mut spun = Vec::new();
        for _ in 0..12 {
            let skipping = spinner.skip > 0;
            if !skipping {
                script(&[false, true]);
            }
            assert_eq!(spinner.wait(|| None::<()>), None);
            spun.push(!skipping);
        }
        let at: Vec<usize> = (0..12).filter(|&i| spun[i]).collect();
        assert_eq!(at, [0, 2, 5, 10]);
        assert_eq!(spinner.backoff, 16);
        // A skipped wait still takes what is there.
        assert_eq!(spinner.wait(|| Some(1)), Some(1));
        while spinner.skip > 0 {
            spinner.wait(|| None::<()>);
        }
        script(&[false]);
        assert_eq!(spinner.wait(|| Some(2)), Some(2));
        assert_eq!((spinner.skip, spinner.backoff), (0, 1));
        for _ in 0..(MAX_BACKOFF as usize * 3) {
            if spinner.skip == 0 {
                script(&[false, true]);
            }
            spinner.wait(|| None::<()>);
            assert!(spinner.backoff <= MAX_BACKOFF && spinner.skip <= MAX_BACKOFF);
        }
        assert_eq!(spinner.backoff, MAX_BACKOFF);
        assert_eq!(
            SCRIPT.with(|s| s.borrow().len()),
            0,
            "every answer was asked for"
        );
        let mut never = Spinner {
            busy: scripted,
            ..Spinner::new(Duration::ZERO)
        };
        let mut looks = 0;
        assert_eq!(
            never.wait(|| {
                looks += 1;
                None::<()>
            }),
            None
        );
        assert_eq!((looks, never.skip, never.backoff), (1, 0, 1));
    }

    #[test]
    fn empty_spins_on_an_idle_machine_skip_no_later_spin() {
        let mut spinner = Spinner {
            busy: || false,
            ..Spinner::new(Duration::from_micros(1))
        };
        for _ in 0..10 {
            assert_eq!(spinner.wait(|| None::<()>), None);
            assert_eq!((spinner.skip, spinner.backoff), (0, 1));
        }
        assert_eq!(spinner.wait(|| Some(7)), Some(7));
    }

    #[test]
    fn on_a_busy_machine_a_wait_looks_once_and_does_not_spin() {
        // A budget no test could sit out: a wait that spun would look far more than once.
        let mut spinner = Spinner {
            busy: || true,
            ..Spinner::new(Duration::from_secs(3600))
        };
        for _ in 0..5 {
            let mut looks = 0;
            assert_eq!(
                spinner.wait(|| {
                    looks += 1;
                    None::<()>
                }),
                None
            );
            assert_eq!(looks, 1);
        }
        assert_eq!(spinner.wait(|| Some(3)), Some(3));
        assert_eq!((spinner.skip, spinner.backoff), (0, 1));
    }

    #[test]
    fn while_a_guard_lives_a_spinner_spins_whatever_the_load() {
        let guard = SpinRegardlessOfLoad::begin();
        assert!(!oversubscribed());
        // The machine's own spinner: it spins (looks more than once) until it finds.
        let mut spinner = Spinner::new(Duration::from_secs(3600));
        let mut looks = 0;
        assert_eq!(
            spinner.wait(|| {
                looks += 1;
                (looks == 1000).then_some(5)
            }),
            Some(5)
        );
        assert_eq!(looks, 1000);
        drop(guard);
    }

    #[test]
    fn the_runnable_count_is_read_from_loadavg_s_fourth_field() {
        assert_eq!(
            runnable_beyond("0.91 1.58 2.40 1/111 28393\n", 2),
            Some(false)
        );
        assert_eq!(
            runnable_beyond("0.91 1.58 2.40 2/111 28393\n", 2),
            Some(false)
        );
        assert_eq!(
            runnable_beyond("16.0 17.2 18.9 3/540 1234\n", 2),
            Some(true)
        );
        assert_eq!(
            runnable_beyond("16.0 17.2 18.9 17/540 1234", 16),
            Some(true)
        );
        for bad in [
            "",
            "0.1 0.2 0.3",
            "0.1 0.2 0.3 x/1 5",
            "0.1 0.2 0.3 4 5",
            "a b c -1/2",
        ] {
            assert_eq!(runnable_beyond(bad, 2), None, "{bad:?}");
        }
    }

    #[test]
    fn a_spin_ends_with_its_budget_or_its_find() {
        assert_eq!(spin(Duration::from_secs(10), || Some(3)), Some(3));
        let mut looks = 0;
        assert_eq!(
            spin(Duration::from_micros(20), || {
                looks += 1;
                None::<()>
            }),
            None
        );
        assert!(looks >= 1);
    }
}
