//! File handles: `[version 1][fsid u64][ino u64][generation u64]`, little-endian, 25 bytes.

use nfsserve::nfs::{nfs_fh3, nfsstat3};

const VERSION: u8 = 1;
const LEN: usize = 25;

/// A filesystem id from the cluster id: two crc32c halves (stable across releases, unlike
/// std's hasher).
pub fn fsid(cluster_id: &str) -> u64 {
    let b = cluster_id.as_bytes();
    let lo = crc32c::crc32c(b) as u64;
    let hi = crc32c::crc32c_append(0x7469_6465, b) as u64;
    (hi << 32) | lo
}

pub fn encode(fsid: u64, ino: u64, generation: u64) -> nfs_fh3 {
    let mut data = Vec::with_capacity(LEN);
    data.push(VERSION);
    data.extend_from_slice(&fsid.to_le_bytes());
    data.extend_from_slice(&ino.to_le_bytes());
    data.extend_from_slice(&generation.to_le_bytes());
    nfs_fh3 { data }
}

/// `(ino, generation)` of a handle of filesystem `fsid`. Not ours in shape: BADHANDLE;
/// another filesystem's: STALE.
pub fn decode(fsid: u64, fh: &nfs_fh3) -> Result<(u64, u64), nfsstat3> {
    let d = &fh.data;
    if d.len() != LEN || d[0] != VERSION {
        return Err(nfsstat3::NFS3ERR_BADHANDLE);
    }
    let word = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
    if word(1) != fsid {
        return Err(nfsstat3::NFS3ERR_STALE);
    }
    Ok((word(9), word(17)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let f = fsid("abc");
        assert_ne!(f, fsid("abd"));
        let h = encode(f, 42, 7);
        assert_eq!(h.data.len(), LEN);
        assert_eq!(decode(f, &h).unwrap(), (42, 7));
        assert!(matches!(decode(fsid("other"), &h), Err(nfsstat3::NFS3ERR_STALE)));
        assert!(matches!(decode(f, &nfs_fh3 { data: vec![0; 16] }), Err(nfsstat3::NFS3ERR_BADHANDLE)));
    }
}
