//! The block store's tables in the catalog (redb, ACID, one file `catalog.redb`).
//!
//! | table | key | value |
//! |---|---|---|
//! | `volumes` | volume id (u64) | [`VolumeRecord`] as JSON |
//! | `volume_names` | `"<owner>/<name>"` | volume id |
//! | `layers` | layer id (u64) | [`LayerRecord`] as JSON |
//! | `store_meta` | key | u64 (`next_id`, `format_version`) |
//!
//! Records are JSON so fields can be added compatibly; `format_version` guards incompatible
//! changes. Ids are never reused, so a new volume never sees another's files.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

pub const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
pub const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new("volume_names");
pub const LAYERS: TableDefinition<u64, &[u8]> = TableDefinition::new("layers");
pub const STORE_META: TableDefinition<&str, u64> = TableDefinition::new("store_meta");

pub const FORMAT_VERSION: u64 = 1;
pub const KEY_NEXT_ID: &str = "next_id";
pub const KEY_FORMAT: &str = "format_version";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub owner: String,
    pub name: String,
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Layer ids, head first.
    pub layers: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub id: u64,
    /// Volumes whose chains include this layer (shared by clones later).
    pub users: Vec<u64>,
}

pub fn name_key(owner: &str, name: &str) -> String {
    format!("{owner}/{name}")
}
