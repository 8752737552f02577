//! In-memory device, for tests. Same contract as the real engines, including alignment
//! checks, so code tested on it behaves the same on a disk.

use std::sync::Mutex;

use super::{BlockDevice, DeviceError, DeviceInfo, EngineKind, IoFuture, IoResult, check_io};
use crate::buf::AlignedBuf;

pub struct MemDevice {
    info: DeviceInfo,
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size_bytes: u64) -> Self {
        let size = (size_bytes / 4096) * 4096;
        MemDevice {
            info: DeviceInfo { size_bytes: size, align_bytes: 4096, queue_depth: 64, engine: EngineKind::Memory },
            data: Mutex::new(vec![0u8; size as usize]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked mid-copy; the bytes are still bytes.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        let res = check_io(&self.info, offset, buf.len()).map(|()| {
            let data = self.lock();
            let start = offset as usize;
            let len = buf.len();
            buf.as_mut_slice().copy_from_slice(&data[start..start + len]);
        });
        Box::pin(async move { (buf, res) })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        let res = check_io(&self.info, offset, buf.len()).map(|()| {
            let mut data = self.lock();
            let start = offset as usize;
            data[start..start + buf.len()].copy_from_slice(buf.as_slice());
        });
        Box::pin(async move { (buf, res) })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async { Ok(()) })
    }
}
