//! The portable engine: blocking `pread`/`pwrite` on tokio's blocking thread pool, without
//! O_DIRECT, so it works wherever a file can be opened (tmpfs, ramfs, overlay, ...).
//!
//! Also home of [`open_backing`], the open-and-size rules shared with the io_uring engine:
//! a regular file is created and grown to `create_size_bytes` (never shrunk) and aligned to
//! 4096; a raw block device reports its own size and logical block size.
//!
//! The engine's futures must be polled inside a tokio runtime (they use `spawn_blocking`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::{BlockDevice, DeviceError, DeviceInfo, EngineKind, IoFuture, IoResult, OpenOptions, check_io};
use crate::buf::AlignedBuf;

/// Alignment used for regular files: the page size, which every filesystem accepts for O_DIRECT.
const FILE_ALIGN_BYTES: usize = 4096;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes. The generic ioctl encoding
/// (x86_64, aarch64, riscv64); elsewhere the ioctl fails and we fall back to `lseek(SEEK_END)`.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// An opened file or block device with its usable size and alignment.
pub(crate) struct Backing {
    pub file: File,
    /// Usable bytes: the file or device size rounded down to `align_bytes`.
    pub size_bytes: u64,
    pub align_bytes: usize,
}

/// Open `path` read-write (with O_DIRECT when `direct`), create and size it per `opts`.
///
/// Every failure, including O_DIRECT refused by the filesystem (EINVAL), is
/// [`DeviceError::Open`], so [`super::open_device`] can fall back to another engine.
pub(crate) fn open_backing(path: &Path, opts: &OpenOptions, direct: bool) -> Result<Backing, DeviceError> {
    let open_err = |source: io::Error| DeviceError::Open { path: path.display().to_string(), source };
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).create(opts.create_size_bytes.is_some());
    oo.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
    let file = oo.open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let (size, align) = if meta.file_type().is_block_device() {
        let size = block_device_size(&file).map_err(open_err)?;
        let lbs = logical_block_size(&file).map_err(open_err)?;
        (size, lbs.max(512))
    } else if meta.is_file() {
        let mut size = meta.len();
        if let Some(want) = opts.create_size_bytes
            && size < want
        {
            allocate(&file, want).map_err(open_err)?;
            size = want;
        }
        (size, FILE_ALIGN_BYTES)
    } else {
        let kind = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or a block device");
        return Err(open_err(kind));
    };
    Ok(Backing { file, size_bytes: size / align as u64 * align as u64, align_bytes: align })
}

/// Grow `file` to `len` bytes with real blocks (fallocate), or sparsely where that is refused.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let off_len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid, owned fd; mode 0 allocates and extends the file size.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(err),
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc == 0 {
        return Ok(size);
    }
    // Unknown ioctl encoding on this architecture: seeking to the end gives the same answer.
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 { Err(io::Error::last_os_error()) } else { Ok(end as u64) }
}

fn logical_block_size(file: &File) -> io::Result<usize> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut lbs as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(lbs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Blocking pread/pwrite on tokio's blocking pool; durable via `fdatasync`.
pub struct PosixDevice {
    info: DeviceInfo,
    file: Arc<File>,
}

impl PosixDevice {
    /// Open (and create/size, see [`OpenOptions`]) a file or block device without O_DIRECT.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DeviceError> {
        let b = open_backing(path, opts, false)?;
        let info = DeviceInfo {
            size_bytes: b.size_bytes,
            align_bytes: b.align_bytes,
            queue_depth: opts.queue_depth.max(1),
            engine: EngineKind::Posix,
        };
        Ok(PosixDevice { info, file: Arc::new(b.file) })
    }
}

/// Run `f` on the blocking pool; a panic or a runtime shutdown loses the buffer, so a fresh one
/// of the same length is handed back with the error.
async fn run_blocking<F>(op: &'static str, offset: u64, len: usize, f: F) -> IoResult
where
    F: FnOnce() -> IoResult + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => (AlignedBuf::zeroed(len), Err(DeviceError::Stopped)),
        Err(e) => (AlignedBuf::zeroed(len), Err(DeviceError::Io { op, offset, source: io::Error::other(e) })),
    }
}

impl BlockDevice for PosixDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        Box::pin(async move {
            if let Err(e) = check_io(&self.info, offset, buf.len()) {
                return (buf, Err(e));
            }
            let file = Arc::clone(&self.file);
            let len = buf.len();
            run_blocking("read", offset, len, move || {
                let r = file.read_exact_at(buf.as_mut_slice(), offset);
                (buf, r.map_err(|source| DeviceError::Io { op: "read", offset, source }))
            })
            .await
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        Box::pin(async move {
            if let Err(e) = check_io(&self.info, offset, buf.len()) {
                return (buf, Err(e));
            }
            let file = Arc::clone(&self.file);
            let len = buf.len();
            run_blocking("write", offset, len, move || {
                let r = file.write_all_at(buf.as_slice(), offset);
                (buf, r.map_err(|source| DeviceError::Io { op: "write", offset, source }))
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || file.sync_data()).await {
                Ok(r) => r.map_err(|source| DeviceError::Io { op: "flush", offset: 0, source }),
                Err(e) if e.is_cancelled() => Err(DeviceError::Stopped),
                Err(e) => Err(DeviceError::Io { op: "flush", offset: 0, source: io::Error::other(e) }),
            }
        })
    }
}
