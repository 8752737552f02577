use std::cmp::Ordering;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::nfs;
use crate::nfs::*;
#[derive(Default, Debug)]
pub struct DirEntrySimple {
    pub fileid: fileid3,
    pub name: filename3,
}
#[derive(Default, Debug)]
pub struct ReadDirSimpleResult {
    pub entries: Vec<DirEntrySimple>,
    pub end: bool,
}

#[derive(Default, Debug)]
pub struct DirEntry {
    pub fileid: fileid3,
    pub name: filename3,
    pub attr: fattr3,
}
#[derive(Default, Debug)]
pub struct ReadDirResult {
    pub entries: Vec<DirEntry>,
    pub end: bool,
}

impl ReadDirSimpleResult {
    pub(crate) fn from_readdir_result(result: &ReadDirResult) -> ReadDirSimpleResult {
        let entries: Vec<DirEntrySimple> = result
            .entries
            .iter()
            .map(|e| DirEntrySimple {
                fileid: e.fileid,
                name: e.name.clone(),
            })
            .collect();
        ReadDirSimpleResult {
            entries,
            end: result.end,
        }
    }
}

static mut GENERATION_NUMBER: u64 = 0;
static GENERATION_NUMBER_INIT: Once = Once::new();

fn get_generation_number() -> u64 {
    unsafe {
        GENERATION_NUMBER_INIT.call_once(|| {
            GENERATION_NUMBER = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        });
        GENERATION_NUMBER
    }
}

/// AUTH_SYS (AUTH_UNIX) credentials of a call (tidepool fork).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSys {
    pub uid: u32,
    pub gid: u32,
    pub gids: Vec<u32>,
}

/// Who makes the current call (tidepool fork): the peer's address and its AUTH_SYS
/// credentials (`None` for AUTH_NULL or another flavor). The RPC layer sets it for the whole
/// handling of each call; a filesystem reads it with [`caller`].
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: SocketAddr,
    pub auth: Option<AuthSys>,
}

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the call being handled, or `None` outside an RPC (see [`with_caller`]).
pub fn caller() -> Option<Caller> {
    CALLER.try_with(|c| c.clone()).ok()
}

/// `f` of the caller of the call being handled, without copying it (tidepool fork).
pub fn with_caller_ref<R>(f: impl FnOnce(&Caller) -> R) -> Option<R> {
    CALLER.try_with(f).ok()
}

/// Run `f` as a call from `caller` (the RPC layer does this for every call; tests too).
pub async fn with_caller<F: Future>(caller: Caller, f: F) -> F::Output {
    CALLER.scope(caller, f).await
}

/// FSSTAT figures (tidepool fork): RFC 1813 FSSTAT3resok less the attributes.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsStat {
    pub tbytes: size3,
    pub fbytes: size3,
    pub abytes: size3,
    pub tfiles: size3,
    pub ffiles: size3,
    pub afiles: size3,
    pub invarsec: u32,
}

/// What capabilities are supported
pub enum VFSCapabilities {
    ReadOnly,
    ReadWrite,
}

/// The basic API to implement to provide an NFS file system
///
/// Opaque FH
/// ---------
/// Files are only uniquely identified by a 64-bit file id. (basically an inode number)
/// We automatically produce internally the opaque filehandle which is comprised of
///  - A 64-bit generation number derived from the server startup time
///   (i.e. so the opaque file handle expires when the NFS server restarts)
///  - The 64-bit file id
//
/// readdir pagination
/// ------------------
/// We do not use cookie verifier. We just use the start_after.  The
/// implementation should allow startat to start at any position. That is,
/// the next query to readdir may be the last entry in the previous readdir
/// response.
//
/// There is a wierd annoying thing about readdir that limits the number
/// of bytes in the response (instead of the number of entries). The caller
/// will have to truncate the readdir response / issue more calls to readdir
/// accordingly to fill up the expected number of bytes without exceeding it.
//
/// Other requirements
/// ------------------
///  getattr needs to be fast. NFS uses that a lot
//
///  The 0 fileid is reserved and should not be used
#[async_trait]
pub trait NFSFileSystem: Sync {
    /// Returns the set of capabilities supported
    fn capabilities(&self) -> VFSCapabilities;
    /// Returns the ID the of the root directory "/"
    fn root_dir(&self) -> fileid3;
    /// Look up the id of a path in a directory
    ///
    /// i.e. given a directory dir/ containing a file a.txt
    /// this may call lookup(id_of("dir/"), "a.txt")
    /// and this should return the id of the file "dir/a.txt"
    ///
    /// This method should be fast as it is used very frequently.
    async fn lookup(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3>;

    /// Returns the attributes of an id.
    /// This method should be fast as it is used very frequently.
    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3>;

    /// Sets the attributes of an id
    /// this should return Err(nfsstat3::NFS3ERR_ROFS) if readonly
    async fn setattr(&self, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3>;

    /// Reads the contents of a file returning (bytes, EOF)
    /// Note that offset/count may go past the end of the file and that
    /// in that case, all bytes till the end of file are returned.
    /// EOF must be flagged if the end of the file is reached by the read.
    async fn read(&self, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3>;

    /// READ and the file's attributes for its reply (tidepool fork): upstream's handler asked
    /// `getattr`, then `read`; this default does the same. A filesystem whose `read` looks
    /// the attributes up anyway answers both with one lookup.
    async fn read_with_attr(&self, id: fileid3, offset: u64, count: u32) -> (Result<(Vec<u8>, bool), nfsstat3>, post_op_attr) {
        let attr = match self.getattr(id).await {
            Ok(v) => post_op_attr::attributes(v),
            Err(_) => post_op_attr::Void,
        };
        (self.read(id, offset, count).await, attr)
    }

    /// Writes the contents of a file returning (bytes, EOF)
    /// Note that offset/count may go past the end of the file and that
    /// in that case, the file is extended.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3>;

    /// Creates a file with the following attributes.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn create(&self, dirid: fileid3, filename: &filename3, attr: sattr3) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Creates a file if it does not already exist
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    ///
    /// tidepool fork: `verf` is the client's create verifier; a retransmitted exclusive
    /// create (same name, same verifier) must succeed with the file it created.
    async fn create_exclusive(
        &self,
        dirid: fileid3,
        filename: &filename3,
        verf: createverf3,
    ) -> Result<fileid3, nfsstat3>;

    /// Makes a directory with the following attributes.
    /// If not supported dur to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    ///
    /// tidepool fork: `attr` is the client's `sattr3` (mode, owner), upstream dropped it.
    async fn mkdir(&self, dirid: fileid3, dirname: &filename3, attr: &sattr3) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Removes a file.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn remove(&self, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3>;

    /// Removes a file.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn rename(
        &self,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3>;

    /// Returns the contents of a directory with pagination.
    /// Directory listing should be deterministic.
    /// Up to max_entries may be returned, and start_after is used
    /// to determine where to start returning entries from.
    ///
    /// For instance if the directory has entry with ids [1,6,2,11,8,9]
    /// and start_after=6, readdir should returning 2,11,8,...
    //
    async fn readdir(
        &self,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3>;

    /// Simple version of readdir.
    /// Only need to return filename and id
    async fn readdir_simple(&self, dirid: fileid3, count: usize) -> Result<ReadDirSimpleResult, nfsstat3> {
        Ok(ReadDirSimpleResult::from_readdir_result(&self.readdir(dirid, 0, count).await?))
    }

    /// Makes a symlink with the following attributes.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn symlink(
        &self,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Reads a symlink
    async fn readlink(&self, id: fileid3) -> Result<nfspath3, nfsstat3>;

    /// Get static file system Information
    async fn fsinfo(&self, root_fileid: fileid3) -> Result<fsinfo3, nfsstat3> {
        let dir_attr: nfs::post_op_attr = match self.getattr(root_fileid).await {
            Ok(v) => nfs::post_op_attr::attributes(v),
            Err(_) => nfs::post_op_attr::Void,
        };

        let res = fsinfo3 {
            obj_attributes: dir_attr,
            rtmax: 1024 * 1024,
            rtpref: 1024 * 124,
            rtmult: 1024 * 1024,
            wtmax: 1024 * 1024,
            wtpref: 1024 * 1024,
            wtmult: 1024 * 1024,
            dtpref: 1024 * 1024,
            maxfilesize: 128 * 1024 * 1024 * 1024,
            time_delta: nfs::nfstime3 {
                seconds: 0,
                nseconds: 1000000,
            },
            properties: nfs::FSF_SYMLINK | nfs::FSF_HOMOGENEOUS | nfs::FSF_CANSETTIME,
        };
        Ok(res)
    }

    /// Converts the fileid to an opaque NFS file handle. Optional.
    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        let gennum = get_generation_number();
        let mut ret: Vec<u8> = Vec::new();
        ret.extend_from_slice(&gennum.to_le_bytes());
        ret.extend_from_slice(&id.to_le_bytes());
        nfs_fh3 { data: ret }
    }
    /// Converts an opaque NFS file handle to a fileid.  Optional.
    fn fh_to_id(&self, id: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        if id.data.len() != 16 {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let gen = u64::from_le_bytes(id.data[0..8].try_into().unwrap());
        let id = u64::from_le_bytes(id.data[8..16].try_into().unwrap());
        let gennum = get_generation_number();
        match gen.cmp(&gennum) {
            Ordering::Less => Err(nfsstat3::NFS3ERR_STALE),
            Ordering::Greater => Err(nfsstat3::NFS3ERR_BADHANDLE),
            Ordering::Equal => Ok(id),
        }
    }
    /// Converts a complete path to a fileid.  Optional.
    /// The default implementation walks the directory structure with lookup()
    async fn path_to_id(&self, path: &[u8]) -> Result<fileid3, nfsstat3> {
        let splits = path.split(|&r| r == b'/');
        let mut fid = self.root_dir();
        for component in splits {
            if component.is_empty() {
                continue;
            }
            fid = self.lookup(fid, &component.into()).await?;
        }
        Ok(fid)
    }

    fn serverid(&self) -> cookieverf3 {
        let gennum = get_generation_number();
        gennum.to_le_bytes()
    }

    // ---- tidepool fork: the hooks below are not in upstream nfsserve 0.11 ----

    /// May the caller use this server at all? Asked before MOUNT's MNT (a refusal answers
    /// MNT3ERR_ACCES) and before every NFS procedure but NULL (a refusal answers the
    /// procedure's NFS3ERR_ACCES, or whatever status this returns).
    fn admit(&self, _caller: &Caller) -> Result<(), nfsstat3> {
        Ok(())
    }

    /// ACCESS: the subset of `requested` (ACCESS3_* bits) the caller ([`caller`]) is granted.
    async fn access(&self, _id: fileid3, requested: u32) -> Result<u32, nfsstat3> {
        if matches!(self.capabilities(), VFSCapabilities::ReadWrite) {
            Ok(requested)
        } else {
            Ok(requested & (ACCESS3_READ | ACCESS3_LOOKUP))
        }
    }

    /// WRITE with the client's `stable_how`; returns the attributes after the write and how
    /// stable the data is now (at least what was asked for; FILE_SYNC is always truthful if
    /// the write is durable). The default is upstream's: [`NFSFileSystem::write`], FILE_SYNC.
    async fn write_stable(
        &self,
        id: fileid3,
        offset: u64,
        data: &[u8],
        _stable: StableHow,
    ) -> Result<(fattr3, StableHow), nfsstat3> {
        Ok((self.write(id, offset, data).await?, StableHow::FileSync))
    }

    /// COMMIT: make every UNSTABLE write to `id` in `offset..offset+count` (count 0: to the
    /// end) durable; returns the attributes after. The reply carries [`Self::write_verifier`].
    async fn commit(&self, id: fileid3, _offset: u64, _count: u32) -> Result<fattr3, nfsstat3> {
        self.getattr(id).await
    }

    /// The write verifier in WRITE and COMMIT replies: it must change whenever UNSTABLE data
    /// acknowledged earlier may have been lost (a server restart).
    fn write_verifier(&self) -> writeverf3 {
        self.serverid()
    }

    /// FSSTAT figures for the filesystem `id` lives in. The default is upstream's fixed ones.
    async fn fsstat(&self, _id: fileid3) -> Result<FsStat, nfsstat3> {
        Ok(FsStat {
            tbytes: 1024 * 1024 * 1024 * 1024,
            fbytes: 1024 * 1024 * 1024 * 1024,
            abytes: 1024 * 1024 * 1024 * 1024,
            tfiles: 1024 * 1024 * 1024,
            ffiles: 1024 * 1024 * 1024,
            afiles: 1024 * 1024 * 1024,
            invarsec: u32::MAX,
        })
    }
}

/// `stable_how` of WRITE (RFC 1813), public in the tidepool fork.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StableHow {
    Unstable,
    DataSync,
    FileSync,
}
