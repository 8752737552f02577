//! `NFSFileSystem` for [`TidepoolNfs`]: every call is one or two `Fs` calls.

use async_trait::async_trait;
use nfsserve::nfs::{
    FSF_CANSETTIME, FSF_HOMOGENEOUS, FSF_SYMLINK, fattr3, fileid3, filename3, fsinfo3, ftype3, nfs_fh3, nfspath3,
    nfsstat3, nfstime3, post_op_attr, sattr3, set_atime, set_gid3, set_mode3, set_mtime, set_size3, set_uid3,
    specdata3,
};
use nfsserve::nfs::{createverf3, writeverf3};
use nfsserve::vfs::{Caller, DirEntry, FsStat, NFSFileSystem, ReadDirResult, StableHow, VFSCapabilities};
use tidepool_fs::{ErrorKind, FileAttr, Fs, InodeKind, ROOT_INO, SetAttr};

use crate::exports::{self, Cred, R, W, X};
use crate::{COOKIE_MEMORY, TidepoolNfs, handle, map_err};

/// The xattr that keeps an exclusive create's verifier (a `:` key: not S3 user metadata).
const CREATE_VERF_XATTR: &str = ":nfs-createverf";

const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;
/// FSSTAT's free file slots: nominal, there is no inode table to run out of.
const FREE_FILES: u64 = 1 << 32;
/// Directory page size when a cookie's name must be found by scanning (after a restart).
const SCAN_PAGE: usize = 1024;

fn time(n: i64) -> nfstime3 {
    let n = n.max(0);
    nfstime3 { seconds: (n / 1_000_000_000).min(u32::MAX as i64) as u32, nseconds: (n % 1_000_000_000) as u32 }
}

fn nanos(t: &nfstime3) -> i64 {
    t.seconds as i64 * 1_000_000_000 + t.nseconds as i64
}

/// SET_TO_SERVER_TIME: the front end reads the wall clock (the fs stamps ctime itself).
fn server_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn status_name(s: &nfsstat3) -> &'static str {
    match s {
        nfsstat3::NFS3_OK => "ok",
        nfsstat3::NFS3ERR_NOENT => "NOENT",
        nfsstat3::NFS3ERR_EXIST => "EXIST",
        nfsstat3::NFS3ERR_NOTDIR => "NOTDIR",
        nfsstat3::NFS3ERR_ISDIR => "ISDIR",
        nfsstat3::NFS3ERR_NOTEMPTY => "NOTEMPTY",
        nfsstat3::NFS3ERR_NAMETOOLONG => "NAMETOOLONG",
        nfsstat3::NFS3ERR_INVAL => "INVAL",
        nfsstat3::NFS3ERR_NOSPC => "NOSPC",
        nfsstat3::NFS3ERR_ROFS => "ROFS",
        nfsstat3::NFS3ERR_IO => "IO",
        nfsstat3::NFS3ERR_STALE => "STALE",
        nfsstat3::NFS3ERR_JUKEBOX => "JUKEBOX",
        nfsstat3::NFS3ERR_BAD_COOKIE => "BAD_COOKIE",
        nfsstat3::NFS3ERR_ACCES => "ACCES",
        nfsstat3::NFS3ERR_PERM => "PERM",
        nfsstat3::NFS3ERR_NOTSUPP => "NOTSUPP",
        _ => "other",
    }
}

/// The `SetAttr` a `sattr3` asks for.
fn set_attr(s: &sattr3) -> SetAttr {
    SetAttr {
        mode: match s.mode {
            set_mode3::mode(m) => Some(m & 0o7777),
            set_mode3::Void => None,
        },
        uid: match s.uid {
            set_uid3::uid(u) => Some(u),
            set_uid3::Void => None,
        },
        gid: match s.gid {
            set_gid3::gid(g) => Some(g),
            set_gid3::Void => None,
        },
        size: match s.size {
            set_size3::size(n) => Some(n),
            set_size3::Void => None,
        },
        atime: match &s.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(server_now()),
            set_atime::SET_TO_CLIENT_TIME(t) => Some(nanos(t)),
        },
        mtime: match &s.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(server_now()),
            set_mtime::SET_TO_CLIENT_TIME(t) => Some(nanos(t)),
        },
    }
}

fn is_empty(s: &SetAttr) -> bool {
    s.mode.is_none() && s.uid.is_none() && s.gid.is_none() && s.size.is_none() && s.atime.is_none() && s.mtime.is_none()
}

impl TidepoolNfs {
    /// [`Self::fattr`] with the size UNSTABLE writes still in flight will leave.
    pub fn fattr_now(&self, a: &FileAttr) -> fattr3 {
        let mut f = self.fattr(a);
        if let Some(end) = self.writes.pending_end(a.ino) {
            f.size = f.size.max(end);
            f.used = f.size;
        }
        f
    }

    pub fn fattr(&self, a: &FileAttr) -> fattr3 {
        fattr3 {
            ftype: match a.kind {
                InodeKind::File => ftype3::NF3REG,
                InodeKind::Dir => ftype3::NF3DIR,
                InodeKind::Symlink => ftype3::NF3LNK,
            },
            mode: a.mode,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            // Blocks are not shared between files except after a copy; the logical size is
            // the honest figure without walking the extents.
            used: a.size,
            rdev: specdata3::default(),
            fsid: self.fsid,
            fileid: a.ino,
            atime: time(a.atime),
            mtime: time(a.mtime),
            ctime: time(a.ctime),
        }
    }

    /// The caller's credentials (squashed). Outside an RPC there is no caller: refused.
    fn cred(&self) -> Result<Cred, nfsstat3> {
        nfsserve::vfs::with_caller_ref(|c| self.exports.cred(c)).ok_or(nfsstat3::NFS3ERR_ACCES)
    }

    /// For calls that change something: ROFS on a read-only export.
    fn writer(&self) -> Result<Cred, nfsstat3> {
        if self.exports.read_only {
            return Err(nfsstat3::NFS3ERR_ROFS);
        }
        self.cred()
    }

    /// `cred` may add or remove entries of directory `dir` (write and search on it).
    fn check_dir_change(&self, fs: &Fs, dir: u64, cred: &Cred) -> Result<FileAttr, nfsstat3> {
        let a = fs.getattr(dir).map_err(map_err)?;
        if a.kind != InodeKind::Dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        exports::check(&a, cred, W | X)?;
        Ok(a)
    }

    /// Reading or writing a file's bytes: the owner always may (as knfsd allows, so that a
    /// file opened before a chmod stays usable), anyone else by the mode bits.
    fn check_data(a: &FileAttr, cred: &Cred, want: u32) -> Result<(), nfsstat3> {
        if a.uid == cred.uid { Ok(()) } else { exports::check(a, cred, want) }
    }

    /// Owner and group of a new inode: the caller's, or what the client asked for if the
    /// caller is root (or asks for itself and one of its groups).
    fn owner(cred: &Cred, set: &mut SetAttr) -> Result<(u32, u32), nfsstat3> {
        let uid = set.uid.take().unwrap_or(cred.uid);
        let gid = set.gid.take().unwrap_or(cred.gid);
        if !cred.is_root() && (uid != cred.uid || (gid != cred.gid && !cred.gids.contains(&gid))) {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        Ok((uid, gid))
    }

    /// SETATTR rules: mode, owner and explicit times need the owner (or root); uid changes
    /// need root; gid changes the owner in that group; size needs write permission; times
    /// set to "now" need the owner or write permission.
    fn check_setattr(a: &FileAttr, cred: &Cred, set: &sattr3) -> Result<(), nfsstat3> {
        if cred.is_root() {
            return Ok(());
        }
        let owner = a.uid == cred.uid;
        let explicit_time = matches!(set.atime, set_atime::SET_TO_CLIENT_TIME(_))
            || matches!(set.mtime, set_mtime::SET_TO_CLIENT_TIME(_));
        let now_time =
            matches!(set.atime, set_atime::SET_TO_SERVER_TIME) || matches!(set.mtime, set_mtime::SET_TO_SERVER_TIME);
        if let set_uid3::uid(u) = set.uid
            && u != a.uid
        {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        if let set_gid3::gid(g) = set.gid
            && g != a.gid
            && !(owner && (g == cred.gid || cred.gids.contains(&g)))
        {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        if (matches!(set.mode, set_mode3::mode(_)) || explicit_time) && !owner {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        if matches!(set.size, set_size3::size(_)) {
            Self::check_data(a, cred, W)?;
        }
        if now_time && !owner {
            exports::check(a, cred, W)?;
        }
        Ok(())
    }

    fn count<T>(&self, op: &'static str, r: Result<T, nfsstat3>) -> Result<T, nfsstat3> {
        self.metrics.op(op, r.as_ref().map(|_| "ok").unwrap_or_else(status_name));
        r
    }

    /// The name a readdir cookie (a fileid) resumes after in `dir`.
    fn cookie_name(&self, fs: &Fs, dir: u64, cookie: u64) -> Result<Vec<u8>, nfsstat3> {
        if let Some((d, name)) = self.cookies.lock().ok().and_then(|m| m.get(&cookie).cloned())
            && d == dir
        {
            return Ok(name);
        }
        // Not remembered (a restart, or forgotten): find the entry if it is still in `dir`.
        match fs.getattr(cookie) {
            Ok(a) if a.parent == dir && a.ino != dir => {}
            _ => return Err(nfsstat3::NFS3ERR_BAD_COOKIE),
        }
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, eof) = fs.readdir(dir, after.as_deref(), SCAN_PAGE).map_err(crate::map_err)?;
            if let Some(e) = page.iter().find(|e| e.attr.ino == cookie) {
                return Ok(e.name.clone());
            }
            match page.last() {
                Some(e) if !eof => after = Some(e.name.clone()),
                _ => return Err(nfsstat3::NFS3ERR_BAD_COOKIE),
            }
        }
    }

    fn remember(&self, dir: u64, entries: &[tidepool_fs::DirEntry]) {
        if let Ok(mut m) = self.cookies.lock() {
            if m.len() + entries.len() > COOKIE_MEMORY {
                m.clear();
            }
            for e in entries {
                m.insert(e.attr.ino, (dir, e.name.clone()));
            }
        }
    }

    async fn do_create(&self, dirid: fileid3, name: &[u8], attr: sattr3) -> Result<(fileid3, fattr3), nfsstat3> {
        let cred = self.writer()?;
        let fs = self.fs()?;
        self.check_dir_change(&fs, dirid, &cred)?;
        let mut set = set_attr(&attr);
        let mode = set.mode.take().unwrap_or(FILE_MODE);
        let (uid, gid) = Self::owner(&cred, &mut set)?;
        let created = match fs.create(dirid, name, mode, uid, gid).await {
            Ok(a) => a,
            // UNCHECKED: an existing file is reused, with the requested attributes applied.
            Err(e) if e.kind() == ErrorKind::Exists => {
                let a = fs.lookup(dirid, name).map_err(map_err)?;
                if a.kind != InodeKind::File {
                    return Err(nfsstat3::NFS3ERR_EXIST);
                }
                Self::check_setattr(&a, &cred, &attr)?;
                self.writes.drain(a.ino).await;
                let set = set_attr(&attr);
                let a = if is_empty(&set) { a } else { fs.setattr(a.ino, set).await.map_err(map_err)? };
                return Ok((a.ino, self.fattr(&a)));
            }
            Err(e) => return Err(map_err(e)),
        };
        let a = if is_empty(&set) { created } else { fs.setattr(created.ino, set).await.map_err(map_err)? };
        Ok((a.ino, self.fattr(&a)))
    }

    async fn do_readdir(&self, dirid: fileid3, start_after: fileid3, max: usize) -> Result<ReadDirResult, nfsstat3> {
        let cred = self.cred()?;
        let fs = self.fs()?;
        exports::check(&fs.getattr(dirid).map_err(map_err)?, &cred, R)?;
        let after = if start_after == 0 { None } else { Some(self.cookie_name(&fs, dirid, start_after)?) };
        let (list, end) = fs.readdir(dirid, after.as_deref(), max.max(1)).map_err(map_err)?;
        self.remember(dirid, &list);
        let entries = list
            .iter()
            .map(|e| DirEntry { fileid: e.attr.ino, name: e.name.clone().into(), attr: self.fattr_now(&e.attr) })
            .collect();
        Ok(ReadDirResult { entries, end })
    }
}

#[async_trait]
impl NFSFileSystem for TidepoolNfs {
    fn capabilities(&self) -> VFSCapabilities {
        if self.exports.read_only { VFSCapabilities::ReadOnly } else { VFSCapabilities::ReadWrite }
    }

    fn admit(&self, caller: &Caller) -> Result<(), nfsstat3> {
        if self.exports.admits(caller) {
            Ok(())
        } else {
            self.metrics.op("refused", "ACCES");
            tracing::debug!(peer = %caller.peer, "nfs: client address not in nfs_allowed_clients");
            Err(nfsstat3::NFS3ERR_ACCES)
        }
    }

    async fn access(&self, id: fileid3, requested: u32) -> Result<u32, nfsstat3> {
        let r = async {
            let cred = self.cred()?;
            let a = self.fs()?.getattr(id).map_err(map_err)?;
            Ok(exports::access_bits(&a, &cred, requested, self.exports.read_only))
        }
        .await;
        self.count("access", r)
    }

    async fn write_stable(
        &self,
        id: fileid3,
        offset: u64,
        data: &[u8],
        stable: StableHow,
    ) -> Result<(fattr3, StableHow), nfsstat3> {
        let unstable = stable == StableHow::Unstable;
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            let a = fs.getattr(id).map_err(map_err)?;
            match a.kind {
                InodeKind::File => {}
                InodeKind::Dir => return Err(nfsstat3::NFS3ERR_ISDIR),
                InodeKind::Symlink => return Err(nfsstat3::NFS3ERR_INVAL),
            }
            Self::check_data(&a, &cred, W)?;
            if unstable {
                // Refused now, not at COMMIT: a spun-down fs takes no writes.
                if fs.is_read_only() {
                    return Err(nfsstat3::NFS3ERR_ROFS);
                }
                self.writes.submit(fs.clone(), id, offset, data.to_vec()).await?;
                let mut f = self.fattr_now(&a);
                f.size = f.size.max(offset + data.len() as u64);
                return Ok((f, StableHow::Unstable));
            }
            // A stable write lands after the unstable ones before it, and reports their errors.
            self.writes.sync(id).await?;
            let a = fs.write(id, offset, data).await.map_err(map_err)?;
            Ok((self.fattr_now(&a), StableHow::FileSync))
        }
        .await;
        self.count(if unstable { "write_unstable" } else { "write" }, r)
    }

    async fn commit(&self, id: fileid3, _offset: u64, _count: u32) -> Result<fattr3, nfsstat3> {
        let r = async {
            let fs = self.fs()?;
            // Every pending write of the file, whatever its range: each is durable once done.
            self.writes.sync(id).await?;
            fs.getattr(id).map(|a| self.fattr(&a)).map_err(map_err)
        }
        .await;
        self.count("commit", r)
    }

    fn write_verifier(&self) -> writeverf3 {
        self.verifier
    }

    async fn fsstat(&self, _id: fileid3) -> Result<FsStat, nfsstat3> {
        let r = self.fs().map(|fs| {
            let st = fs.stat();
            let used_files = st.files + st.dirs + st.symlinks;
            // No inode table: an inode costs metadata only, so the free figure is nominal.
            let free_files = if self.exports.read_only { 0 } else { FREE_FILES };
            FsStat {
                tbytes: st.capacity_bytes,
                fbytes: st.free_bytes,
                abytes: if self.exports.read_only || fs.is_read_only() { 0 } else { st.free_bytes },
                tfiles: used_files + FREE_FILES,
                ffiles: free_files,
                afiles: free_files,
                invarsec: 0,
            }
        });
        self.count("fsstat", r)
    }

    fn root_dir(&self) -> fileid3 {
        ROOT_INO
    }

    async fn lookup(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        let r = async {
            let cred = self.cred()?;
            let fs = self.fs()?;
            let dir = fs.getattr(dirid).map_err(map_err)?;
            if dir.kind != InodeKind::Dir {
                return Err(nfsstat3::NFS3ERR_NOTDIR);
            }
            exports::check(&dir, &cred, X)?;
            match &filename.0[..] {
                b"." => Ok(dirid),
                b".." => fs.getattr(dirid).map(|a| a.parent).map_err(map_err),
                name => fs.lookup(dirid, name).map(|a| a.ino).map_err(map_err),
            }
        }
        .await;
        self.count("lookup", r)
    }

    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        let r = self.fs().and_then(|fs| fs.getattr(id).map(|a| self.fattr_now(&a)).map_err(map_err));
        self.count("getattr", r)
    }

    async fn setattr(&self, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            Self::check_setattr(&fs.getattr(id).map_err(map_err)?, &cred, &setattr)?;
            self.writes.sync(id).await?;
            let set = set_attr(&setattr);
            let a = if is_empty(&set) { fs.getattr(id) } else { fs.setattr(id, set).await }.map_err(map_err)?;
            Ok(self.fattr(&a))
        }
        .await;
        self.count("setattr", r)
    }

    async fn read(&self, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.read_with_attr(id, offset, count).await.0
    }

    /// READ with the reply's attributes from the one lookup the read makes anyway (after the
    /// file's pending UNSTABLE writes, if any, are drained).
    async fn read_with_attr(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> (Result<(Vec<u8>, bool), nfsstat3>, post_op_attr) {
        let mut attr = post_op_attr::Void;
        let r = async {
            let fs = self.fs()?;
            let mut a = fs.getattr(id).map_err(map_err)?;
            attr = post_op_attr::attributes(self.fattr_now(&a));
            let cred = self.cred()?;
            Self::check_data(&a, &cred, R)?;
            // The attributes after the pending writes: the size for eof, the stamp for read-ahead.
            if self.writes.drain(id).await {
                a = fs.getattr(id).map_err(map_err)?;
                attr = post_op_attr::attributes(self.fattr_now(&a));
            }
            if a.kind != InodeKind::File {
                return Err(if a.kind == InodeKind::Dir { nfsstat3::NFS3ERR_ISDIR } else { nfsstat3::NFS3ERR_INVAL });
            }
            let data = self.readahead.read(&fs, &a, offset, count as usize).await.map_err(map_err)?;
            let eof = offset + data.len() as u64 >= a.size;
            Ok((data, eof))
        }
        .await;
        (self.count("read", r), attr)
    }

    /// A stable write (the RPC layer calls [`NFSFileSystem::write_stable`]).
    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        self.write_stable(id, offset, data, StableHow::FileSync).await.map(|(a, _)| a)
    }

    async fn create(&self, dirid: fileid3, filename: &filename3, attr: sattr3) -> Result<(fileid3, fattr3), nfsstat3> {
        let r = self.do_create(dirid, &filename.0, attr).await;
        self.count("create", r)
    }

    /// The verifier is kept in the new file's xattrs: a retransmitted CREATE (same name, same
    /// verifier) answers the file it made. Create and verifier are two commits: if the server
    /// dies between them, the retransmission answers EXIST.
    async fn create_exclusive(
        &self,
        dirid: fileid3,
        filename: &filename3,
        verf: createverf3,
    ) -> Result<fileid3, nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            self.check_dir_change(&fs, dirid, &cred)?;
            let hex: String = verf.iter().map(|b| format!("{b:02x}")).collect();
            match fs.create(dirid, &filename.0, FILE_MODE, cred.uid, cred.gid).await {
                Ok(a) => {
                    fs.set_xattr(a.ino, CREATE_VERF_XATTR, &hex).await.map_err(map_err)?;
                    Ok(a.ino)
                }
                Err(e) if e.kind() == ErrorKind::Exists => {
                    let a = fs.lookup(dirid, &filename.0).map_err(map_err)?;
                    match fs.get_xattr(a.ino, CREATE_VERF_XATTR).map_err(map_err)? {
                        Some(v) if v == hex && a.kind == InodeKind::File => Ok(a.ino),
                        _ => Err(nfsstat3::NFS3ERR_EXIST),
                    }
                }
                Err(e) => Err(map_err(e)),
            }
        }
        .await;
        self.count("create_exclusive", r)
    }

    async fn mkdir(&self, dirid: fileid3, dirname: &filename3, attr: &sattr3) -> Result<(fileid3, fattr3), nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            self.check_dir_change(&fs, dirid, &cred)?;
            let mut set = set_attr(attr);
            let mode = set.mode.take().unwrap_or(DIR_MODE);
            let (uid, gid) = Self::owner(&cred, &mut set)?;
            let a = fs.mkdir(dirid, &dirname.0, mode, uid, gid).await.map_err(map_err)?;
            let a = if is_empty(&set) { a } else { fs.setattr(a.ino, set).await.map_err(map_err)? };
            Ok((a.ino, self.fattr(&a)))
        }
        .await;
        self.count("mkdir", r)
    }

    /// nfsserve 0.11 sends both REMOVE and RMDIR here: the entry's kind decides.
    async fn remove(&self, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            self.check_dir_change(&fs, dirid, &cred)?;
            let a = fs.lookup(dirid, &filename.0).map_err(map_err)?;
            if a.kind == InodeKind::Dir {
                fs.rmdir(dirid, &filename.0).await.map_err(map_err)
            } else {
                fs.unlink(dirid, &filename.0).await.map_err(map_err)
            }
        }
        .await;
        self.count("remove", r)
    }

    async fn rename(
        &self,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            self.check_dir_change(&fs, from_dirid, &cred)?;
            self.check_dir_change(&fs, to_dirid, &cred)?;
            fs.rename(from_dirid, &from_filename.0, to_dirid, &to_filename.0).await.map_err(map_err)
        }
        .await;
        self.count("rename", r)
    }

    async fn readdir(
        &self,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let r = self.do_readdir(dirid, start_after, max_entries).await;
        self.count("readdir", r)
    }

    async fn symlink(
        &self,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let r = async {
            let cred = self.writer()?;
            let fs = self.fs()?;
            self.check_dir_change(&fs, dirid, &cred)?;
            let (uid, gid) = Self::owner(&cred, &mut set_attr(attr))?;
            let a = fs.symlink(dirid, &linkname.0, &symlink.0, uid, gid).await.map_err(map_err)?;
            Ok((a.ino, self.fattr(&a)))
        }
        .await;
        self.count("symlink", r)
    }

    async fn readlink(&self, id: fileid3) -> Result<nfspath3, nfsstat3> {
        let r = self.fs().and_then(|fs| fs.readlink(id).map(Into::into).map_err(map_err));
        self.count("readlink", r)
    }

    /// nfsserve's defaults but for what tidepool knows better: files up to 2^63 bytes
    /// (nfsserve says 128 GiB), nanosecond times, 1 MiB preferred transfers, 4 KiB multiples.
    async fn fsinfo(&self, root_fileid: fileid3) -> Result<fsinfo3, nfsstat3> {
        let attrs = match self.getattr(root_fileid).await {
            Ok(a) => post_op_attr::attributes(a),
            Err(_) => post_op_attr::Void,
        };
        let r = Ok(fsinfo3 {
            obj_attributes: attrs,
            rtmax: 1 << 20,
            rtpref: 1 << 20,
            rtmult: 4096,
            wtmax: 1 << 20,
            wtpref: 1 << 20,
            wtmult: 4096,
            dtpref: 1 << 20,
            maxfilesize: i64::MAX as u64,
            time_delta: nfstime3 { seconds: 0, nseconds: 1 },
            properties: FSF_SYMLINK | FSF_HOMOGENEOUS | FSF_CANSETTIME,
        });
        self.count("fsinfo", r)
    }

    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        // An inode gone already gets generation 0, which no inode has: the handle is stale.
        let generation = self.fs().ok().and_then(|fs| fs.getattr(id).ok()).map(|a| a.generation).unwrap_or(0);
        handle::encode(self.fsid, id, generation)
    }

    fn fh_to_id(&self, fh: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        let (ino, generation) = handle::decode(self.fsid, fh)?;
        let fs = self.fs()?;
        match fs.getattr(ino) {
            Ok(a) if a.generation == generation => Ok(ino),
            Ok(_) => Err(nfsstat3::NFS3ERR_STALE),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(nfsstat3::NFS3ERR_STALE),
            Err(e) => Err(map_err(e)),
        }
    }
}
