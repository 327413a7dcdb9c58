//! A container as an open file: the [`UapiFile`] a VMM holds. Each call takes the
//! container's lock; failures reach the VMM as the errno Linux returns, and their detail is
//! traced.

use std::mem::size_of;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vsva_uapi::vfio::{VfioIommuType1Fault, VFIO_IOMMU_PAGE_RESPONSE};
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};

use crate::container::{Container, IommuBackend};
use crate::error::HostError;

/// Locks a container; a poisoned lock still holds a consistent container (every ioctl
/// either completes or changes nothing).
fn lock<B: IommuBackend>(c: &Mutex<Container<B>>) -> MutexGuard<'_, Container<B>> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

fn errno(what: &str, e: HostError) -> Errno {
    tracing::debug!("{what}: {e}");
    Errno::from(&e)
}

/// A VM's container as the open file its VMM holds.
#[derive(Debug)]
pub struct ContainerFile<B: IommuBackend> {
    container: Mutex<Container<B>>,
}

impl<B: IommuBackend> ContainerFile<B> {
    /// Opens `container` as a file.
    pub fn new(container: Container<B>) -> Self {
        ContainerFile {
            container: Mutex::new(container),
        }
    }

    /// Closes the file, giving the container back (dropping it releases what it holds).
    pub fn into_inner(self) -> Container<B> {
        self.container
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The container itself, for the host side (assembly, diagnostics, tests); a VMM uses
    /// the [`UapiFile`] calls only.
    pub fn lock(&self) -> MutexGuard<'_, Container<B>> {
        lock(&self.container)
    }
}

impl<B: IommuBackend + Send> UapiFile for ContainerFile<B> {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        self.lock()
            .ioctl(cmd, arg)
            .map_err(|e| errno("container ioctl", e))
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        const RECORD: usize = size_of::<VfioIommuType1Fault>();
        if buf.len() < RECORD {
            return Err(Errno::EINVAL);
        }
        let mut records = buf.chunks_exact_mut(RECORD);
        let taken = self.lock().take_records(records.len(), |event| {
            if let Some(out) = records.next() {
                out.copy_from_slice(&VfioIommuType1Fault::from(&event).to_bytes());
            }
        });
        if taken == 0 {
            return Err(Errno::EAGAIN);
        }
        Ok(taken * RECORD)
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        let mut arg = buf.to_vec();
        self.lock()
            .ioctl(VFIO_IOMMU_PAGE_RESPONSE, &mut arg)
            .map_err(|e| errno("fault queue write", e))?;
        Ok(buf.len())
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        let mut c = self.lock();
        match notifier {
            Some(n) => c.set_fault_notifier(move || n.notify()),
            None => c.clear_fault_notifier(),
        }
    }
}
