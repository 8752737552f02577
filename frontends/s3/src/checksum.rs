//! Additional checksums (`x-amz-checksum-*`: CRC32, CRC32C, CRC64NVME, SHA1, SHA256), as S3.
//!
//! s3s parses the checksum headers and hands over an aws-chunked body's trailers, but checks
//! neither: this module does. A PUT or part names at most one algorithm (a header, or
//! `x-amz-trailer` naming one whose value follows the body); the body is hashed while it is
//! staged ([`Hasher`]), compared before anything is published (`BadDigest`), and the value is
//! kept in the object's metadata map: `:checksum-<alg>` (base64, as S3 shows it) and
//! `:checksum-type` (`FULL_OBJECT` or `COMPOSITE`). Like the ETag, it holds only while
//! `:etag-mtime` does (a write through NFS retires it).
//!
//! A multipart upload created with an algorithm hashes every part with it; Complete gives the
//! object a COMPOSITE checksum (the hash of the parts' binary checksums, `-N`) or, for the CRCs,
//! a FULL_OBJECT one (the parts' CRCs combined without reading the data, [`crc_combine`]).

use std::collections::BTreeMap;

use hyper::HeaderMap;
use s3s::crypto::{Checksum as _, Crc32, Crc32c, Crc64Nvme, Sha1, Sha256};
use s3s::dto::{Checksum, ChecksumAlgorithm, ChecksumType};
use s3s::{S3Result, TrailingHeaders, s3_error};
use tidepool_fs::FileAttr;

use crate::meta;

/// Metadata key of the object's checksum type.
pub const TYPE_KEY: &str = ":checksum-type";
/// Prefix of the metadata key holding the value (`:checksum-crc32c`).
const KEY_PREFIX: &str = ":checksum-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Alg {
    pub const ALL: [Alg; 5] = [Alg::Crc32, Alg::Crc32c, Alg::Crc64Nvme, Alg::Sha1, Alg::Sha256];

    /// Lower-case name, as in header names (`crc64nvme`).
    pub fn name(self) -> &'static str {
        match self {
            Alg::Crc32 => "crc32",
            Alg::Crc32c => "crc32c",
            Alg::Crc64Nvme => "crc64nvme",
            Alg::Sha1 => "sha1",
            Alg::Sha256 => "sha256",
        }
    }

    /// Upper-case name, as in `x-amz-checksum-algorithm` and messages.
    pub fn upper(self) -> &'static str {
        match self {
            Alg::Crc32 => ChecksumAlgorithm::CRC32,
            Alg::Crc32c => ChecksumAlgorithm::CRC32C,
            Alg::Crc64Nvme => ChecksumAlgorithm::CRC64NVME,
            Alg::Sha1 => ChecksumAlgorithm::SHA1,
            Alg::Sha256 => ChecksumAlgorithm::SHA256,
        }
    }

    pub fn parse(s: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(s))
    }

    pub fn from_dto(a: &ChecksumAlgorithm) -> S3Result<Alg> {
        Alg::parse(a.as_str())
            .ok_or_else(|| s3_error!(InvalidRequest, "Checksum algorithm {:?} is not supported.", a.as_str()))
    }

    pub fn dto(self) -> ChecksumAlgorithm {
        ChecksumAlgorithm::from_static(self.upper())
    }

    fn digest_len(self) -> usize {
        match self {
            Alg::Crc32 | Alg::Crc32c => 4,
            Alg::Crc64Nvme => 8,
            Alg::Sha1 => 20,
            Alg::Sha256 => 32,
        }
    }

    pub fn is_crc(self) -> bool {
        matches!(self, Alg::Crc32 | Alg::Crc32c | Alg::Crc64Nvme)
    }

    /// The type an upload created with this algorithm and no `x-amz-checksum-type` gets, as S3.
    pub fn default_multipart_type(self) -> &'static str {
        if self == Alg::Crc64Nvme { ChecksumType::FULL_OBJECT } else { ChecksumType::COMPOSITE }
    }

    pub fn header(self) -> String {
        format!("x-amz-checksum-{}", self.name())
    }

    pub fn key(self) -> String {
        format!("{KEY_PREFIX}{}", self.name())
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Alg::Crc32 => Hasher::Crc32(Crc32::new()),
            Alg::Crc32c => Hasher::Crc32c(Crc32c::new()),
            Alg::Crc64Nvme => Hasher::Crc64Nvme(Crc64Nvme::new()),
            Alg::Sha1 => Hasher::Sha1(Sha1::new()),
            Alg::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finalize()
    }

    /// `Checksum` (the five response fields) with this algorithm's field set to `value`.
    pub fn fields(self, value: String) -> Checksum {
        let mut c = Checksum::default();
        *field_mut(&mut c, self) = Some(value);
        c
    }
}

/// The field of `a` in a `Checksum`.
pub fn field(c: &Checksum, a: Alg) -> Option<&String> {
    match a {
        Alg::Crc32 => c.checksum_crc32.as_ref(),
        Alg::Crc32c => c.checksum_crc32c.as_ref(),
        Alg::Crc64Nvme => c.checksum_crc64nvme.as_ref(),
        Alg::Sha1 => c.checksum_sha1.as_ref(),
        Alg::Sha256 => c.checksum_sha256.as_ref(),
    }
}

fn field_mut(c: &mut Checksum, a: Alg) -> &mut Option<String> {
    match a {
        Alg::Crc32 => &mut c.checksum_crc32,
        Alg::Crc32c => &mut c.checksum_crc32c,
        Alg::Crc64Nvme => &mut c.checksum_crc64nvme,
        Alg::Sha1 => &mut c.checksum_sha1,
        Alg::Sha256 => &mut c.checksum_sha256,
    }
}

/// One algorithm's running hash.
pub enum Hasher {
    Crc32(Crc32),
    Crc32c(Crc32c),
    Crc64Nvme(Crc64Nvme),
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(data),
            Hasher::Crc32c(h) => h.update(data),
            Hasher::Crc64Nvme(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    pub fn finalize(self) -> Vec<u8> {
        match self {
            Hasher::Crc32(h) => h.finalize().to_vec(),
            Hasher::Crc32c(h) => h.finalize().to_vec(),
            Hasher::Crc64Nvme(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// The checksum a client asks to be checked on a body.
#[derive(Debug, Clone)]
pub struct Requested {
    pub alg: Alg,
    /// The value from the header; `None` when it comes as a trailer after the body.
    value: Option<Vec<u8>>,
}

/// The checksum a PutObject or UploadPart asks for: at most one `x-amz-checksum-<alg>` header
/// (`given`, as s3s parsed them), or `x-amz-trailer: x-amz-checksum-<alg>`; with
/// `x-amz-sdk-checksum-algorithm` naming the same algorithm if sent. Checked before the body is
/// read, so a malformed value costs no upload.
pub fn requested(
    given: &Checksum,
    sdk: Option<&ChecksumAlgorithm>,
    headers: &HeaderMap,
) -> S3Result<Option<Requested>> {
    let mut found: Vec<(Alg, &String)> = Alg::ALL.into_iter().filter_map(|a| field(given, a).map(|v| (a, v))).collect();
    if found.len() > 1 {
        return Err(s3_error!(
            InvalidRequest,
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
        ));
    }
    let trailer = match headers.get("x-amz-trailer") {
        None => None,
        Some(v) => {
            let names = v.to_str().map_err(|_| s3_error!(InvalidRequest, "x-amz-trailer is not valid"))?;
            let algs: Vec<Alg> = names
                .split(',')
                .filter_map(|n| n.trim().to_ascii_lowercase().strip_prefix("x-amz-checksum-").map(str::to_owned))
                .map(|n| {
                    Alg::parse(&n)
                        .ok_or_else(|| s3_error!(InvalidRequest, "The trailer x-amz-checksum-{n} is not supported."))
                })
                .collect::<S3Result<_>>()?;
            if algs.len() > 1 || (algs.len() == 1 && !found.is_empty()) {
                return Err(s3_error!(
                    InvalidRequest,
                    "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
                ));
            }
            algs.first().copied()
        }
    };
    let req = match (found.pop(), trailer) {
        (Some((alg, v)), _) => Requested { alg, value: Some(decode_value(alg, v)?) },
        (None, Some(alg)) => Requested { alg, value: None },
        (None, None) => {
            return match sdk {
                Some(a) => Err(s3_error!(
                    InvalidRequest,
                    "x-amz-sdk-checksum-algorithm specified, but no corresponding x-amz-checksum-* or x-amz-trailer headers were found. ({})",
                    a.as_str()
                )),
                None => Ok(None),
            };
        }
    };
    if let Some(a) = sdk
        && Alg::from_dto(a)? != req.alg
    {
        return Err(s3_error!(
            InvalidRequest,
            "Value for x-amz-sdk-checksum-algorithm header ({}) does not match the x-amz-checksum- header sent ({}).",
            a.as_str(),
            req.alg.upper()
        ));
    }
    Ok(Some(req))
}

/// A base64 checksum value of `alg` as bytes, or `InvalidRequest` as S3 answers a bad one.
fn decode_value(alg: Alg, v: &str) -> S3Result<Vec<u8>> {
    base64_decode(v.trim())
        .filter(|b| b.len() == alg.digest_len())
        .ok_or_else(|| s3_error!(InvalidRequest, "Value for x-amz-checksum-{} header is invalid.", alg.name()))
}

/// Check the digest computed over the body against what the client sent (the header, or the
/// trailer now that the body is read). Returns the value to store and answer (base64).
pub fn verify(req: &Requested, trailers: Option<&TrailingHeaders>, computed: &[u8]) -> S3Result<String> {
    let sent = match &req.value {
        Some(v) => v.clone(),
        None => {
            let header = req.alg.header();
            let v = trailers
                .and_then(|t| t.read(|h| h.get(&header).and_then(|v| v.to_str().ok()).map(str::to_owned)))
                .flatten()
                .ok_or_else(|| {
                    s3_error!(
                        InvalidRequest,
                        "The x-amz-trailer header names {header}, but the body had no such trailer."
                    )
                })?;
            decode_value(req.alg, &v)?
        }
    };
    if sent != computed {
        return Err(bad_digest(req.alg));
    }
    Ok(crate::object::base64(computed))
}

pub fn bad_digest(alg: Alg) -> s3s::S3Error {
    s3_error!(BadDigest, "The {} you specified did not match the calculated checksum.", alg.upper())
}

/// An object's stored checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub alg: Alg,
    /// Base64; a COMPOSITE one ends in `-<part count>`.
    pub value: String,
    pub composite: bool,
}

impl Stored {
    pub fn store(&self, x: &mut BTreeMap<String, String>) {
        x.insert(self.alg.key(), self.value.clone());
        let t = if self.composite { ChecksumType::COMPOSITE } else { ChecksumType::FULL_OBJECT };
        x.insert(TYPE_KEY.to_owned(), t.to_owned());
    }

    /// The checksum of a body whose ETag is still valid (see the module doc).
    pub fn load(attr: &FileAttr, x: &BTreeMap<String, String>) -> Option<Stored> {
        if !meta::etag_valid(attr, x) {
            return None;
        }
        let composite = x.get(TYPE_KEY)? == ChecksumType::COMPOSITE;
        Alg::ALL.into_iter().find_map(|alg| x.get(&alg.key()).map(|v| Stored { alg, value: v.clone(), composite }))
    }

    pub fn fields(&self) -> Checksum {
        self.alg.fields(self.value.clone())
    }

    pub fn checksum_type(&self) -> ChecksumType {
        ChecksumType::from_static(if self.composite { ChecksumType::COMPOSITE } else { ChecksumType::FULL_OBJECT })
    }

    /// The value as bytes (a part's checksum; parts are never composite).
    pub fn raw(&self) -> Option<Vec<u8>> {
        base64_decode(&self.value)
    }
}

/// The checksum of a multipart object from its parts' checksums (`parts`: raw digest and size).
pub fn multipart(alg: Alg, composite: bool, parts: &[(Vec<u8>, u64)]) -> Stored {
    let value = if composite {
        let mut h = alg.hasher();
        for (d, _) in parts {
            h.update(d);
        }
        format!("{}-{}", crate::object::base64(&h.finalize()), parts.len())
    } else {
        let mut crc = parts.first().map(|(d, _)| be(d)).unwrap_or(0);
        for (d, len) in &parts[1.min(parts.len())..] {
            crc = crc_combine(alg, crc, be(d), *len);
        }
        let bytes = crc.to_be_bytes();
        crate::object::base64(&bytes[8 - alg.digest_len()..])
    };
    Stored { alg, value, composite }
}

fn be(d: &[u8]) -> u64 {
    d.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b))
}

/// The CRC of `A || B` from `crc(A)`, `crc(B)` and `len(B)`: zlib's `crc32_combine` (GF(2)
/// matrix squaring), for the reflected CRCs with all-ones init and final xor that S3 uses.
pub fn crc_combine(alg: Alg, crc1: u64, crc2: u64, mut len2: u64) -> u64 {
    let (poly, width): (u64, usize) = match alg {
        Alg::Crc32 => (0xEDB8_8320, 32),
        Alg::Crc32c => (0x82F6_3B78, 32),
        Alg::Crc64Nvme => (0x9A6C_9329_AC4B_C9B5, 64),
        Alg::Sha1 | Alg::Sha256 => unreachable!("only CRCs combine; callers check is_crc"),
    };
    if len2 == 0 {
        return crc1;
    }
    let times = |mat: &[u64; 64], mut vec: u64| {
        let mut sum = 0;
        let mut i = 0;
        while vec != 0 {
            if vec & 1 != 0 {
                sum ^= mat[i];
            }
            vec >>= 1;
            i += 1;
        }
        sum
    };
    let square = |sq: &mut [u64; 64], mat: &[u64; 64]| {
        for n in 0..width {
            sq[n] = times(mat, mat[n]);
        }
    };
    let (mut odd, mut even) = ([0u64; 64], [0u64; 64]);
    odd[0] = poly; // the operator for one zero bit
    for (n, row) in odd.iter_mut().enumerate().take(width).skip(1) {
        *row = 1 << (n - 1);
    }
    square(&mut even, &odd); // two zero bits
    square(&mut odd, &even); // four zero bits
    let mut crc1 = crc1;
    loop {
        // Apply len2 zero bytes to crc1 (the first square gives one zero byte).
        square(&mut even, &odd);
        if len2 & 1 != 0 {
            crc1 = times(&even, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
        square(&mut odd, &even);
        if len2 & 1 != 0 {
            crc1 = times(&odd, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
    }
    crc1 ^ crc2
}

/// Standard base64 (with padding) to bytes; `None` if malformed.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i + 1 == b.len() / 4;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\x00\x10\x80"] {
            assert_eq!(base64_decode(&crate::object::base64(data)).as_deref(), Some(data));
        }
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "===="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn known_values() {
        // The check values of each CRC ("123456789"), and S3's documented CRC32 of "" = AAAAAA==.
        assert_eq!(be(&Alg::Crc32.digest(b"123456789")), 0xCBF4_3926);
        assert_eq!(be(&Alg::Crc32c.digest(b"123456789")), 0xE306_9283);
        assert_eq!(be(&Alg::Crc64Nvme.digest(b"123456789")), 0xAE8B_1486_0A79_9888);
        assert_eq!(crate::object::base64(&Alg::Crc32.digest(b"")), "AAAAAA==");
    }

    #[test]
    fn crcs_combine_like_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        for alg in [Alg::Crc32, Alg::Crc32c, Alg::Crc64Nvme] {
            for cut in [0, 1, 7, 4096, 65_537, 99_999, 100_000] {
                let (a, b) = data.split_at(cut);
                let whole = be(&alg.digest(&data));
                let joined = crc_combine(alg, be(&alg.digest(a)), be(&alg.digest(b)), b.len() as u64);
                assert_eq!(joined, whole, "{alg:?} cut at {cut}");
            }
            let parts: Vec<(Vec<u8>, u64)> = data.chunks(30_000).map(|c| (alg.digest(c), c.len() as u64)).collect();
            let full = multipart(alg, false, &parts);
            assert_eq!(base64_decode(&full.value).unwrap(), alg.digest(&data), "{alg:?}");
        }
    }

    #[test]
    fn composite_is_the_hash_of_the_part_hashes() {
        let parts: Vec<(Vec<u8>, u64)> =
            [&b"abc"[..], b"defg"].iter().map(|p| (Alg::Sha256.digest(p), p.len() as u64)).collect();
        let mut cat = parts[0].0.clone();
        cat.extend_from_slice(&parts[1].0);
        let c = multipart(Alg::Sha256, true, &parts);
        assert_eq!(c.value, format!("{}-2", crate::object::base64(&Alg::Sha256.digest(&cat))));
    }
}
