//! A minimal NFSv3 client (ONC RPC over one TCP connection, AUTH_UNIX as root) for what
//! libnfs's command-line tools cannot do: symlinks (SYMLINK, READLINK), writes at an offset
//! (files with holes), SETATTR (mode, owner, size, mtime) and GETATTR with nanosecond times.
//! Only the calls the spin test uses, XDR by hand from RFC 1813 (NFSv3, MOUNTv3), RFC 5531
//! (RPC) and RFC 4506 (XDR): independent of the server's own codec (nfsserve).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NFS_PROG: u32 = 100_003;
const MOUNT_PROG: u32 = 100_005;
const V3: u32 = 3;
/// Largest READ / WRITE this client sends (the server's rtmax / wtmax are 1 MiB).
const IO_BYTES: usize = 1 << 20;

pub const NF3REG: u32 = 1;
pub const NF3DIR: u32 = 2;
pub const NF3LNK: u32 = 5;

/// `fattr3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ftype: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub used: u64,
    pub fsid: u64,
    pub fileid: u64,
    pub atime: (u32, u32),
    pub mtime: (u32, u32),
    pub ctime: (u32, u32),
}

/// What a SETATTR (or the attributes of a CREATE / MKDIR / SYMLINK) sets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Set {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// (seconds, nanoseconds), set as the client's time.
    pub mtime: Option<(u32, u32)>,
}

pub type Fh = Vec<u8>;

struct Enc(Vec<u8>);

impl Enc {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
    fn sattr(&mut self, s: &Set) -> &mut Self {
        for v in [s.mode, s.uid, s.gid] {
            match v {
                Some(v) => self.u32(1).u32(v),
                None => self.u32(0),
            };
        }
        match s.size {
            Some(n) => self.u32(1).u64(n),
            None => self.u32(0),
        };
        self.u32(0); // atime: DONT_CHANGE
        match s.mtime {
            Some((sec, ns)) => self.u32(2).u32(sec).u32(ns), // SET_TO_CLIENT_TIME
            None => self.u32(0),
        }
    }
}

struct Dec<'a> {
    b: &'a [u8],
    p: usize,
}

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let s = self.b.get(self.p..self.p + n).ok_or_else(|| format!("reply too short at byte {}", self.p))?;
        self.p += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bool(&mut self) -> Result<bool, String> {
        Ok(self.u32()? != 0)
    }
    fn time(&mut self) -> Result<(u32, u32), String> {
        Ok((self.u32()?, self.u32()?))
    }
    fn opaque(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        let v = self.take(n)?.to_vec();
        self.take(n.next_multiple_of(4) - n)?;
        Ok(v)
    }
    fn fattr(&mut self) -> Result<Attr, String> {
        let (ftype, mode, nlink, uid, gid) = (self.u32()?, self.u32()?, self.u32()?, self.u32()?, self.u32()?);
        let (size, used) = (self.u64()?, self.u64()?);
        self.take(8)?; // rdev
        let (fsid, fileid) = (self.u64()?, self.u64()?);
        let (atime, mtime, ctime) = (self.time()?, self.time()?, self.time()?);
        Ok(Attr { ftype, mode, nlink, uid, gid, size, used, fsid, fileid, atime, mtime, ctime })
    }
    fn post_op_attr(&mut self) -> Result<Option<Attr>, String> {
        if self.bool()? { Ok(Some(self.fattr()?)) } else { Ok(None) }
    }
    fn wcc_data(&mut self) -> Result<(), String> {
        if self.bool()? {
            self.take(24)?; // wcc_attr: size, mtime, ctime
        }
        self.post_op_attr()?;
        Ok(())
    }
    /// The `nfsstat3` that starts every NFS result: `Err` names a failure.
    fn status(&mut self, what: &str) -> Result<(), String> {
        match self.u32()? {
            0 => Ok(()),
            s => Err(format!("{what}: NFS3ERR {s}")),
        }
    }
}

pub struct Nfs {
    sock: TcpStream,
    xid: u32,
    pub root: Fh,
}

impl Nfs {
    /// Connects to `127.0.0.1:port` (MOUNT and NFS on one port) and mounts the export `/`.
    pub fn connect(port: u16) -> Result<Nfs, String> {
        let sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        sock.set_nodelay(true).unwrap();
        let mut nfs = Nfs { sock, xid: 0x5350_0000, root: Vec::new() };
        let mut a = Enc(Vec::new());
        a.opaque(b"/");
        let res = nfs.call(MOUNT_PROG, 1, &a.0)?;
        let mut d = Dec { b: &res, p: 0 };
        match d.u32()? {
            0 => {}
            s => return Err(format!("MNT /: mountstat3 {s}")),
        }
        nfs.root = d.opaque()?;
        Ok(nfs)
    }

    /// One call; the result's bytes after an accepted, successful reply header.
    fn call(&mut self, prog: u32, proc_: u32, args: &[u8]) -> Result<Vec<u8>, String> {
        self.xid += 1;
        let mut m = Enc(Vec::new());
        m.u32(self.xid).u32(0).u32(2).u32(prog).u32(V3).u32(proc_);
        let mut cred = Enc(Vec::new());
        cred.u32(0).opaque(b"spin-e2e").u32(0).u32(0).u32(0); // stamp, machine, uid 0, gid 0, no gids
        m.u32(1).opaque(&cred.0); // AUTH_UNIX
        m.u32(0).u32(0); // verifier: AUTH_NULL
        m.0.extend_from_slice(args);
        let mut rec = (0x8000_0000u32 | m.0.len() as u32).to_be_bytes().to_vec();
        rec.extend_from_slice(&m.0);
        self.sock.write_all(&rec).map_err(|e| format!("send: {e}"))?;
        let mut reply = Vec::new();
        loop {
            let mut h = [0u8; 4];
            self.sock.read_exact(&mut h).map_err(|e| format!("receive: {e}"))?;
            let h = u32::from_be_bytes(h);
            let start = reply.len();
            reply.resize(start + (h & 0x7fff_ffff) as usize, 0);
            self.sock.read_exact(&mut reply[start..]).map_err(|e| format!("receive: {e}"))?;
            if h & 0x8000_0000 != 0 {
                break;
            }
        }
        let mut d = Dec { b: &reply, p: 0 };
        let (xid, mtype, stat) = (d.u32()?, d.u32()?, d.u32()?);
        if xid != self.xid || mtype != 1 || stat != 0 {
            return Err(format!("rpc reply xid={xid} (sent {}) type={mtype} reply_stat={stat}", self.xid));
        }
        d.u32()?; // verifier flavor
        d.opaque()?;
        match d.u32()? {
            0 => Ok(reply[d.p..].to_vec()),
            s => Err(format!("rpc accept_stat {s} (prog {prog} proc {proc_})")),
        }
    }

    pub fn getattr(&mut self, fh: &[u8]) -> Result<Attr, String> {
        let mut a = Enc(Vec::new());
        a.opaque(fh);
        let r = self.call(NFS_PROG, 1, &a.0)?;
        let mut d = Dec { b: &r, p: 0 };
        d.status("GETATTR")?;
        d.fattr()
    }

    pub fn setattr(&mut self, fh: &[u8], s: &Set) -> Result<(), String> {
        let mut a = Enc(Vec::new());
        a.opaque(fh).sattr(s).u32(0); // no guard
        let r = self.call(NFS_PROG, 2, &a.0)?;
        Dec { b: &r, p: 0 }.status("SETATTR")
    }

    pub fn lookup(&mut self, dir: &[u8], name: &str) -> Result<Fh, String> {
        let mut a = Enc(Vec::new());
        a.opaque(dir).opaque(name.as_bytes());
        let r = self.call(NFS_PROG, 3, &a.0)?;
        let mut d = Dec { b: &r, p: 0 };
        d.status(&format!("LOOKUP {name}"))?;
        d.opaque()
    }

    /// The handle of an absolute path (`/a/b/c`).
    pub fn resolve(&mut self, path: &str) -> Result<Fh, String> {
        let mut fh = self.root.clone();
        for name in path.split('/').filter(|s| !s.is_empty()) {
            fh = self.lookup(&fh, name).map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(fh)
    }

    pub fn readlink(&mut self, fh: &[u8]) -> Result<Vec<u8>, String> {
        let mut a = Enc(Vec::new());
        a.opaque(fh);
        let r = self.call(NFS_PROG, 5, &a.0)?;
        let mut d = Dec { b: &r, p: 0 };
        d.status("READLINK")?;
        d.post_op_attr()?;
        d.opaque()
    }

    /// The whole file, READ by READ until eof.
    pub fn read_all(&mut self, fh: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let mut a = Enc(Vec::new());
            a.opaque(fh).u64(out.len() as u64).u32(IO_BYTES as u32);
            let r = self.call(NFS_PROG, 6, &a.0)?;
            let mut d = Dec { b: &r, p: 0 };
            d.status(&format!("READ at {}", out.len()))?;
            d.post_op_attr()?;
            let _count = d.u32()?;
            let eof = d.bool()?;
            let data = d.opaque()?;
            if data.is_empty() && !eof {
                return Err(format!("READ at {}: no data and no eof", out.len()));
            }
            out.extend_from_slice(&data);
            if eof {
                return Ok(out);
            }
        }
    }

    /// WRITEs `data` at `offset`, FILE_SYNC, in pieces the server takes.
    pub fn write(&mut self, fh: &[u8], offset: u64, data: &[u8]) -> Result<(), String> {
        let mut done = 0;
        while done < data.len() {
            let piece = &data[done..(done + IO_BYTES).min(data.len())];
            let mut a = Enc(Vec::new());
            a.opaque(fh).u64(offset + done as u64).u32(piece.len() as u32).u32(2).opaque(piece);
            let r = self.call(NFS_PROG, 7, &a.0)?;
            let mut d = Dec { b: &r, p: 0 };
            d.status(&format!("WRITE at {}", offset + done as u64))?;
            d.wcc_data()?;
            let n = d.u32()? as usize;
            if n == 0 {
                return Err("WRITE wrote nothing".into());
            }
            done += n;
        }
        Ok(())
    }

    /// CREATE (UNCHECKED) / MKDIR / SYMLINK answer the same way: the new handle.
    fn created(&mut self, what: &str, dir: &[u8], name: &str, r: &[u8]) -> Result<Fh, String> {
        let mut d = Dec { b: r, p: 0 };
        d.status(&format!("{what} {name}"))?;
        if d.bool()? {
            return d.opaque();
        }
        self.lookup(dir, name)
    }

    pub fn create(&mut self, dir: &[u8], name: &str, s: &Set) -> Result<Fh, String> {
        let mut a = Enc(Vec::new());
        a.opaque(dir).opaque(name.as_bytes()).u32(0).sattr(s);
        let r = self.call(NFS_PROG, 8, &a.0)?;
        self.created("CREATE", dir, name, &r)
    }

    pub fn mkdir(&mut self, dir: &[u8], name: &str, s: &Set) -> Result<Fh, String> {
        let mut a = Enc(Vec::new());
        a.opaque(dir).opaque(name.as_bytes()).sattr(s);
        let r = self.call(NFS_PROG, 9, &a.0)?;
        self.created("MKDIR", dir, name, &r)
    }

    pub fn symlink(&mut self, dir: &[u8], name: &str, target: &str) -> Result<Fh, String> {
        let mut a = Enc(Vec::new());
        a.opaque(dir).opaque(name.as_bytes()).sattr(&Set::default()).opaque(target.as_bytes());
        let r = self.call(NFS_PROG, 10, &a.0)?;
        self.created("SYMLINK", dir, name, &r)
    }
}
