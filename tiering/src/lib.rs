//! tidepool-tiering: the cold tier.
//!
//! Owns the `ObjectStore` trait and its backends (S3, Azure Blob, a local folder) and wrappers
//! (retry, fault injection) in `store/`; the chunk and pack object formats and the bucket's key
//! layout in `format/`; and the write-back tiering engine, eviction, read-through and garbage
//! collection in `engine/` (a background client of tidepool-fs, plugged into it as its
//! `ColdTier`). It does not own the namespace (tidepool-cluster) or the NVMe copies
//! (tidepool-spdk).

pub mod engine;
pub mod format;
pub mod manifest;
pub mod store;

pub use engine::{Tier, TierConfig, TierEngineError};
pub use store::fault::{FaultConfig, Faulty};
pub use store::local::LocalStore;
pub use store::retry::{RetryConfig, Retrying};
pub use store::s3::{S3Config, S3Store};
pub use store::url::{BucketUrl, parse_bucket_url};
pub use store::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent};
