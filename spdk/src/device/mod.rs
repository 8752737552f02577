//! `BlockDevice`: the seam between the block store and the hardware.
//!
//! Offsets and lengths are multiples of [`DeviceInfo::align_bytes`]. Reads and writes take an
//! owned [`AlignedBuf`] and hand it back with the result (what io_uring needs: the kernel owns
//! the memory while the I/O is in flight). `flush` makes every write that completed before it
//! was called durable.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crate::buf::AlignedBuf;

pub mod mem;
pub mod posix;
pub mod uring;

pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a read or write returns: the buffer back, and whether the I/O succeeded.
pub type IoResult = (AlignedBuf, Result<(), DeviceError>);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unaligned i/o offset={offset} len={len} align={align}")]
    Unaligned { offset: u64, len: usize, align: usize },
    #[error("i/o beyond end of device offset={offset} len={len} size_bytes={size}")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("short i/o offset={offset} want={want} got={got}")]
    Short { offset: u64, want: usize, got: usize },
    #[error("device i/o error op={op} offset={offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open device path={path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device engine stopped")]
    Stopped,
}

/// Which backend serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring with O_DIRECT (the fast path on a file or a raw block device).
    Uring,
    /// Blocking pread/pwrite on a thread pool; where O_DIRECT is refused (tmpfs) or io_uring is unavailable.
    Posix,
    /// In memory, for tests.
    Memory,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Posix => "posix",
            EngineKind::Memory => "memory",
        })
    }
}

#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub size_bytes: u64,
    /// Offsets and lengths must be multiples of this (512 or 4096).
    pub align_bytes: usize,
    /// How many I/Os the engine keeps in flight at most.
    pub queue_depth: usize,
    pub engine: EngineKind,
}

pub trait BlockDevice: Send + Sync + 'static {
    fn info(&self) -> &DeviceInfo;
    /// Read `buf.len()` bytes at `offset` into `buf`. The buffer handed back has the same
    /// length and capacity, but may be another one: the io_uring engine moves a single-page
    /// read onto a page it has registered with the kernel (and frees the one given).
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult>;
    /// Write `buf.len()` bytes from `buf` at `offset`.
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult>;
    /// Make every write that completed before this call durable.
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>>;
}

/// Check alignment and range, shared by every backend.
pub fn check_io(info: &DeviceInfo, offset: u64, len: usize) -> Result<(), DeviceError> {
    let align = info.align_bytes;
    if !offset.is_multiple_of(align as u64) || !len.is_multiple_of(align) {
        return Err(DeviceError::Unaligned { offset, len, align });
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > info.size_bytes) {
        return Err(DeviceError::OutOfRange { offset, len, size: info.size_bytes });
    }
    Ok(())
}

/// How to open a device file.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Create the file with this size if it does not exist (ignored for block devices).
    pub create_size_bytes: Option<u64>,
    pub queue_depth: usize,
    /// Force an engine instead of choosing (io_uring + O_DIRECT, else posix).
    pub engine: Option<EngineKind>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { create_size_bytes: None, queue_depth: 64, engine: None }
    }
}

/// Open a file or raw block device with the best engine that works on it:
/// io_uring with O_DIRECT, else the portable posix engine (e.g. tmpfs refuses O_DIRECT).
pub fn open_device(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>, DeviceError> {
    match opts.engine {
        Some(EngineKind::Memory) => {
            let size = opts.create_size_bytes.unwrap_or(64 << 20);
            Ok(Arc::new(mem::MemDevice::new(size)))
        }
        Some(EngineKind::Posix) => Ok(Arc::new(posix::PosixDevice::open(path, opts)?)),
        Some(EngineKind::Uring) => Ok(Arc::new(uring::UringDevice::open(path, opts)?)),
        None => match uring::UringDevice::open(path, opts) {
            Ok(d) => Ok(Arc::new(d)),
            Err(e) => {
                tracing::info!(path = %path.display(), error = %e, "io_uring with O_DIRECT refused; using the posix engine");
                Ok(Arc::new(posix::PosixDevice::open(path, opts)?))
            }
        },
    }
}
