//! The price table: `deploy/pricing.toml` (embedded) with a user's file merged over it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CostError, EMBEDDED_ORIGIN, EMBEDDED_PRICING};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Aws,
    Azure,
}

impl Cloud {
    pub(super) fn default_storage(self) -> &'static str {
        match self {
            Cloud::Aws => "s3_standard",
            Cloud::Azure => "azure_hot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePrice {
    pub cloud: Cloud,
    pub hourly_usd: f64,
    /// Local NVMe of one instance.
    pub nvme_bytes: u64,
    pub gpus: u32,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePrice {
    /// Whose object store: decides how a large object is split into requests.
    pub cloud: Cloud,
    /// Per 10^9 bytes a month.
    pub gb_month_usd: f64,
    pub put_per_1000_usd: f64,
    pub get_per_1000_usd: f64,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    pub as_of: String,
    pub basis: String,
    pub instances: BTreeMap<String, InstancePrice>,
    pub storage: BTreeMap<String, StoragePrice>,
    /// Where the figures came from (the embedded table, plus a file merged over it).
    pub origin: String,
}

impl PriceTable {
    /// The embedded table (`deploy/pricing.toml`).
    pub fn embedded() -> Result<Self, CostError> {
        Self::merged(&[(EMBEDDED_ORIGIN, EMBEDDED_PRICING)])
    }

    /// The embedded table with `text` (from `origin`) merged over it: top-level strings
    /// replace, an entry of the same name has the fields given replaced, a new entry is added
    /// (and must then be complete).
    pub fn with_override(origin: &str, text: &str) -> Result<Self, CostError> {
        Self::merged(&[(EMBEDDED_ORIGIN, EMBEDDED_PRICING), (origin, text)])
    }

    fn merged(layers: &[(&str, &str)]) -> Result<Self, CostError> {
        let mut merged = toml::Table::new();
        for (origin, text) in layers {
            let bad = |message: String| CostError::Pricing { origin: (*origin).to_owned(), message };
            let layer: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.to_string()))?;
            for (key, value) in layer {
                match (key.as_str(), value) {
                    ("as_of" | "basis", v @ toml::Value::String(_)) => {
                        merged.insert(key, v);
                    }
                    ("instances" | "storage", toml::Value::Table(entries)) => {
                        let section = merged.entry(key.clone()).or_insert_with(|| toml::Table::new().into());
                        let section = section.as_table_mut().expect("sections are only ever inserted as tables");
                        for (name, entry) in entries {
                            let toml::Value::Table(fields) = entry else {
                                return Err(bad(format!("[{key}.{name}] must be a table")));
                            };
                            let slot = section.entry(name).or_insert_with(|| toml::Table::new().into());
                            let slot = slot.as_table_mut().expect("entries are only ever inserted as tables");
                            slot.extend(fields);
                        }
                    }
                    ("as_of" | "basis" | "instances" | "storage", v) => {
                        return Err(bad(format!("{key} must be a {}, not {}", shape(&key), v.type_str())));
                    }
                    (_, _) => {
                        return Err(bad(format!("unknown key {key} (known: as_of, basis, instances, storage)")));
                    }
                }
            }
        }
        let origin = layers.iter().map(|(o, _)| *o).collect::<Vec<_>>().join(" + ");
        let last = layers.last().map_or(EMBEDDED_ORIGIN, |(o, _)| *o).to_owned();
        let bad = |message: String| CostError::Pricing { origin: last.clone(), message };
        let string = |key: &str| merged.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let instances = decode_section::<InstancePrice>(&merged, "instances", &bad)?;
        let storage = decode_section::<StoragePrice>(&merged, "storage", &bad)?;
        for (name, p) in &instances {
            check_price(&bad, "instances", name, "hourly_usd", p.hourly_usd)?;
        }
        for (name, p) in &storage {
            check_price(&bad, "storage", name, "gb_month_usd", p.gb_month_usd)?;
            check_price(&bad, "storage", name, "put_per_1000_usd", p.put_per_1000_usd)?;
            check_price(&bad, "storage", name, "get_per_1000_usd", p.get_per_1000_usd)?;
        }
        Ok(PriceTable { as_of: string("as_of"), basis: string("basis"), instances, storage, origin })
    }

    pub fn instance(&self, name: &str) -> Result<&InstancePrice, CostError> {
        self.instances.get(name).ok_or_else(|| CostError::UnknownInstance {
            name: name.to_owned(),
            known: self.instances.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn storage(&self, name: &str) -> Result<&StoragePrice, CostError> {
        self.storage.get(name).ok_or_else(|| CostError::UnknownStorage {
            name: name.to_owned(),
            known: self.storage.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }
}

fn shape(key: &str) -> &'static str {
    if key == "as_of" || key == "basis" { "string" } else { "table" }
}

fn decode_section<T: serde::de::DeserializeOwned>(
    merged: &toml::Table,
    section: &str,
    bad: &impl Fn(String) -> CostError,
) -> Result<BTreeMap<String, T>, CostError> {
    let Some(entries) = merged.get(section).and_then(|v| v.as_table()) else {
        return Ok(BTreeMap::new());
    };
    entries
        .iter()
        .map(|(name, v)| {
            let decoded =
                v.clone().try_into::<T>().map_err(|e| bad(format!("[{section}.\"{name}\"]: {}", e.message())))?;
            Ok((name.clone(), decoded))
        })
        .collect()
}

fn check_price(
    bad: &impl Fn(String) -> CostError,
    section: &str,
    name: &str,
    field: &str,
    v: f64,
) -> Result<(), CostError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(bad(format!("[{section}.\"{name}\"] {field} must be a price of at least 0 value={v}")))
    }
}
