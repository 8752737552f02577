//! Object ids, object kinds and the bucket keys they make.

use std::fmt;

/// Names one chunk or pack object: a random 128-bit value chosen by the uploader.
/// Displayed as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ObjectId(pub u128);

/// What an object holds, which decides its key's first component and its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ObjectKind {
    /// Consecutive blocks of one large file.
    Chunk,
    /// Blocks of many small files.
    Pack,
}

impl ObjectKind {
    /// The key's first component: `chunks` or `packs`.
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunks",
            ObjectKind::Pack => "packs",
        }
    }

    fn from_dir(dir: &str) -> Option<Self> {
        match dir {
            "chunks" => Some(ObjectKind::Chunk),
            "packs" => Some(ObjectKind::Pack),
            _ => None,
        }
    }
}

impl ObjectId {
    /// A fresh id: the creation time (unix milliseconds) in the top 48 bits, 80 random bits
    /// below. GC tells young objects by it (`created_unix_ms`): an object a deposed leader is
    /// still recording must not be swept as an orphan by the new one.
    pub fn random() -> Self {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let low: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
        ObjectId((u128::from(ms & ((1 << 48) - 1)) << 80) | low)
    }

    /// The creation time [`ObjectId::random`] put in the id (unix milliseconds). Ids made
    /// before it did are random there: they read as some time between 1970 and 10889.
    pub fn created_unix_ms(&self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// A fresh id from `rng`, for tests and simulations that seed their randomness.
    pub fn from_rng<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        ObjectId(rng.r#gen())
    }

    /// The two-hex-digit partition prefix: the low byte of crc32c of the id's little-endian bytes.
    pub fn hash_prefix(self) -> u8 {
        // Truncation intended: the low byte is the prefix.
        crc32c::crc32c(&self.0.to_le_bytes()) as u8
    }

    /// The object's key relative to the store's prefix: `chunks/<xx>/<id>` or `packs/<xx>/<id>`.
    pub fn key(self, kind: ObjectKind) -> String {
        format!("{}/{:02x}/{self}", kind.dir(), self.hash_prefix())
    }

    /// The kind and id named by a key that [`ObjectId::key`] made; `None` for any other key
    /// (another folder, upper-case or short hex, a hash prefix that does not match the id).
    pub fn parse_key(key: &str) -> Option<(ObjectKind, ObjectId)> {
        let mut parts = key.split('/');
        let kind = ObjectKind::from_dir(parts.next()?)?;
        let prefix = parts.next()?;
        let id = parts.next()?;
        if parts.next().is_some() || prefix.len() != 2 || id.len() != 32 || !is_lower_hex(prefix) || !is_lower_hex(id) {
            return None;
        }
        let id = ObjectId(u128::from_str_radix(id, 16).ok()?);
        let prefix = u8::from_str_radix(prefix, 16).ok()?;
        (prefix == id.hash_prefix()).then_some((kind, id))
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}
