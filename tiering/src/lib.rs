//! tidepool-tiering: the cold tier.
//!
//! Will own the `ObjectStore` trait and its backends (S3, Azure Blob, a local folder), the
//! chunk and pack object formats, the write-back tiering engine, eviction, garbage
//! collection, manifests, spin-down and rehydrate (see ARCHITECTURE.md and the README's
//! "Not finished"). Nothing is built here yet: every block stays on NVMe, in state `Dirty`.
