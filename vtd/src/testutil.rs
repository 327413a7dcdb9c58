//! Frames for unit tests.

use crate::builder::FrameSource;
pub(crate) use vsva_mem::testutil::TestMemory;

/// Frames from a range of a test memory, counting the ones handed out.
pub(crate) struct TestFrames {
    next: u64,
    end: u64,
    free: Vec<u64>,
    pub outstanding: usize,
}

impl TestFrames {
    /// Frames in `[start, end)`, both 4-KiB aligned.
    pub fn new(start: u64, end: u64) -> Self {
        TestFrames {
            next: start,
            end,
            free: Vec::new(),
            outstanding: 0,
        }
    }
}

impl FrameSource for TestFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = match self.free.pop() {
            Some(f) => f,
            None if self.next < self.end => {
                self.next += 4096;
                self.next - 4096
            }
            None => return None,
        };
        self.outstanding += 1;
        Some(frame)
    }

    fn free_table(&mut self, frame: u64) {
        self.outstanding -= 1;
        self.free.push(frame);
    }
}
