//! tidepool-nfs: the NFSv3 front end. `nfsserve` speaks the protocol (ONC RPC, MOUNT and NFSv3
//! on one TCP port, no portmapper needed by clients that take ports in the URL); this crate is
//! its `NFSFileSystem` over the `tidepool-fs` API and exports the whole namespace as `/`.
//! `nfsserve` is forked in `nfsserve/` (see its README's NOTICE) for the hooks upstream lacks:
//! who calls, an address check, ACCESS, COMMIT and `stable_how`, READDIR cookies, FSSTAT.
//! It does not touch the block store or the meta group (ARCHITECTURE invariant 1) and does not
//! pick concrete parts (the `tidepool` binary wires it).
//!
//! The mapping, and why:
//! - **fileid = ino**, the root is `ROOT_INO`; attributes come straight from [`FileAttr`]
//!   (`fsid` is derived from the data folder's cluster id).
//! - **File handles survive a restart**: a handle is `[version 1][fsid u64][ino u64][generation
//!   u64]` (25 bytes). The generation is the Raft index of the inode's create, so a handle of a
//!   deleted file never names a later file that happens to get the same ino: a handle whose
//!   inode is gone, or whose generation differs, is `NFS3ERR_STALE`; another filesystem's
//!   handle too. nfsserve's default handle carries its process start time instead, which makes
//!   every handle stale after a restart.
//! - **Exports** ([`ExportOptions`]): a client address outside the allowed CIDRs is refused at
//!   MOUNT (MNT3ERR_ACCES) and on every NFS call but NULL (NFS3ERR_ACCES), whatever handle it
//!   holds. Each call acts with the caller's AUTH_SYS uid/gid/gids (AUTH_NULL: the anonymous
//!   ids; uid 0 becomes them under root squash): LOOKUP needs search on the folder, READ and
//!   WRITE read/write on the file (its owner always may, as knfsd allows), changes to a folder
//!   write+search on it, SETATTR the owner (or root); ACCESS answers by the same rules. New
//!   inodes belong to the caller. A read-only export answers ROFS to every change.
//! - **Writes**: FILE_SYNC and DATA_SYNC writes are `Fs::write`, acknowledged after the blocks
//!   are flushed and the extents committed to the fsync'd Raft log (answered FILE_SYNC).
//!   UNSTABLE writes are answered UNSTABLE as soon as they are queued and run in the background
//!   (`writes.rs`); COMMIT waits for the file's pending writes. The write verifier is this
//!   server's start time: it changes on restart, so a client resends what it had not committed.
//! - **Sequential READs** read the next range ahead (`readahead.rs`), used only if the file's
//!   ctime and size are unchanged when the next READ asks for it.
//! - **REMOVE and RMDIR** both reach [`NFSFileSystem::remove`] in nfsserve 0.11: the entry's
//!   kind picks `Fs::rmdir` or `Fs::unlink`. LINK and MKNOD answer NOTSUPP (no hard links nor
//!   device files in tidepool).
//! - **CREATE EXCLUSIVE** keeps the client's verifier in an xattr (`:nfs-createverf`, not S3
//!   metadata): a retransmission answers the file it created, another verifier EXIST.
//! - **READDIR / READDIRPLUS cookies** are the fileid of the last entry returned (nfsserve's
//!   choice). Listings are in name order; a cookie resumes after that entry's name, remembered
//!   from the page that returned it (or, after a restart, found by scanning the directory). If
//!   the entry was deleted or renamed meanwhile, the listing resumes where its old name would
//!   sort, so no entry is returned twice and none that stayed is skipped. A cookie that names no
//!   entry this server knows of in that directory is `NFS3ERR_BAD_COOKIE`.
//! - **FSSTAT** is the device's capacity and free bytes (`Fs::stat`); files are not limited by
//!   an inode table, so the free-files figure is nominal (2^32).
//! - **Errors**: one exhaustive `match` from `ErrorKind` to `nfsstat3` ([`nfs_status`]); a
//!   spun-down (read-only) fs is `ErrorKind::ReadOnly` -> `NFS3ERR_ROFS`.

mod exports;
mod handle;
mod metrics;
mod readahead;
mod vfs;
mod writes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use nfsserve::nfs::nfsstat3;
use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use tidepool_fs::{ErrorKind, Fs, FsError};

pub use exports::{Cidr, Cred, ExportOptions};
pub use metrics::NfsMetrics;
/// The caller context a call runs with (tests start calls with [`with_caller`]).
pub use nfsserve::vfs::{AuthSys, Caller, StableHow, caller, with_caller};
pub use tidepool_fs::FileAttr;

/// The export: `nfs://host/` names the root of the namespace.
pub const EXPORT_NAME: &str = "/";

/// Readdir cookies remembered (fileid -> (directory, name)) before the memory is cleared.
const COOKIE_MEMORY: usize = 1 << 16;

/// The `NFSFileSystem` over [`Fs`]. Holds the filesystem weakly, so a stopping node can take it
/// back while connections are still open; calls after that answer `NFS3ERR_JUKEBOX`.
pub struct TidepoolNfs {
    fs: Weak<Fs>,
    fsid: u64,
    metrics: Arc<NfsMetrics>,
    cookies: Mutex<HashMap<u64, (u64, Vec<u8>)>>,
    exports: ExportOptions,
    writes: Arc<writes::WriteBehind>,
    readahead: readahead::ReadAhead,
    /// WRITE/COMMIT verifier: this server's start time, so it changes on every restart.
    verifier: [u8; 8],
}

impl TidepoolNfs {
    /// `cluster_id` names the filesystem in file handles and in `fsid` (the data folder's
    /// superblock `cluster_id`), so handles stay valid across restarts of the same data folder.
    pub fn new(fs: &Arc<Fs>, cluster_id: &str, metrics: Arc<NfsMetrics>) -> Self {
        TidepoolNfs {
            fs: Arc::downgrade(fs),
            fsid: handle::fsid(cluster_id),
            metrics,
            cookies: Mutex::new(HashMap::new()),
            exports: ExportOptions::default(),
            writes: Arc::new(writes::WriteBehind::default()),
            readahead: readahead::ReadAhead::default(),
            verifier: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                .to_be_bytes(),
        }
    }

    /// Share the export as `exports` says (default: [`ExportOptions::default`]).
    pub fn with_exports(mut self, exports: ExportOptions) -> Self {
        self.exports = exports;
        self
    }

    pub fn exports(&self) -> &ExportOptions {
        &self.exports
    }

    pub fn fsid(&self) -> u64 {
        self.fsid
    }

    fn fs(&self) -> Result<Arc<Fs>, nfsstat3> {
        self.fs.upgrade().ok_or(nfsstat3::NFS3ERR_JUKEBOX)
    }
}

/// The one mapping from the fs error kinds to NFSv3 status codes.
pub fn nfs_status(kind: ErrorKind) -> nfsstat3 {
    match kind {
        ErrorKind::NotFound => nfsstat3::NFS3ERR_NOENT,
        ErrorKind::Exists => nfsstat3::NFS3ERR_EXIST,
        ErrorKind::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        ErrorKind::IsDir => nfsstat3::NFS3ERR_ISDIR,
        ErrorKind::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        ErrorKind::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        ErrorKind::Invalid => nfsstat3::NFS3ERR_INVAL,
        ErrorKind::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        ErrorKind::Unavailable => nfsstat3::NFS3ERR_JUKEBOX,
        ErrorKind::Corrupt => nfsstat3::NFS3ERR_IO,
        ErrorKind::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        ErrorKind::Internal => nfsstat3::NFS3ERR_IO,
    }
}

pub(crate) fn map_err(e: FsError) -> nfsstat3 {
    let st = nfs_status(e.kind());
    if matches!(st, nfsstat3::NFS3ERR_IO) {
        tracing::warn!(error = %e, "nfs: i/o error");
    } else {
        tracing::debug!(error = %e, "nfs: error");
    }
    st
}

/// A bound NFS endpoint (MOUNT and NFSv3 on one TCP port).
pub struct NfsServer {
    listener: NFSTcpListener<TidepoolNfs>,
}

impl NfsServer {
    /// Bind `addr` (`ip:port`) and export the whole namespace as `/`.
    pub async fn bind(addr: &str, nfs: TidepoolNfs) -> std::io::Result<Self> {
        let mut listener = NFSTcpListener::bind(addr, nfs).await?;
        listener.with_export_name(EXPORT_NAME);
        Ok(NfsServer { listener })
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.listener.get_listen_ip(), self.listener.get_listen_port())
    }

    /// Serve until the task is aborted (nfsserve's accept loop has no stop of its own).
    pub async fn serve(self) -> std::io::Result<()> {
        self.listener.handle_forever().await
    }
}
