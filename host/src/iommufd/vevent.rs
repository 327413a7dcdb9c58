//! A vEVENT queue (`IOMMU_VEVENTQ_ALLOC`, `drivers/iommu/iommufd/eventq.c`): the file a
//! VMM reads its vIOMMU's events from. Each `read` gives whole events, each an
//! `iommufd_vevent_header` (flags, sequence) and the event's data (for an SMMUv3, its
//! 32-byte event record with the StreamID replaced by the vSID); an event that does not
//! fit what is left of the buffer stays queued, and a read with nothing that fits returns
//! 0, as the kernel's does. At most `depth` events wait; one arriving beyond that is
//! lost: a header with `IOMMU_VEVENTQ_FLAG_LOST_EVENTS` and no data is queued once at the
//! tail, carrying the sequence number of the latest lost event
//! (`iommufd_viommu_report_event`). Sequence numbers run from 0 to `i32::MAX` and wrap to 0.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_uapi::iommufd::{IommufdVeventHeader, IOMMU_VEVENTQ_FLAG_LOST_EVENTS};
use vsva_uapi::wire::Wire;
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};

/// One queued entry: an event, or the lost-events header.
#[derive(Debug)]
enum Entry {
    Event { sequence: u32, data: Vec<u8> },
    Lost { sequence: u32 },
}

#[derive(Debug)]
struct Queue {
    entries: VecDeque<Entry>,
    /// Events queued (the lost-events header is not one).
    events: u32,
    depth: u32,
    sequence: u32,
}

/// One vEVENT queue's file.
pub struct VeventqFile {
    queue: Mutex<Queue>,
    notifier: Mutex<Option<Arc<dyn EventNotifier>>>,
}

impl std::fmt::Debug for VeventqFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VeventqFile")
            .field("queue", &*lock(&self.queue))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const HEADER: usize = std::mem::size_of::<IommufdVeventHeader>();

impl VeventqFile {
    /// An empty queue holding at most `depth` (non-zero) events.
    pub(crate) fn new(depth: u32) -> Arc<Self> {
        Arc::new(VeventqFile {
            queue: Mutex::new(Queue {
                entries: VecDeque::new(),
                events: 0,
                depth,
                sequence: 0,
            }),
            notifier: Mutex::new(None),
        })
    }

    /// Queues an event's data, or records its loss when `depth` events wait.
    pub(crate) fn report(&self, data: &[u8]) {
        {
            let mut q = lock(&self.queue);
            let sequence = q.sequence;
            q.sequence = (sequence + 1) & i32::MAX as u32;
            if q.events >= q.depth {
                let lost = q.entries.iter_mut().find_map(|e| match e {
                    Entry::Lost { sequence } => Some(sequence),
                    Entry::Event { .. } => None,
                });
                match lost {
                    Some(s) => *s = sequence,
                    None => q.entries.push_back(Entry::Lost { sequence }),
                }
            } else {
                q.events += 1;
                q.entries.push_back(Entry::Event {
                    sequence,
                    data: data.to_vec(),
                });
            }
        }
        if let Some(n) = lock(&self.notifier).as_ref() {
            n.notify();
        }
    }

    /// Entries waiting to be read (events and a lost-events header).
    pub fn pending(&self) -> usize {
        lock(&self.queue).entries.len()
    }
}

impl UapiFile for VeventqFile {
    /// No ioctl on a vEVENT queue.
    fn ioctl(&self, _cmd: u32, _arg: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::new(libc::ENOTTY))
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut q = lock(&self.queue);
        let mut done = 0;
        while let Some(entry) = q.entries.front() {
            let (flags, sequence, data): (u32, u32, &[u8]) = match entry {
                Entry::Event { sequence, data } => (0, *sequence, data),
                Entry::Lost { sequence } => (IOMMU_VEVENTQ_FLAG_LOST_EVENTS, *sequence, &[]),
            };
            let need = HEADER + data.len();
            if need > buf.len() - done {
                break;
            }
            IommufdVeventHeader { flags, sequence }.write(&mut buf[done..]);
            buf[done + HEADER..done + need].copy_from_slice(data);
            done += need;
            if matches!(q.entries.pop_front(), Some(Entry::Event { .. })) {
                q.events -= 1;
            }
        }
        Ok(done)
    }

    /// A vEVENT queue takes no writes.
    fn write(&self, _buf: &[u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        *lock(&self.notifier) = notifier;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let h = IommufdVeventHeader::read(&bytes[at..]);
            let len = if h.flags & IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
                0
            } else {
                4
            };
            out.push((
                h.flags,
                h.sequence,
                bytes[at + HEADER..at + HEADER + len].to_vec(),
            ));
            at += HEADER + len;
        }
        out
    }

    #[test]
    fn whole_events_in_order_then_a_lost_events_header() {
        let q = VeventqFile::new(2);
        let mut buf = [0u8; 64];
        assert_eq!(q.read(&mut buf), Ok(0));
        for i in 0..5u8 {
            q.report(&[i; 4]);
        }
        // Events 0 and 1 wait; 2, 3, 4 were lost: one header with the latest sequence.
        assert_eq!(q.pending(), 3);
        // A buffer that holds one event and a half gives one.
        let n = q.read(&mut buf[..HEADER + 4 + 3]).unwrap();
        assert_eq!(entries(&buf[..n]), [(0, 0, vec![0; 4])]);
        let n = q.read(&mut buf).unwrap();
        assert_eq!(
            entries(&buf[..n]),
            [
                (0, 1, vec![1; 4]),
                (IOMMU_VEVENTQ_FLAG_LOST_EVENTS, 4, vec![])
            ]
        );
        // Room again: the next event is queued with the next sequence.
        q.report(&[9; 4]);
        let n = q.read(&mut buf).unwrap();
        assert_eq!(entries(&buf[..n]), [(0, 5, vec![9; 4])]);
        assert_eq!(q.pending(), 0);
        // Too small for a header: nothing read, nothing lost.
        q.report(&[7; 4]);
        assert_eq!(q.read(&mut buf[..HEADER - 1]), Ok(0));
        assert_eq!(q.pending(), 1);
    }

    #[test]
    fn the_sequence_wraps_at_int_max() {
        let q = VeventqFile::new(4);
        lock(&q.queue).sequence = i32::MAX as u32;
        q.report(&[1; 4]);
        q.report(&[2; 4]);
        let mut buf = [0u8; 64];
        let n = q.read(&mut buf).unwrap();
        assert_eq!(
            entries(&buf[..n]),
            [(0, i32::MAX as u32, vec![1; 4]), (0, 0, vec![2; 4])]
        );
    }
}
