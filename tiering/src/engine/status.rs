//! `tidepool tier status [PATH]`: dirty / clean / cold bytes and file counts below a path,
//! its residency on NVMe, the oldest dirty block's age, and the bucket's totals.

use std::collections::HashSet;

use tidepool_cluster::meta::{BlockState, InodeKind};

use super::{Result, Tier};

/// Residency of the files below one path.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PathStatus {
    pub path: String,
    pub files: u64,
    /// Files with at least one dirty block / all blocks tiered and on NVMe / some block cold.
    pub dirty_files: u64,
    pub clean_files: u64,
    pub cold_files: u64,
    pub dirty_bytes: u64,
    pub clean_bytes: u64,
    pub cold_bytes: u64,
    /// Share of the bytes that are on NVMe (dirty + clean), in percent; 100 for no bytes.
    pub resident_percent: f64,
    /// Age of the oldest dirty block, seconds (0 if none).
    pub oldest_dirty_secs: f64,
    pub pinned: bool,
}

/// The whole tier.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TierStatus {
    pub bucket: String,
    pub objects: u64,
    pub bucket_bytes: u64,
    pub bucket_live_bytes: u64,
    pub dirty_bytes_total: u64,
    pub dirty_limit_bytes: u64,
    pub last_upload_error: Option<String>,
    pub path: PathStatus,
}

impl Tier {
    pub fn status(&self, path: &str) -> Result<TierStatus> {
        let fs = self.fs()?;
        let ino = fs.resolve(path.as_bytes())?.ino;
        let now = self.now();
        let store = &self.store;
        let (mut st, pinned) = fs.meta().read(|s| {
            let mut p = PathStatus { path: path.to_string(), ..PathStatus::default() };
            let mut oldest: Option<i64> = None;
            let mut seen = HashSet::new();
            let mut stack = vec![ino];
            while let Some(i) = stack.pop() {
                let Some(inode) = s.inodes.get(&i) else { continue };
                match inode.attr.kind {
                    InodeKind::Dir => stack.extend(s.entries.get(&i).into_iter().flat_map(|e| e.values().copied())),
                    InodeKind::Symlink => {}
                    InodeKind::File => {
                        p.files += 1;
                        let (mut dirty, mut cold) = (false, false);
                        for e in inode.extents.values() {
                            let Some(b) = s.blocks.get(&e.block) else { continue };
                            let len = u64::from(b.len);
                            let first = seen.insert(e.block);
                            match b.state {
                                BlockState::Dirty => {
                                    dirty = true;
                                    oldest = Some(oldest.map_or(b.written, |o| o.min(b.written)));
                                    if first {
                                        p.dirty_bytes += len;
                                    }
                                }
                                BlockState::Tiered(_) if store.contains(e.block) => {
                                    if first {
                                        p.clean_bytes += len;
                                    }
                                }
                                BlockState::Tiered(_) => {
                                    cold = true;
                                    if first {
                                        p.cold_bytes += len;
                                    }
                                }
                            }
                        }
                        if dirty {
                            p.dirty_files += 1;
                        } else if cold {
                            p.cold_files += 1;
                        } else {
                            p.clean_files += 1;
                        }
                    }
                }
            }
            let total = p.dirty_bytes + p.clean_bytes + p.cold_bytes;
            p.resident_percent =
                if total == 0 { 100.0 } else { (p.dirty_bytes + p.clean_bytes) as f64 * 100.0 / total as f64 };
            p.oldest_dirty_secs = oldest.map_or(0.0, |o| now.saturating_sub(o).max(0) as f64 / 1e9);
            let (bucket_bytes, live) =
                s.objects.values().fold((0, 0), |(b, l), o| (b + o.size_bytes, l + o.live_bytes));
            let t = TierStatus {
                objects: s.objects.len() as u64,
                bucket_bytes,
                bucket_live_bytes: live,
                dirty_bytes_total: s.dirty_bytes,
                path: p,
                ..TierStatus::default()
            };
            (t, s.is_pinned(ino))
        });
        st.path.pinned = pinned;
        st.bucket = self.objects.describe();
        st.dirty_limit_bytes = self.cfg.dirty_limit_bytes;
        st.last_upload_error = self.last_error();
        Ok(st)
    }
}
