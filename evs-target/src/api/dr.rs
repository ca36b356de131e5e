//! Disaster recovery (sDRS): protection groups replicating servers to another AZ's daemon.
//!
//! A group lives on both daemons (`dr_groups`: `"<tenant>/<group>"` → [`GroupRecord`] as
//! JSON), with role `source` on one and `target` on the other; `dr_replicas` marks the target's
//! replica volumes (volume id → group key): hidden from `volume list`, refused for attach,
//! writes, snapshots and deletes by users.
//!
//! **A cycle** (source, every `interval` seconds, one at a time per group):
//! 1. a hidden group snapshot `.dr-<group>-<seq>` of every pair volume (one instant; found
//!    again by name when an interrupted cycle is redone);
//! 2. per pair, the changed extents since `.dr-<group>-<point>` (the last point the target
//!    acknowledged; a pair not yet in a point sends its allocated extents: the initial sync),
//!    cut into frames (`evs-replicator`), zstd-compressed, CRC32C-checked, throttled to the
//!    group's bandwidth, streamed to the target's `ReplicationService.Apply`;
//! 3. the target rolls its replicas back to its point (dropping whatever an interrupted cycle
//!    left), applies the frames, flushes, and commits `.dr-<group>-<seq>` on the replicas in one
//!    transaction: its new consistent point; then answers;
//! 4. the source records the point and drops its older snapshot.
//!
//! So the target always holds a complete consistent point (the snapshot), and a cycle cut off
//! anywhere (link, kill -9 of either side) is redone from the last acknowledged point. If the
//! source lost its acknowledgement (killed after the target committed), the target's point is
//! one the source still has a snapshot of, and the source adopts it.
//!
//! **Switchover**: writes stopped (attachments revoked, attach refused), a final cycle, the
//! target promoted (replicas become volumes at the final point), the source demoted (its
//! volumes become replicas at the same point): the direction is reversed with nothing lost.
//! **Failover** (on the target, the source gone): replicas rolled back to the last point and
//! promoted. **Reprotect** (on the new source): the old source rolls back to the last common
//! point and becomes the target; cycles then send only what changed since that point.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evs_proto::v1 as pb;
use evs_proto::v1::replication_service_client::ReplicationServiceClient;
use evs_replicator::{plan_ranges, BlockSource, CycleStats, FrameEncoder, Throttle};
use evs_snapshot::{StoreError, Volume};
use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::validate::{validate_group_name, validate_server_name, ValidationError};
use super::{ApiError, ControlPlane};
use crate::jobs::{JobContext, JobError, JobKind, JobRecord};

pub(super) const DR_GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("dr_groups");
pub(super) const DR_REPLICAS: TableDefinition<u64, &str> = TableDefinition::new("dr_replicas");

/// Prefix of the hidden snapshots that are a group's points.
const POINT_PREFIX: &str = ".dr-";
/// Default seconds between cycles.
pub const DEFAULT_INTERVAL: u64 = 5;
/// Metadata key naming the group of a node-to-node call (`<tenant on the receiver>/<group>`).
pub const GROUP_HEADER: &str = "x-evs-group";

/// What the DR side of the control plane needs.
pub struct DrContext {
    /// The daemon's runtime: worker threads block on gRPC calls through it.
    pub rt: tokio::runtime::Handle,
    pub az: String,
    /// Where peers reach this daemon's API (for the reverse direction), e.g. http://HOST:PORT.
    pub self_endpoint: String,
    /// One cycle (or role change) at a time per group.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    throttles: Mutex<HashMap<String, Arc<Throttle>>>,
    /// Groups whose next cycle should not wait for the interval.
    wake: Mutex<Vec<String>>,
    /// Bytes of volume data the running cycle of each group has sent so far.
    progress: Mutex<HashMap<String, u64>>,
    /// Servers (`tenant/server`) a `protect` is adding to a group (the value) right now: the
    /// check that a server is in no other group and the record that puts it in this one are
    /// apart by a call to the peer, and two protects into two groups each hold only their own
    /// group's lock.
    protecting: Mutex<HashMap<String, String>>,
    /// How long a peer's call waits for the group's lock before it answers busy
    /// ([`ControlPlane::with_group_locked`]).
    pub peer_lock_wait: std::time::Duration,
}

/// A peer's call waits this long for a group's lock: well under the callers' 300 s RPC
/// timeout, so a call that gives up has changed nothing, and two daemons that each hold their
/// own lock while calling the other (a cycle against a delete on the target) both get an
/// answer instead of waiting for each other.
pub const PEER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl DrContext {
    pub fn new(rt: tokio::runtime::Handle, az: String, self_endpoint: String) -> DrContext {
        DrContext {
            rt,
            az,
            self_endpoint,
            locks: Mutex::new(HashMap::new()),
            throttles: Mutex::new(HashMap::new()),
            wake: Mutex::new(Vec::new()),
            progress: Mutex::new(HashMap::new()),
            protecting: Mutex::new(HashMap::new()),
            peer_lock_wait: PEER_LOCK_WAIT,
        }
    }
}

/// A server claimed by one `protect` until it returns ([`DrContext::claim_server`]).
struct ServerClaim<'a> {
    dr: &'a DrContext,
    key: String,
}

impl Drop for ServerClaim<'_> {
    fn drop(&mut self) {
        self.dr.protecting.lock().remove(&self.key);
    }
}

impl DrContext {
    /// Claims `server` of `tenant` for a protect into `group`; fails while another protect
    /// holds it.
    fn claim_server(&self, tenant: &str, server: &str, group: &str) -> Result<ServerClaim<'_>, ApiError> {
        let key = format!("{tenant}/{server}");
        let mut p = self.protecting.lock();
        if let Some(other) = p.get(&key) {
            return Err(ApiError::BeingProtected { server: server.to_string(), group: other.clone() });
        }
        p.insert(key.clone(), group.to_string());
        Ok(ServerClaim { dr: self, key })
    }
}

impl std::fmt::Debug for DrContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrContext").field("az", &self.az).field("self_endpoint", &self.self_endpoint).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRecord {
    pub server: String,
    /// The volume's name, the same on both sides.
    pub volume: String,
    /// The volume (source) or replica (target) on this daemon.
    pub volume_id: u64,
    pub size: u64,
    #[serde(default)]
    pub tier: String,
    /// The first point that holds this pair (None: its initial sync is still to come).
    #[serde(default)]
    pub since_seq: Option<u64>,
    /// Initial sync progress (bytes of the first cycle that carries it).
    #[serde(default)]
    pub synced_bytes: u64,
    /// What the acknowledged cycles sent of this pair (source side): encoded bytes on the
    /// wire, and the bytes of volume data they described.
    #[serde(default)]
    pub bytes_transferred: u64,
    #[serde(default)]
    pub bytes_replicated: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub v: u32,
    pub name: String,
    pub role: Role,
    pub peer_endpoint: String,
    pub peer_az: String,
    /// The tenant that owns the group on the peer (names may differ across AZs).
    pub peer_tenant: String,
    /// The group's shared secret, hex (256 bits).
    pub secret: String,
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
    pub interval: u64,
    #[serde(default)]
    pub bandwidth: u64,
    pub enabled: bool,
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub pairs: Vec<PairRecord>,
    /// The last consistent point both sides hold.
    #[serde(default)]
    pub point_seq: u64,
    #[serde(default)]
    pub point_ms: u64,
    /// The point the running (or interrupted) cycle makes, and when its snapshot was taken.
    #[serde(default)]
    pub pending: Option<(u64, u64)>,
    #[serde(default)]
    pub bytes_transferred: u64,
    #[serde(default)]
    pub bytes_replicated: u64,
    #[serde(default)]
    pub cycles: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the last cycle started (unix ms; after a failure, when it failed): the next one is
    /// due an interval later, so cycles shorter than the interval start on a fixed beat and the
    /// RPO stays under the interval plus one cycle.
    #[serde(default)]
    pub last_cycle_ms: u64,
    /// Promoted by a failover: the peer is not replicated to until `reprotect`.
    #[serde(default)]
    pub failed_over: bool,
    #[serde(default)]
    pub switching: bool,
    /// Drill volumes on the target: (replica volume, drill volume id).
    #[serde(default)]
    pub drill: Vec<(String, u64)>,
    pub created: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(super) fn group_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

pub(super) fn point_name(group: &str, seq: u64) -> String {
    format!("{POINT_PREFIX}{group}-{seq}")
}

fn decode(bytes: &[u8]) -> Result<GroupRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { what: "DR group record".into(), why: e.to_string() })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Adds the group secret and name to every node-to-node call.
#[derive(Clone)]
pub struct GroupAuth {
    bearer: MetadataValue<Ascii>,
    group: MetadataValue<Ascii>,
}

impl Interceptor for GroupAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.bearer.clone());
        req.metadata_mut().insert(GROUP_HEADER, self.group.clone());
        Ok(req)
    }
}

pub type PeerClient = ReplicationServiceClient<InterceptedService<Channel, GroupAuth>>;

/// A channel to a peer's API (TLS with `ca` when the endpoint is https).
pub(super) async fn peer_channel(endpoint: &str, ca: Option<&str>) -> Result<Channel, ApiError> {
    let mut ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| ApiError::Peer(format!("invalid peer endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(300))
        .initial_stream_window_size(Some(evs_proto::STREAM_WINDOW))
        .initial_connection_window_size(Some(evs_proto::CONNECTION_WINDOW));
    if endpoint.starts_with("https://") {
        let ca = ca.ok_or_else(|| ApiError::Peer(format!("{endpoint} is https: give the CA certificate")))?;
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| ApiError::Peer(format!("TLS to {endpoint}: {e}")))?;
    }
    ep.connect().await.map_err(|e| ApiError::Peer(format!("cannot reach the peer at {endpoint}: {}", chain(&e))))
}

/// An error with its causes, on one line (tonic's top-level "transport error" says nothing).
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A status from the peer as our error.
pub(super) fn peer_status(what: &str, s: tonic::Status) -> ApiError {
    ApiError::Peer(format!("{what}: the peer answered {:?}: {}", s.code(), s.message()))
}

/// Reads of a pair's snapshot for the frame encoder.
struct PointSource(Vec<Arc<Volume>>);

impl BlockSource for PointSource {
    fn read(&self, pair: u16, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let v = self.0.get(pair as usize).ok_or_else(|| std::io::Error::other("no such pair"))?;
        v.read_at(offset, buf).map_err(std::io::Error::other)
    }
}

impl ControlPlane {
    pub(super) fn dr(&self) -> Result<&DrContext, ApiError> {
        self.dr.as_deref().ok_or(ApiError::Unsupported("disaster recovery on this daemon"))
    }

    pub(super) fn group_lock(&self, key: &str) -> Result<Arc<Mutex<()>>, ApiError> {
        Ok(self.dr()?.locks.lock().entry(key.to_string()).or_default().clone())
    }

    /// Runs a peer's call `f` on the group's record read under its lock: what `f` checks (the
    /// point, the drill) holds while it acts, because an apply, a cycle or another peer call
    /// of the group waits for the lock. (A record read before the lock went stale: a drill
    /// named a point that a commit in between had just replaced and deleted.) The wait is
    /// bounded ([`DrContext::peer_lock_wait`]): then the call fails with
    /// [`ApiError::GroupBusy`] and changes nothing.
    pub(super) fn with_group_locked<T>(
        &self,
        tenant: &str,
        name: &str,
        f: impl FnOnce(&GroupRecord) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let lock = self.group_lock(&group_key(tenant, name))?;
        let Some(_l) = lock.try_lock_for(self.dr()?.peer_lock_wait) else {
            return Err(ApiError::GroupBusy(name.to_string()));
        };
        f(&self.group_record(tenant, name)?)
    }

    pub(super) fn group_record(&self, tenant: &str, name: &str) -> Result<GroupRecord, ApiError> {
        validate_group_name(name)?;
        self.group_by_key(&group_key(tenant, name))?.ok_or_else(|| ApiError::GroupNotFound(name.to_string()))
    }

    pub(super) fn group_by_key(&self, key: &str) -> Result<Option<GroupRecord>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(DR_GROUPS)?;
        t.get(key)?.map(|v| decode(v.value())).transpose()
    }

    pub(super) fn put_group(&self, tenant: &str, g: &GroupRecord) -> Result<(), StoreError> {
        // Test builds: a catalog write that fails (FAILPOINTS="dr-group-save=1*return->off").
        fail::fail_point!("dr-group-save", |_| Err(StoreError::Catalog("injected fault (dr-group-save)".into())));
        let bytes = serde_json::to_vec(g).map_err(|e| StoreError::Catalog(e.to_string()))?;
        let w = self.store.catalog().begin_write()?;
        w.open_table(DR_GROUPS)?.insert(group_key(tenant, &g.name).as_str(), bytes.as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// Applies `f` to the stored record and stores it again, in one catalog write transaction:
    /// redb runs one at a time, so two updates of a group (a cycle's new point, a `dr disable`
    /// that does not wait for the cycle's lock) never lose one another.
    pub(super) fn update_group(
        &self,
        tenant: &str,
        name: &str,
        f: impl FnOnce(&mut GroupRecord),
    ) -> Result<GroupRecord, ApiError> {
        validate_group_name(name)?;
        let key = group_key(tenant, name);
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        let g = {
            let mut t = w.open_table(DR_GROUPS).map_err(StoreError::from)?;
            let stored = t.get(key.as_str()).map_err(StoreError::from)?.map(|v| decode(v.value())).transpose()?;
            let mut g = stored.ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
            f(&mut g);
            let bytes = serde_json::to_vec(&g).map_err(|e| StoreError::Catalog(e.to_string()))?;
            t.insert(key.as_str(), bytes.as_slice()).map_err(StoreError::from)?;
            g
        };
        w.commit().map_err(StoreError::from)?;
        Ok(g)
    }

    /// (tenant, record) of every group.
    pub(super) fn all_groups(&self) -> Result<Vec<(String, GroupRecord)>, StoreError> {
        let r = self.store.catalog().begin_read()?;
        let t = r.open_table(DR_GROUPS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let tenant = k.value().split_once('/').map_or("", |(t, _)| t).to_string();
            out.push((tenant, decode(v.value())?));
        }
        Ok(out)
    }

    pub(super) fn set_replica(&self, volume_id: u64, key: Option<&str>) -> Result<(), StoreError> {
        let w = self.store.catalog().begin_write()?;
        {
            let mut t = w.open_table(DR_REPLICAS)?;
            match key {
                Some(k) => {
                    t.insert(volume_id, k)?;
                }
                None => {
                    t.remove(volume_id)?;
                }
            }
        }
        w.commit()?;
        Ok(())
    }

    /// The group a replica volume belongs to.
    pub(super) fn replica_of(&self, volume_id: u64) -> Option<String> {
        let r = self.store.catalog().begin_read().ok()?;
        let t = r.open_table(DR_REPLICAS).ok()?;
        t.get(volume_id).ok()?.map(|g| g.value().to_string())
    }

    /// Refuses user changes of a replica, and attaches of a volume in a switchover.
    pub(super) fn ensure_not_replica(&self, name: &str, id: u64) -> Result<(), ApiError> {
        if let Some(key) = self.replica_of(id) {
            let group = key.split_once('/').map_or(key.as_str(), |(_, g)| g).to_string();
            return Err(ApiError::Replica { name: name.to_string(), group });
        }
        Ok(())
    }

    pub(super) fn ensure_not_switching(&self, owner: &str, name: &str, id: u64) -> Result<(), ApiError> {
        let Ok(groups) = self.all_groups() else { return Ok(()) };
        for (t, g) in groups {
            if t == owner && g.switching && g.pairs.iter().any(|p| p.volume_id == id) {
                return Err(ApiError::Switching { name: name.to_string(), group: g.name });
            }
        }
        Ok(())
    }

    pub(super) fn peer_client(&self, g: &GroupRecord) -> Result<PeerClient, ApiError> {
        let dr = self.dr()?;
        let channel = dr.rt.block_on(peer_channel(&g.peer_endpoint, g.ca_cert_pem.as_deref()))?;
        let bearer =
            format!("Bearer {}", g.secret).parse().map_err(|_| ApiError::Internal("bad group secret".into()))?;
        let group = group_key(&g.peer_tenant, &g.name)
            .parse()
            .map_err(|_| ApiError::Internal("group name not sendable as metadata".into()))?;
        Ok(ReplicationServiceClient::with_interceptor(channel, GroupAuth { bearer, group }))
    }

    fn describe_group(&self, g: &GroupRecord) -> pb::Group {
        let now = now_ms();
        let state = self.group_state(g);
        let rpo = if g.role == Role::Source && g.point_ms > 0 && !g.failed_over {
            now.saturating_sub(g.point_ms) as f64 / 1000.0
        } else {
            0.0
        };
        let holds = |p: &PairRecord| g.point_seq > 0 && p.since_seq.is_some_and(|since| since <= g.point_seq);
        let pairs = g
            .pairs
            .iter()
            .map(|p| pb::PairStatus {
                server: p.server.clone(),
                volume: p.volume.clone(),
                state: if p.since_seq.is_none() && !g.failed_over && g.enabled {
                    "syncing".into()
                } else {
                    state.clone()
                },
                size_bytes: p.size,
                synced_bytes: if p.since_seq.is_some() { p.size } else { p.synced_bytes.min(p.size) },
                // The group's point, once it holds this pair.
                point_seq: if holds(p) { g.point_seq } else { 0 },
                point_unix_ms: if holds(p) { g.point_ms } else { 0 },
                rpo_seconds: if holds(p) { rpo } else { 0.0 },
                bytes_transferred: p.bytes_transferred,
                bytes_replicated: p.bytes_replicated,
            })
            .collect();
        pb::Group {
            name: g.name.clone(),
            role: g.role.name().into(),
            peer_endpoint: g.peer_endpoint.clone(),
            peer_az: g.peer_az.clone(),
            az: self.dr.as_ref().map(|d| d.az.clone()).unwrap_or_default(),
            interval_seconds: g.interval,
            bandwidth_limit_bytes_per_second: g.bandwidth,
            enabled: g.enabled,
            servers: g.servers.clone(),
            pairs,
            point_seq: g.point_seq,
            point_unix_ms: g.point_ms,
            rpo_seconds: rpo,
            bytes_transferred: g.bytes_transferred,
            bytes_replicated: g.bytes_replicated,
            cycles: g.cycles,
            last_error: g.last_error.clone().unwrap_or_default(),
            drill: !g.drill.is_empty(),
            state,
        }
    }

    fn group_state(&self, g: &GroupRecord) -> String {
        if g.failed_over {
            "failed-over"
        } else if g.switching {
            "switching"
        } else if g.role == Role::Source && g.last_error.is_some() {
            "error"
        } else if !g.enabled {
            "paused"
        } else if g.pairs.iter().any(|p| p.since_seq.is_none()) {
            "syncing"
        } else {
            "protected"
        }
        .to_string()
    }

    // ---- user calls ----

    #[allow(clippy::too_many_arguments)]
    pub fn create_group(
        &self,
        owner: &str,
        name: &str,
        target: &str,
        target_token: &str,
        target_az: &str,
        interval: u64,
        bandwidth: u64,
        source_endpoint: &str,
        ca: &str,
    ) -> Result<pb::Group, ApiError> {
        validate_group_name(name)?;
        if target.is_empty() || !(target.starts_with("http://") || target.starts_with("https://")) {
            return Err(ValidationError::Endpoint(target.to_string()).into());
        }
        if target_token.trim().is_empty() {
            return Err(
                ValidationError::Dr("--target-token is required (the tenant's token on the target)".into()).into()
            );
        }
        let interval = if interval == 0 { DEFAULT_INTERVAL } else { interval };
        if interval > 86_400 {
            return Err(ValidationError::Dr(format!("interval {interval} s is more than a day")).into());
        }
        let dr = self.dr()?;
        let _g = self.mutations.lock();
        if self.group_record(owner, name).is_ok() {
            return Err(ApiError::GroupExists(name.to_string()));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| ApiError::Internal(format!("OS random number generator: {e}")))?;
        let secret = hex(&secret);
        let self_endpoint =
            if source_endpoint.is_empty() { dr.self_endpoint.clone() } else { source_endpoint.to_string() };
        let ca = (!ca.is_empty()).then(|| ca.to_string());
        // Register on the target with the tenant's token there.
        let reply = dr.rt.block_on(async {
            let channel = peer_channel(target, ca.as_deref()).await?;
            let bearer: MetadataValue<Ascii> = format!("Bearer {}", target_token.trim())
                .parse()
                .map_err(|_| ValidationError::Dr("the target token has characters a header cannot carry".into()))?;
            let mut c = ReplicationServiceClient::new(channel);
            let mut req = tonic::Request::new(pb::RegisterGroupRequest {
                name: name.to_string(),
                secret: secret.clone(),
                source_endpoint: self_endpoint.clone(),
                source_az: dr.az.clone(),
                ca_cert_pem: ca.clone().unwrap_or_default(),
                source_tenant: owner.to_string(),
            });
            req.metadata_mut().insert("authorization", bearer);
            c.register_group(req).await.map(|r| r.into_inner()).map_err(|s| peer_status("registering the group", s))
        })?;
        let g =
            GroupRecord::new(name, Role::Source, target, &reply.az, &reply.tenant, &secret, ca, interval, bandwidth);
        // Takes the registration back when the group cannot be made here: nothing half-done.
        let undo = |g: &GroupRecord| {
            if let Ok(mut c) = self.peer_client(g) {
                let _ = dr.rt.block_on(c.unregister_group(pb::UnregisterGroupRequest { delete_replicas: true }));
            }
        };
        if !target_az.is_empty() && reply.az != target_az {
            undo(&g);
            return Err(ValidationError::Dr(format!("the target is in AZ {:?}, not {target_az:?}", reply.az)).into());
        }
        if reply.az == dr.az {
            tracing::warn!(group = name, az = %dr.az, "the DR target is in this daemon's own AZ");
        }
        if let Err(e) = self.put_group(owner, &g) {
            undo(&g);
            return Err(e.into());
        }
        tracing::info!(owner, group = name, target, target_az = %reply.az, "DR group created");
        Ok(self.describe_group(&g))
    }

    pub fn list_groups(&self, owner: &str) -> Result<Vec<pb::Group>, ApiError> {
        Ok(self.all_groups()?.into_iter().filter(|(t, _)| t == owner).map(|(_, g)| self.describe_group(&g)).collect())
    }

    /// Every group of every tenant, as status (for the metrics endpoint).
    pub fn group_statuses(&self) -> Vec<(String, pb::Group)> {
        self.all_groups().unwrap_or_default().into_iter().map(|(t, g)| (t, self.describe_group(&g))).collect()
    }

    pub fn get_group(&self, owner: &str, name: &str) -> Result<pb::Group, ApiError> {
        Ok(self.describe_group(&self.group_record(owner, name)?))
    }

    /// Deletes the group here and on the peer (the target's replicas go; source volumes stay).
    pub fn delete_group(&self, owner: &str, name: &str) -> Result<(), ApiError> {
        validate_group_name(name)?;
        let lock = self.group_lock(&group_key(owner, name))?;
        let _l = lock.lock();
        let g = self.group_record(owner, name)?;
        if !g.drill.is_empty() {
            return Err(ApiError::DrillRunning(name.to_string()));
        }
        let dr = self.dr()?;
        match self.peer_client(&g) {
            Ok(mut c) => {
                let r = dr.rt.block_on(c.unregister_group(pb::UnregisterGroupRequest { delete_replicas: true }));
                if let Err(s) = r {
                    if s.code() != tonic::Code::NotFound {
                        return Err(peer_status("removing the group on the peer", s));
                    }
                }
            }
            // A group whose peer is gone for good can still be removed here.
            Err(e) if g.failed_over => tracing::warn!(group = name, error = %e, "peer unreachable; deleting locally"),
            Err(e) => return Err(e),
        }
        self.drop_group_locally(owner, &g, g.role == Role::Target)?;
        tracing::info!(owner, group = name, "DR group deleted");
        Ok(())
    }

    /// Removes a group's record, its point snapshots, its replica marks (and, with
    /// `delete_replicas`, the replica volumes).
    pub(super) fn drop_group_locally(
        &self,
        owner: &str,
        g: &GroupRecord,
        delete_replicas: bool,
    ) -> Result<(), ApiError> {
        for p in &g.pairs {
            self.drop_points(p.volume_id, &g.name, None);
            if self.replica_of(p.volume_id).is_some() {
                self.set_replica(p.volume_id, None)?;
                if delete_replicas {
                    match self.store.delete_volume(p.volume_id) {
                        Ok(()) | Err(StoreError::VolumeNotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.volume_io.remove(p.volume_id);
                }
            }
        }
        let w = self.store.catalog().begin_write().map_err(StoreError::from)?;
        w.open_table(DR_GROUPS)
            .map_err(StoreError::from)?
            .remove(group_key(owner, &g.name).as_str())
            .map_err(StoreError::from)?;
        w.commit().map_err(StoreError::from)?;
        Ok(())
    }

    /// Deletes a volume's point snapshots of `group`, but `keep`.
    pub(super) fn drop_points(&self, volume_id: u64, group: &str, keep: Option<u64>) {
        let prefix = format!("{POINT_PREFIX}{group}-");
        let Ok(snaps) = self.store.list_snapshots(volume_id) else { return };
        for s in snaps {
            let Some(seq) = s.name.strip_prefix(prefix.as_str()).and_then(|n| n.parse::<u64>().ok()) else { continue };
            if Some(seq) != keep {
                if let Err(e) = self.store.delete_snapshot(s.id) {
                    tracing::warn!(group, snapshot = s.name, error = %e, "cannot delete an old DR point");
                }
            }
        }
    }

    /// Adds a server's volumes to a (source) group: replicas are made on the target; the job
    /// ends when they hold their first point.
    pub fn protect(&self, owner: &str, group: &str, server: &str) -> Result<(JobRecord, pb::Group), ApiError> {
        validate_server_name(server)?;
        validate_group_name(group)?;
        let lock = self.group_lock(&group_key(owner, group))?;
        let _l = lock.lock();
        let g = self.group_record(owner, group)?;
        if g.role != Role::Source || g.failed_over {
            return Err(ApiError::WrongRole { group: group.to_string(), role: g.role.name().into(), want: "source" });
        }
        if g.servers.iter().any(|s| s == server) {
            return Err(ApiError::AlreadyProtected { server: server.to_string(), group: group.to_string() });
        }
        let dr = self.dr()?;
        // Held until the group's record lists the server: a protect into another group that
        // starts meanwhile fails here, one that starts after finds it in the record below.
        let _claim = dr.claim_server(owner, server, group)?;
        for (t, other) in self.all_groups()? {
            if t == owner && other.servers.iter().any(|s| s == server) {
                return Err(ApiError::AlreadyProtected { server: server.to_string(), group: other.name });
            }
        }
        let rec = self.find_server(owner, server)?;
        let mut pairs = Vec::new();
        for id in &rec.volumes {
            let info = self.store.volume_info(*id)?;
            self.ensure_not_deleting(&info.name, *id)?;
            pairs.push(PairRecord {
                server: server.to_string(),
                volume: info.name.clone(),
                volume_id: *id,
                size: info.size,
                tier: self.tier_of(*id)?,
                since_seq: None,
                synced_bytes: 0,
                bytes_transferred: 0,
                bytes_replicated: 0,
            });
        }
        let specs: Vec<pb::PairSpec> = pairs.iter().map(PairRecord::spec).collect();
        let mut c = self.peer_client(&g)?;
        dr.rt
            .block_on(c.prepare_pairs(pb::PreparePairsRequest { pairs: specs }))
            .map_err(|s| peer_status("creating the replica volumes", s))?;
        evs_snapshot::delay_point!("dr-protect-before-record");
        let g = self.update_group(owner, group, |g| {
            g.servers.push(server.to_string());
            g.pairs.extend(pairs);
        })?;
        let job =
            self.jobs.submit(owner, JobKind::DrProtect { group: group.to_string(), server: server.to_string() })?;
        dr.wake.lock().push(group_key(owner, group));
        tracing::info!(owner, group, server, job = job.id, "server protected");
        Ok((job, self.describe_group(&g)))
    }

    pub fn unprotect(&self, owner: &str, group: &str, server: &str) -> Result<pb::Group, ApiError> {
        validate_server_name(server)?;
        validate_group_name(group)?;
        let lock = self.group_lock(&group_key(owner, group))?;
        let _l = lock.lock();
        let g = self.group_record(owner, group)?;
        if !g.servers.iter().any(|s| s == server) {
            return Err(ApiError::NotProtected { server: server.to_string(), group: group.to_string() });
        }
        let volumes: Vec<String> = g.pairs.iter().filter(|p| p.server == server).map(|p| p.volume.clone()).collect();
        let dr = self.dr()?;
        let mut c = self.peer_client(&g)?;
        dr.rt
            .block_on(c.remove_pairs(pb::RemovePairsRequest { volumes: volumes.clone() }))
            .map_err(|s| peer_status("removing the replica volumes", s))?;
        for p in g.pairs.iter().filter(|p| p.server == server) {
            self.drop_points(p.volume_id, group, None);
        }
        let g = self.update_group(owner, group, |g| {
            g.servers.retain(|s| s != server);
            g.pairs.retain(|p| p.server != server);
        })?;
        Ok(self.describe_group(&g))
    }

    pub fn set_enabled(&self, owner: &str, group: &str, enabled: bool) -> Result<pb::Group, ApiError> {
        let g = self.update_group(owner, group, |g| {
            g.enabled = enabled;
            if enabled {
                g.last_error = None;
            }
        })?;
        if enabled {
            self.dr()?.wake.lock().push(group_key(owner, group));
        }
        Ok(self.describe_group(&g))
    }

    // ---- the source's cycles ----

    /// Runs the cycles that are due (the worker's tick); returns how many ran.
    pub fn run_due_cycles(&self) -> usize {
        let Some(dr) = self.dr.as_deref() else { return 0 };
        let woken: Vec<String> = std::mem::take(&mut *dr.wake.lock());
        let groups = match self.all_groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the DR groups");
                return 0;
            }
        };
        let now = now_ms();
        let mut ran = 0;
        let cycles = |g: &GroupRecord| {
            g.role == Role::Source && g.enabled && !g.failed_over && !g.switching && !g.pairs.is_empty()
        };
        for (tenant, g) in groups {
            if !cycles(&g) {
                continue;
            }
            let key = group_key(&tenant, &g.name);
            let due = now.saturating_sub(g.last_cycle_ms) >= g.interval * 1000 || woken.contains(&key);
            if !due {
                continue;
            }
            evs_snapshot::delay_point!("dr-before-cycle-lock");
            let Ok(lock) = self.group_lock(&key) else { continue };
            let Some(_l) = lock.try_lock() else { continue };
            // Again under the lock: a `dr disable`, a switchover or a demote may have come
            // between the list and the lock.
            if !self.group_record(&tenant, &g.name).is_ok_and(|g| cycles(&g)) {
                continue;
            }
            match self.run_cycle(&tenant, &g.name) {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(tenant, group = g.name, error = %e, "replication cycle failed");
                    let _ = self.update_group(&tenant, &g.name, |g| {
                        g.last_error = Some(e.to_string());
                        g.last_cycle_ms = now_ms();
                    });
                }
            }
            ran += 1;
        }
        ran
    }

    /// One cycle of a source group (call with the group's lock held). Returns what it sent.
    pub(super) fn run_cycle(&self, tenant: &str, name: &str) -> Result<CycleStats, ApiError> {
        let dr = self.dr()?;
        let mut g = self.group_record(tenant, name)?;
        if g.pairs.is_empty() {
            return Ok(CycleStats::default());
        }
        let started = std::time::Instant::now();
        let started_ms = now_ms();
        let mut client = self.peer_client(&g)?;
        // The target's point: adopt it when our acknowledgement was lost.
        let peer = dr
            .rt
            .block_on(client.get_point(pb::GetPointRequest {}))
            .map_err(|s| peer_status("asking the target for its point", s))?
            .into_inner();
        if peer.role != "target" {
            return Err(ApiError::Peer(format!(
                "the peer of group {name} is no longer its target (it is {:?}): it failed over; run `dr reprotect` there",
                peer.role
            )));
        }
        if peer.seq != g.point_seq {
            let have =
                g.pairs.iter().all(|p| self.store.find_snapshot(p.volume_id, &point_name(name, peer.seq)).is_ok());
            if peer.seq > g.point_seq && have {
                tracing::info!(
                    group = name,
                    seq = peer.seq,
                    "adopting the target's point (our acknowledgement was lost)"
                );
                let at = g.pending.map(|(_, ms)| ms).unwrap_or(peer.point_unix_ms);
                g = self.update_group(tenant, name, |g| {
                    g.point_seq = peer.seq;
                    g.point_ms = at;
                    g.pending = None;
                    for p in g.pairs.iter_mut().filter(|p| p.since_seq.is_none()) {
                        p.since_seq = Some(peer.seq);
                    }
                })?;
            } else {
                return Err(ApiError::Peer(format!(
                    "the target holds point {} and this source {}: they diverged",
                    peer.seq, g.point_seq
                )));
            }
        }
        let seq = g.point_seq + 1;
        let snap_name = point_name(name, seq);
        // The cycle's snapshot: one instant for the whole group, found again when redone.
        let found: Vec<Option<u64>> =
            g.pairs.iter().map(|p| self.store.find_snapshot(p.volume_id, &snap_name).ok().map(|s| s.id)).collect();
        let (snaps, taken_ms) = if found.iter().all(Option::is_some) {
            (found.into_iter().flatten().collect::<Vec<u64>>(), g.pending.filter(|(s, _)| *s == seq).map(|(_, ms)| ms))
        } else {
            for (p, s) in g.pairs.iter().zip(&found) {
                if let Some(s) = s {
                    let _ = self.store.delete_snapshot(*s);
                    let _ = p;
                }
            }
            let items: Vec<(u64, String)> = g.pairs.iter().map(|p| (p.volume_id, snap_name.clone())).collect();
            let at = now_ms();
            let taken = self.store.create_snapshots(&items, Some(&snap_name))?;
            (taken.iter().map(|s| s.id).collect(), Some(at))
        };
        let taken_ms = taken_ms.unwrap_or_else(now_ms);
        g = self.update_group(tenant, name, |g| g.pending = Some((seq, taken_ms)))?;

        let views: Vec<Arc<Volume>> = snaps.iter().map(|s| self.store.open_snapshot(*s)).collect::<Result<_, _>>()?;
        let mut specs = Vec::with_capacity(g.pairs.len());
        let mut plans = Vec::with_capacity(g.pairs.len());
        for (p, v) in g.pairs.iter().zip(&views) {
            let mut spec = p.spec();
            spec.size_bytes = v.size();
            specs.push(spec);
            let base = match p.since_seq {
                Some(_) if g.point_seq > 0 => {
                    Some(self.store.find_snapshot(p.volume_id, &point_name(name, g.point_seq))?.id)
                }
                _ => None,
            };
            let snap = self.store.find_snapshot(p.volume_id, &snap_name)?.id;
            let (extents, _) = self.store.changed_extents(p.volume_id, base, Some(snap))?;
            plans.push(plan_ranges(&extents));
        }
        let planned = started.elapsed();
        let throttle = {
            let mut t = dr.throttles.lock();
            t.entry(group_key(tenant, name)).or_insert_with(|| Arc::new(Throttle::new(g.bandwidth))).clone()
        };
        // The stream: messages made on this thread, sent by the runtime.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::ApplyMessage>(4);
        let call = {
            let mut c = client.clone();
            dr.rt.spawn(async move { c.apply(tokio_stream::wrappers::ReceiverStream::new(rx)).await })
        };
        let send =
            |m: pb::ApplyMessage| tx.blocking_send(m).map_err(|_| std::io::Error::other("the target ended the stream"));
        let begin = pb::ApplyMessage {
            body: Some(pb::apply_message::Body::Begin(pb::ApplyBegin {
                seq,
                base_seq: g.point_seq,
                pairs: specs,
                point_unix_ms: taken_ms,
            })),
        };
        let mut stats = CycleStats::default();
        let encoder = FrameEncoder::default();
        let source = PointSource(views);
        let key = group_key(tenant, name);
        // Per pair (by volume id): bytes on the wire and of data, counted once acknowledged.
        let mut per_pair: Vec<(u64, u64, u64)> = Vec::with_capacity(plans.len());
        let sent = (|| -> std::io::Result<()> {
            send(begin)?;
            for (i, ranges) in plans.iter().enumerate() {
                let mut emit = |batch: Vec<u8>, s: &CycleStats| {
                    throttle.take(batch.len() as u64);
                    dr.progress.lock().insert(key.clone(), s.bytes_replicated);
                    send(pb::ApplyMessage { body: Some(pb::apply_message::Body::Frames(batch)) })
                };
                let before = stats;
                encoder.encode_pair(i as u16, ranges, &source, &mut emit, &mut stats)?;
                per_pair.push((
                    g.pairs[i].volume_id,
                    stats.bytes_sent - before.bytes_sent,
                    stats.bytes_replicated - before.bytes_replicated,
                ));
            }
            send(pb::ApplyMessage {
                body: Some(pb::apply_message::Body::Commit(pb::ApplyCommit { seq, frames: stats.frames })),
            })
        })();
        drop(tx);
        dr.progress.lock().remove(&key);
        let streamed = started.elapsed();
        let reply =
            dr.rt.block_on(call).map_err(|e| ApiError::Internal(format!("the apply call did not complete: {e}")))?;
        let applied = started.elapsed();
        let reply = match (sent, reply) {
            (_, Err(s)) => return Err(peer_status("applying the cycle on the target", s)),
            (Err(e), Ok(_)) => return Err(ApiError::Peer(format!("sending the cycle: {e}"))),
            (Ok(()), Ok(r)) => r.into_inner(),
        };
        if reply.committed_seq != seq {
            return Err(ApiError::Peer(format!("the target committed point {} instead of {seq}", reply.committed_seq)));
        }
        // Acknowledged: the new point; the old one's snapshots go.
        let old = g.point_seq;
        let g = self.update_group(tenant, name, |g| {
            g.point_seq = seq;
            g.point_ms = taken_ms;
            g.pending = None;
            g.bytes_transferred += stats.bytes_sent;
            g.bytes_replicated += stats.bytes_replicated;
            g.cycles += 1;
            g.last_error = None;
            g.last_cycle_ms = started_ms;
            for (id, sent, replicated) in &per_pair {
                if let Some(p) = g.pairs.iter_mut().find(|p| p.volume_id == *id) {
                    p.bytes_transferred += sent;
                    p.bytes_replicated += replicated;
                }
            }
            for p in g.pairs.iter_mut() {
                if p.since_seq.is_none() {
                    p.since_seq = Some(seq);
                    p.synced_bytes = p.size;
                }
            }
        })?;
        for p in &g.pairs {
            self.drop_points(p.volume_id, name, Some(seq));
        }
        tracing::debug!(
            group = name,
            seq,
            old,
            bytes = stats.bytes_sent,
            planned_ms = planned.as_millis() as u64,
            streamed_ms = streamed.as_millis() as u64,
            applied_ms = applied.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "replication point committed"
        );
        Ok(stats)
    }

    // ---- jobs ----

    /// Protect's job: ends when the server's pairs are in a point.
    pub(super) fn run_dr_protect(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::DrProtect { group, server } = &job.kind else { unreachable!("run_dr_protect of another kind") };
        let tenant = &job.tenant;
        let total: u64 = self
            .group_record(tenant, group)
            .map_err(|e| JobError::Failed(e.to_string()))?
            .pairs
            .iter()
            .filter(|p| &p.server == server)
            .map(|p| p.size)
            .sum();
        ctx.set_total(total);
        let key = group_key(tenant, group);
        let mut reported = 0u64;
        loop {
            ctx.check_cancelled()?;
            let g = self.group_record(tenant, group).map_err(|e| JobError::Failed(e.to_string()))?;
            let mine: Vec<&PairRecord> = g.pairs.iter().filter(|p| &p.server == server).collect();
            if mine.is_empty() {
                return Err(JobError::Failed(format!("server {server} was unprotected")));
            }
            if mine.iter().all(|p| p.since_seq.is_some()) {
                ctx.add_done(total.saturating_sub(reported));
                ctx.note(format!("initial sync done: point {}", g.point_seq));
                return Ok(());
            }
            // The running cycle's bytes, as far as they go towards this server's total.
            let now = self.dr().map(|d| d.progress.lock().get(&key).copied().unwrap_or(0)).unwrap_or(0).min(total);
            if now > reported {
                ctx.add_done(now - reported);
                reported = now;
            }
            if let Some(e) = &g.last_error {
                ctx.note(format!("retrying after: {e}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(super) fn run_dr_switchover(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::DrSwitchover { group } = &job.kind else { unreachable!("run_dr_switchover of another kind") };
        let tenant = &job.tenant;
        let fail = |e: ApiError| JobError::Failed(e.to_string());
        let lock = self.group_lock(&group_key(tenant, group)).map_err(fail)?;
        let _l = lock.lock();
        let g = self.group_record(tenant, group).map_err(fail)?;
        if g.role != Role::Source || g.failed_over {
            return Err(fail(ApiError::WrongRole { group: group.clone(), role: g.role.name().into(), want: "source" }));
        }
        if g.switching {
            // A switchover that a crash cut off (this job kind never resumes by itself): if it
            // got as far as promoting the target, only this side's last step is left.
            let dr = self.dr().map_err(fail)?;
            let mut c = self.peer_client(&g).map_err(fail)?;
            let peer = dr
                .rt
                .block_on(c.get_point(pb::GetPointRequest {}))
                .map_err(|s| fail(peer_status("asking the peer where the switchover stands", s)))?
                .into_inner();
            if peer.role == "source" && peer.seq == g.point_seq {
                self.become_target(tenant, &g, g.point_seq).map_err(fail)?;
                ctx.note(format!(
                    "finished a switchover cut off after {} was promoted at point {}: this side is now the target",
                    g.peer_az, g.point_seq
                ));
                return Ok(());
            }
        }
        // 1. Stop writes: revoke the attachments, refuse new ones.
        self.update_group(tenant, group, |g| g.switching = true).map_err(fail)?;
        for p in &g.pairs {
            for token in self.tokens_of(p.volume_id).map_err(|e| fail(e.into()))? {
                self.revoke_token(&token).map_err(fail)?;
            }
        }
        let undo = |e: ApiError| {
            let _ = self.update_group(tenant, group, |g| g.switching = false);
            fail(e)
        };
        // 2. The final sync: a cycle that sees every write (nothing can write any more).
        let stats = self.run_cycle(tenant, group).map_err(undo)?;
        ctx.add_done(stats.bytes_replicated);
        let g = self.group_record(tenant, group).map_err(undo)?;
        // 3. Promote the target at that point.
        let dr = self.dr().map_err(undo)?;
        let mut c = self.peer_client(&g).map_err(undo)?;
        ctx.point_of_no_return("the target was promoted").inspect_err(|_| {
            let _ = self.update_group(tenant, group, |g| g.switching = false);
        })?;
        dr.rt
            .block_on(c.promote(pb::PromoteRequest { seq: g.point_seq }))
            .map_err(|s| fail(peer_status("promoting the target", s)))?;
        evs_snapshot::crash_point!("switchover-after-promote");
        // 4. This side becomes the target at the same point.
        self.become_target(tenant, &g, g.point_seq).map_err(fail)?;
        ctx.note(format!("switched over at point {}: {} is now the source", g.point_seq, g.peer_az));
        Ok(())
    }

    /// Makes this side the target of `g` at point `seq`: volumes rolled back to the point and
    /// marked as replicas.
    pub(super) fn become_target(&self, tenant: &str, g: &GroupRecord, seq: u64) -> Result<(), ApiError> {
        let key = group_key(tenant, &g.name);
        for p in &g.pairs {
            let snap = self.store.find_snapshot(p.volume_id, &point_name(&g.name, seq))?;
            for token in self.tokens_of(p.volume_id)? {
                self.revoke_token(&token)?;
            }
            self.store.rollback(p.volume_id, snap.id)?;
            self.set_replica(p.volume_id, Some(&key))?;
            self.drop_points(p.volume_id, &g.name, Some(seq));
        }
        self.update_group(tenant, &g.name, |r| {
            r.role = Role::Target;
            r.switching = false;
            r.failed_over = false;
            r.point_seq = seq;
            r.pending = None;
            r.last_error = None;
        })?;
        Ok(())
    }

    /// Makes this side the source of `g` at its point: replicas rolled back to it and
    /// promoted to volumes.
    pub(super) fn become_source(&self, tenant: &str, g: &GroupRecord, failed_over: bool) -> Result<(), ApiError> {
        for p in &g.pairs {
            if p.since_seq.is_some() {
                let snap = self.store.find_snapshot(p.volume_id, &point_name(&g.name, g.point_seq))?;
                self.store.rollback(p.volume_id, snap.id)?;
            }
            self.set_replica(p.volume_id, None)?;
        }
        self.update_group(tenant, &g.name, |r| {
            r.role = Role::Source;
            r.failed_over = failed_over;
            r.enabled = !failed_over;
            r.switching = false;
            r.last_error = None;
            r.last_cycle_ms = now_ms();
            r.pending = None;
        })?;
        Ok(())
    }

    pub(super) fn run_dr_failover(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::DrFailover { group } = &job.kind else { unreachable!("run_dr_failover of another kind") };
        let tenant = &job.tenant;
        let fail = |e: ApiError| JobError::Failed(e.to_string());
        let lock = self.group_lock(&group_key(tenant, group)).map_err(fail)?;
        let _l = lock.lock();
        let g = self.group_record(tenant, group).map_err(fail)?;
        if g.role != Role::Target {
            return Err(fail(ApiError::WrongRole { group: group.clone(), role: g.role.name().into(), want: "target" }));
        }
        if g.point_seq == 0 {
            return Err(JobError::Failed(format!(
                "group {group} has no consistent point yet: nothing to fail over to"
            )));
        }
        ctx.point_of_no_return("the replicas were promoted")?;
        self.become_source(tenant, &g, true).map_err(fail)?;
        ctx.note(format!(
            "failed over to point {} (taken at {} ms since the epoch); the volumes are attachable here",
            g.point_seq, g.point_ms
        ));
        Ok(())
    }

    pub(super) fn run_dr_reprotect(&self, job: &JobRecord, ctx: &JobContext) -> Result<(), JobError> {
        let JobKind::DrReprotect { group } = &job.kind else { unreachable!("run_dr_reprotect of another kind") };
        let tenant = &job.tenant;
        let fail = |e: ApiError| JobError::Failed(e.to_string());
        let lock = self.group_lock(&group_key(tenant, group)).map_err(fail)?;
        {
            let _l = lock.lock();
            let g = self.group_record(tenant, group).map_err(fail)?;
            if g.role != Role::Source || !g.failed_over {
                return Err(JobError::Failed(format!(
                    "group {group} is not failed over here: reprotect runs on the daemon that took over"
                )));
            }
            let dr = self.dr().map_err(fail)?;
            let mut c = self.peer_client(&g).map_err(fail)?;
            // The old source rolls back to the common point and becomes the target.
            dr.rt
                .block_on(c.demote(pb::DemoteRequest {
                    seq: g.point_seq,
                    source_endpoint: dr.self_endpoint.clone(),
                    source_az: dr.az.clone(),
                }))
                .map_err(|s| fail(peer_status("demoting the old source", s)))?;
            self.update_group(tenant, group, |g| {
                g.failed_over = false;
                g.enabled = true;
                g.last_error = None;
            })
            .map_err(fail)?;
        }
        // The first cycle in the new direction: only what changed since the common point.
        let _l = lock.lock();
        let stats = self.run_cycle(tenant, group).map_err(fail)?;
        ctx.set_total(stats.bytes_replicated);
        ctx.add_done(stats.bytes_replicated);
        ctx.note(format!(
            "reprotected: {} bytes of changes since the common point sent ({} on the wire)",
            stats.bytes_replicated, stats.bytes_sent
        ));
        Ok(())
    }

    pub fn switchover(&self, owner: &str, group: &str) -> Result<JobRecord, ApiError> {
        let g = self.group_record(owner, group)?;
        if g.role != Role::Source || g.failed_over {
            return Err(ApiError::WrongRole { group: group.to_string(), role: g.role.name().into(), want: "source" });
        }
        if g.pairs.iter().any(|p| p.since_seq.is_none()) {
            return Err(ApiError::Syncing(group.to_string()));
        }
        Ok(self.jobs.submit(owner, JobKind::DrSwitchover { group: group.to_string() })?)
    }

    pub fn failover(&self, owner: &str, group: &str) -> Result<JobRecord, ApiError> {
        let g = self.group_record(owner, group)?;
        if g.role != Role::Target {
            return Err(ApiError::WrongRole { group: group.to_string(), role: g.role.name().into(), want: "target" });
        }
        // Refused here rather than by a failed job: nothing to promote yet.
        if g.point_seq == 0 {
            return Err(ApiError::Syncing(group.to_string()));
        }
        Ok(self.jobs.submit(owner, JobKind::DrFailover { group: group.to_string() })?)
    }

    pub fn reprotect(&self, owner: &str, group: &str) -> Result<JobRecord, ApiError> {
        let g = self.group_record(owner, group)?;
        if !g.failed_over {
            return Err(ApiError::WrongRole {
                group: group.to_string(),
                role: g.role.name().into(),
                want: "failed-over",
            });
        }
        Ok(self.jobs.submit(owner, JobKind::DrReprotect { group: group.to_string() })?)
    }

    pub fn drill(&self, owner: &str, group: &str, start: bool) -> Result<pb::StartDrillResponse, ApiError> {
        let g = self.group_record(owner, group)?;
        // A drill is asked of the source, which has the target make the clones.
        if g.role != Role::Source {
            return Err(ApiError::WrongRole { group: group.to_string(), role: g.role.name().into(), want: "source" });
        }
        let dr = self.dr()?;
        let mut c = self.peer_client(&g)?;
        let r = dr
            .rt
            .block_on(c.drill(pb::PeerDrillRequest { start }))
            .map_err(|s| peer_status(if start { "starting the drill" } else { "stopping the drill" }, s))?
            .into_inner();
        self.update_group(owner, group, |g| g.drill = if start { vec![(String::new(), 0)] } else { Vec::new() })?;
        Ok(pb::StartDrillResponse { volumes: r.volumes, point_seq: r.point_seq })
    }
}

impl PairRecord {
    fn spec(&self) -> pb::PairSpec {
        pb::PairSpec {
            server: self.server.clone(),
            volume: self.volume.clone(),
            size_bytes: self.size,
            tier: self.tier.clone(),
        }
    }
}

impl GroupRecord {
    /// A new group of `role` with its peer (endpoint, AZ, tenant): no pairs, no point yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        name: &str,
        role: Role,
        peer_endpoint: &str,
        peer_az: &str,
        peer_tenant: &str,
        secret: &str,
        ca: Option<String>,
        interval: u64,
        bandwidth: u64,
    ) -> GroupRecord {
        GroupRecord {
            v: 1,
            name: name.to_string(),
            role,
            peer_endpoint: peer_endpoint.to_string(),
            peer_az: peer_az.to_string(),
            peer_tenant: peer_tenant.to_string(),
            secret: secret.to_string(),
            ca_cert_pem: ca,
            interval,
            bandwidth,
            enabled: true,
            servers: Vec::new(),
            pairs: Vec::new(),
            point_seq: 0,
            point_ms: 0,
            pending: None,
            bytes_transferred: 0,
            bytes_replicated: 0,
            cycles: 0,
            last_error: None,
            last_cycle_ms: 0,
            failed_over: false,
            switching: false,
            drill: Vec::new(),
            created: now_ms() / 1000,
        }
    }
}

#[tonic::async_trait]
impl evs_proto::v1::dr_service_server::DrService for super::VolumeApi {
    async fn create_group(
        &self,
        req: tonic::Request<pb::CreateGroupRequest>,
    ) -> Result<tonic::Response<pb::CreateGroupResponse>, tonic::Status> {
        let r = req.get_ref().clone();
        let target = format!("DR group {}", r.name);
        let group = self
            .run_mut(&req, "DrService/CreateGroup", target, move |cp, owner| {
                cp.create_group(
                    owner,
                    &r.name,
                    &r.target_endpoint,
                    &r.target_token,
                    &r.target_az,
                    r.interval_seconds,
                    r.bandwidth_limit_bytes_per_second,
                    &r.source_endpoint,
                    &r.ca_cert_pem,
                )
            })
            .await?;
        Ok(tonic::Response::new(pb::CreateGroupResponse { group: Some(group) }))
    }

    async fn list_groups(
        &self,
        req: tonic::Request<pb::ListGroupsRequest>,
    ) -> Result<tonic::Response<pb::ListGroupsResponse>, tonic::Status> {
        let groups = self.run(&req, "DrService/ListGroups", |cp, owner| cp.list_groups(owner)).await?;
        Ok(tonic::Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn get_group(
        &self,
        req: tonic::Request<pb::GetGroupRequest>,
    ) -> Result<tonic::Response<pb::GetGroupResponse>, tonic::Status> {
        let name = req.get_ref().name.clone();
        let group = self.run(&req, "DrService/GetGroup", move |cp, owner| cp.get_group(owner, &name)).await?;
        Ok(tonic::Response::new(pb::GetGroupResponse { group: Some(group) }))
    }

    async fn delete_group(
        &self,
        req: tonic::Request<pb::DeleteGroupRequest>,
    ) -> Result<tonic::Response<pb::DeleteGroupResponse>, tonic::Status> {
        let name = req.get_ref().name.clone();
        let target = format!("DR group {name}");
        self.run_mut(&req, "DrService/DeleteGroup", target, move |cp, owner| cp.delete_group(owner, &name)).await?;
        Ok(tonic::Response::new(pb::DeleteGroupResponse {}))
    }

    async fn protect(
        &self,
        req: tonic::Request<pb::ProtectRequest>,
    ) -> Result<tonic::Response<pb::ProtectResponse>, tonic::Status> {
        let pb::ProtectRequest { group, server } = req.get_ref().clone();
        let target = format!("DR group {group}, server {server}");
        let (job, g) = self
            .run_mut(&req, "DrService/Protect", target, move |cp, owner| cp.protect(owner, &group, &server))
            .await?;
        Ok(tonic::Response::new(pb::ProtectResponse { job: Some(super::jobs::job_to_pb(&job)), group: Some(g) }))
    }

    async fn unprotect(
        &self,
        req: tonic::Request<pb::UnprotectRequest>,
    ) -> Result<tonic::Response<pb::UnprotectResponse>, tonic::Status> {
        let pb::UnprotectRequest { group, server } = req.get_ref().clone();
        let target = format!("DR group {group}, server {server}");
        let g = self
            .run_mut(&req, "DrService/Unprotect", target, move |cp, owner| cp.unprotect(owner, &group, &server))
            .await?;
        Ok(tonic::Response::new(pb::UnprotectResponse { group: Some(g) }))
    }

    async fn enable(
        &self,
        req: tonic::Request<pb::EnableRequest>,
    ) -> Result<tonic::Response<pb::EnableResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let g = self
            .run_mut(&req, "DrService/Enable", target, move |cp, owner| cp.set_enabled(owner, &group, true))
            .await?;
        Ok(tonic::Response::new(pb::EnableResponse { group: Some(g) }))
    }

    async fn disable(
        &self,
        req: tonic::Request<pb::DisableRequest>,
    ) -> Result<tonic::Response<pb::DisableResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let g = self
            .run_mut(&req, "DrService/Disable", target, move |cp, owner| cp.set_enabled(owner, &group, false))
            .await?;
        Ok(tonic::Response::new(pb::DisableResponse { group: Some(g) }))
    }

    async fn status(
        &self,
        req: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let g = self.run(&req, "DrService/Status", move |cp, owner| cp.get_group(owner, &group)).await?;
        Ok(tonic::Response::new(pb::StatusResponse { group: Some(g) }))
    }

    async fn start_drill(
        &self,
        req: tonic::Request<pb::StartDrillRequest>,
    ) -> Result<tonic::Response<pb::StartDrillResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let r =
            self.run_mut(&req, "DrService/StartDrill", target, move |cp, owner| cp.drill(owner, &group, true)).await?;
        Ok(tonic::Response::new(r))
    }

    async fn stop_drill(
        &self,
        req: tonic::Request<pb::StopDrillRequest>,
    ) -> Result<tonic::Response<pb::StopDrillResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        self.run_mut(&req, "DrService/StopDrill", target, move |cp, owner| cp.drill(owner, &group, false)).await?;
        Ok(tonic::Response::new(pb::StopDrillResponse {}))
    }

    async fn switchover(
        &self,
        req: tonic::Request<pb::SwitchoverRequest>,
    ) -> Result<tonic::Response<pb::SwitchoverResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let job =
            self.run_mut(&req, "DrService/Switchover", target, move |cp, owner| cp.switchover(owner, &group)).await?;
        Ok(tonic::Response::new(pb::SwitchoverResponse { job: Some(super::jobs::job_to_pb(&job)) }))
    }

    async fn failover(
        &self,
        req: tonic::Request<pb::FailoverRequest>,
    ) -> Result<tonic::Response<pb::FailoverResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let job = self.run_mut(&req, "DrService/Failover", target, move |cp, owner| cp.failover(owner, &group)).await?;
        Ok(tonic::Response::new(pb::FailoverResponse { job: Some(super::jobs::job_to_pb(&job)) }))
    }

    async fn reprotect(
        &self,
        req: tonic::Request<pb::ReprotectRequest>,
    ) -> Result<tonic::Response<pb::ReprotectResponse>, tonic::Status> {
        let group = req.get_ref().group.clone();
        let target = format!("DR group {group}");
        let job =
            self.run_mut(&req, "DrService/Reprotect", target, move |cp, owner| cp.reprotect(owner, &group)).await?;
        Ok(tonic::Response::new(pb::ReprotectResponse { job: Some(super::jobs::job_to_pb(&job)) }))
    }
}
