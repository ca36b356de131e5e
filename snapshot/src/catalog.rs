//! The block store's tables in the catalog (redb, ACID, one file `catalog.redb`).
//!
//! | table | key | value |
//! |---|---|---|
//! | `volumes` | volume id (u64) | [`VolumeRecord`] as JSON |
//! | `volume_names` | `"<owner>/<name>"` | volume id |
//! | `layers` | layer id (u64) | [`LayerRecord`] as JSON |
//! | `snapshots` | snapshot id (u64) | [`SnapshotRecord`] as JSON |
//! | `snapshot_names` | `"<volume id>/<name>"` | snapshot id |
//! | `store_meta` | key | u64 (`next_id`, `format_version`) |
//!
//! Layers form a forest through `parent` links: a volume's chain is its head layer followed by
//! the head's ancestors. A layer lives while something refers to it: a volume (as its head), a
//! snapshot, or a child layer. Records are JSON so fields can be added compatibly;
//! `format_version` guards incompatible changes (version 1 had one layer per volume and is
//! migrated at open). Ids are never reused, so a new volume never sees another's files.

use redb::{ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

pub const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
pub const VOLUME_NAMES: TableDefinition<&str, u64> = TableDefinition::new("volume_names");
pub const LAYERS: TableDefinition<u64, &[u8]> = TableDefinition::new("layers");
pub const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
pub const SNAPSHOT_NAMES: TableDefinition<&str, u64> = TableDefinition::new("snapshot_names");
pub const STORE_META: TableDefinition<&str, u64> = TableDefinition::new("store_meta");

/// 1: one layer per volume (`VolumeRecord.layers`, `LayerRecord.users`). 2: layer forest,
/// snapshots.
pub const FORMAT_VERSION: u64 = 2;
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
    /// The writable layer; the chain follows its parents.
    #[serde(default)]
    pub head: u64,
    /// Format 1 only: the layers, head first (read by the migration, never written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LayerRecord {
    pub id: u64,
    /// The next layer down the chain.
    #[serde(default)]
    pub parent: Option<u64>,
    /// Layers whose parent this is.
    #[serde(default)]
    pub children: Vec<u64>,
    /// The volume whose head this is.
    #[serde(default)]
    pub head_of: Option<u64>,
    /// Snapshots that are this layer frozen.
    #[serde(default)]
    pub snapshots: Vec<u64>,
    /// Format 1 only: volumes using the layer (read by the migration, never written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<u64>,
}

impl LayerRecord {
    /// Nothing refers to the layer: its record and files can go.
    pub fn unreferenced(&self) -> bool {
        self.head_of.is_none() && self.snapshots.is_empty() && self.children.is_empty()
    }

    /// Hidden (no volume or snapshot shows it directly) and below exactly one layer: its blocks
    /// can be merged into that child and the layer dropped from the chain.
    pub fn merge_candidate(&self) -> Option<u64> {
        match self.children.as_slice() {
            [c] if self.head_of.is_none() && self.snapshots.is_empty() => Some(*c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: u64,
    pub volume: u64,
    pub name: String,
    /// The frozen layer holding the snapshot's newest blocks (its chain is the snapshot).
    pub layer: u64,
    /// Volume size when the snapshot was taken.
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// Name of the group snapshot this was taken in, if any.
    #[serde(default)]
    pub group: Option<String>,
}

pub fn name_key(owner: &str, name: &str) -> String {
    format!("{owner}/{name}")
}

pub fn snapshot_key(volume: u64, name: &str) -> String {
    format!("{volume}/{name}")
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: what.to_string(), why: e.to_string() })
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("catalog records serialise")
}

/// Reads a record from a `u64 → JSON` table.
pub fn get<T: serde::de::DeserializeOwned>(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    what: &str,
) -> Result<Option<T>, StoreError> {
    match t.get(id)? {
        Some(v) => Ok(Some(decode(v.value(), what)?)),
        None => Ok(None),
    }
}

/// Reads a record that must exist.
pub fn must<T: serde::de::DeserializeOwned>(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
    what: &str,
) -> Result<T, StoreError> {
    get(t, id, what)?
        .ok_or_else(|| StoreError::Corrupt { what: "catalog".into(), why: format!("{what} {id} is missing") })
}

pub fn put<T: Serialize>(t: &mut Table<u64, &'static [u8]>, id: u64, v: &T) -> Result<(), StoreError> {
    t.insert(id, encode(v).as_slice())?;
    Ok(())
}

/// The chain that starts at `layer`, top first.
pub fn chain(t: &impl ReadableTable<u64, &'static [u8]>, layer: u64) -> Result<Vec<u64>, StoreError> {
    let mut out = vec![layer];
    let mut cur: LayerRecord = must(t, layer, "layer")?;
    while let Some(p) = cur.parent {
        if out.contains(&p) || out.len() > 1_000_000 {
            return Err(StoreError::Corrupt { what: "catalog".into(), why: format!("layer chain loops at {p}") });
        }
        out.push(p);
        cur = must(t, p, "layer")?;
    }
    Ok(out)
}

/// Removes every layer among `candidates` (and, in turn, their ancestors) that nothing refers
/// to any more. Returns the ids whose files can be unlinked once the transaction commits.
pub fn collect_garbage(
    layers: &mut Table<u64, &'static [u8]>,
    mut candidates: Vec<u64>,
) -> Result<Vec<u64>, StoreError> {
    let mut doomed = Vec::new();
    while let Some(id) = candidates.pop() {
        let Some(rec) = get::<LayerRecord>(layers, id, "layer")? else { continue };
        if !rec.unreferenced() {
            continue;
        }
        layers.remove(id)?;
        doomed.push(id);
        if let Some(p) = rec.parent {
            if let Some(mut pr) = get::<LayerRecord>(layers, p, "layer")? {
                pr.children.retain(|c| *c != id);
                put(layers, p, &pr)?;
                candidates.push(p);
            }
        }
    }
    Ok(doomed)
}
