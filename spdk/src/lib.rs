//! tidepool-spdk: the NVMe engine.
//!
//! Owns the [`BlockDevice`] seam and its backends (io_uring + O_DIRECT, portable pread/pwrite,
//! in-memory; SPDK's user-space driver behind the `spdk` feature), and the log-structured
//! [`BlockStore`] of immutable blocks on top of a device. It knows nothing of files, inodes,
//! the meta group or the object store: a block here is `(block id) -> bytes`.

pub mod buf;
pub mod device;
pub mod store;

#[cfg(feature = "spdk")]
compile_error!(
    "the `spdk` feature needs SPDK's user-space NVMe driver and its Rust bindings, which cannot be \
     installed from the package registries this project builds from; use the io_uring engine"
);

pub use buf::{AlignedBuf, BufPool};
pub use device::{BlockDevice, DeviceError, DeviceInfo, EngineKind, OpenOptions, open_device};
pub use store::{BlockId, BlockStore, StoreError, StoreOptions, StoreStats};
