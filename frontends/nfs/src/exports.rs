//! The export's access rules: which client addresses may mount and call (a CIDR list),
//! read-only, root squash, and the POSIX permission check every call makes with the caller's
//! AUTH_SYS credentials (after squashing).

use std::net::IpAddr;
use std::str::FromStr;

use nfsserve::nfs::{
    ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY, ACCESS3_READ, nfsstat3,
};
use nfsserve::vfs::Caller;
use tidepool_fs::{FileAttr, InodeKind};

/// An address block, `10.0.0.0/8`, `127.0.0.1/32`, `::1/128` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("not an IP address: {a}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            if p.is_empty() { max } else { p.trim().parse().map_err(|_| format!("bad prefix length: {p}"))? };
        if prefix > max {
            return Err(format!("prefix length {prefix} over {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How the one export (`/`) is shared.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Client addresses allowed to MOUNT and call; anyone else is refused (MNT3ERR_ACCES at
    /// MOUNT, NFS3ERR_ACCES on every NFS call). Empty: nobody.
    pub allowed_clients: Vec<Cidr>,
    /// Every change answers NFS3ERR_ROFS; ACCESS grants only READ, LOOKUP and EXECUTE.
    pub read_only: bool,
    /// Map uid 0 (and gid 0) of a caller to `anon_uid` / `anon_gid`.
    pub root_squash: bool,
    /// Who a squashed root, or an AUTH_NULL caller, is.
    pub anon_uid: u32,
    pub anon_gid: u32,
}

impl Default for ExportOptions {
    /// Loopback clients only, read-write, no root squash (the namespace's folders made
    /// through S3 are owned by root), anonymous = 65534 (nobody / nogroup).
    fn default() -> Self {
        ExportOptions {
            allowed_clients: vec!["127.0.0.0/8".parse().expect("literal"), "::1/128".parse().expect("literal")],
            read_only: false,
            root_squash: false,
            anon_uid: 65534,
            anon_gid: 65534,
        }
    }
}

/// The credentials a call acts with, after squashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub gids: Vec<u32>,
}

impl Cred {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.gids.contains(&gid)
    }
}

impl ExportOptions {
    pub fn admits(&self, caller: &Caller) -> bool {
        self.allowed_clients.iter().any(|c| c.contains(caller.peer.ip()))
    }

    /// The caller's credentials: AUTH_SYS as sent, root squashed if asked; AUTH_NULL (or
    /// another flavor) is the anonymous user.
    pub fn cred(&self, caller: &Caller) -> Cred {
        let anon = Cred { uid: self.anon_uid, gid: self.anon_gid, gids: Vec::new() };
        let Some(a) = &caller.auth else { return anon };
        if self.root_squash && a.uid == 0 {
            return anon;
        }
        let squash_gid = |g: u32| if self.root_squash && g == 0 { self.anon_gid } else { g };
        Cred { uid: a.uid, gid: squash_gid(a.gid), gids: a.gids.iter().map(|g| squash_gid(*g)).collect() }
    }
}

/// rwx bits of `attr` that apply to `cred` (owner, group or other), as 0o4/0o2/0o1.
fn class_bits(attr: &FileAttr, cred: &Cred) -> u32 {
    if cred.uid == attr.uid {
        (attr.mode >> 6) & 7
    } else if cred.in_group(attr.gid) {
        (attr.mode >> 3) & 7
    } else {
        attr.mode & 7
    }
}

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

/// May `cred` use `want` (R|W|X) on `attr`? Root may do anything but execute a file that has
/// no execute bit at all.
pub fn allowed(attr: &FileAttr, cred: &Cred, want: u32) -> bool {
    if cred.is_root() {
        let any_x = attr.mode & 0o111 != 0 || attr.kind == InodeKind::Dir;
        return want & X == 0 || any_x;
    }
    class_bits(attr, cred) & want == want
}

/// `Ok` if `cred` has `want` on `attr`, else NFS3ERR_ACCES.
pub fn check(attr: &FileAttr, cred: &Cred, want: u32) -> Result<(), nfsstat3> {
    if allowed(attr, cred, want) { Ok(()) } else { Err(nfsstat3::NFS3ERR_ACCES) }
}

/// ACCESS: the granted subset of `requested`.
pub fn access_bits(attr: &FileAttr, cred: &Cred, requested: u32, read_only: bool) -> u32 {
    let mut granted = 0;
    let can = |want| allowed(attr, cred, want);
    let dir = attr.kind == InodeKind::Dir;
    if can(R) {
        granted |= ACCESS3_READ;
    }
    if dir && can(X) {
        granted |= ACCESS3_LOOKUP;
    }
    if !dir && can(X) {
        granted |= ACCESS3_EXECUTE;
    }
    if !read_only && can(W) {
        granted |= ACCESS3_MODIFY | ACCESS3_EXTEND;
        if dir {
            granted |= ACCESS3_DELETE;
        }
    }
    granted & requested
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_match() {
        let c: Cidr = "127.0.0.2/32".parse().unwrap();
        assert!(c.contains("127.0.0.2".parse().unwrap()));
        assert!(!c.contains("127.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.2".parse().unwrap()));
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()) && !n.contains("10.2.0.1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()) && !v6.contains("fe80::1".parse().unwrap()));
        assert_eq!("192.168.1.7".parse::<Cidr>().unwrap().to_string(), "192.168.1.7/32");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nope/8".parse::<Cidr>().is_err());
    }
}
