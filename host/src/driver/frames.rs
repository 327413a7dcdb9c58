//! Host frames for the tables the driver builds, from the host's [`FrameAllocator`].

use vsva_hw::memory::FrameAllocator;
use vsva_vtd::{addr::Hpa, builder::FrameSource};

/// The [`FrameSource`] of page-table builders over a [`FrameAllocator`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostFrames<'a>(pub &'a FrameAllocator);

impl FrameSource for HostFrames<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.alloc_frame().ok().map(|hpa| hpa.0)
    }

    fn free_table(&mut self, frame: u64) {
        if let Err(e) = self.0.free(Hpa(frame)) {
            tracing::error!("vt-d: freeing table frame {frame:#x}: {e}");
        }
    }
}
