//! The command line of `evsctl` (clap). Usage errors exit with code 2, as clap does.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::size::parse_size;

/// A clap usage error as the one line SPEC.md asks for: clap's message (its first paragraph,
/// which names the problem, such as the missing arguments listed under it) on one line and
/// where to look next, without its usage block and tips.
pub fn usage_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    format!("{} (see --help)", message.join(" "))
}

/// `evsctl` or `evsctl volume` alone (clap would print the whole help): one line naming the
/// command that needs a subcommand and its choices. `args` as the process got them.
pub fn missing_subcommand_line<I: IntoIterator<Item = String>>(args: I) -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut path = vec![cmd.get_name().to_string()];
    for arg in args.into_iter().skip(1) {
        if let Some(sub) = cmd.find_subcommand(&arg).cloned() {
            path.push(arg);
            cmd = sub;
        }
    }
    let choices: Vec<&str> = cmd.get_subcommands().filter(|c| !c.is_hide_set()).map(|c| c.get_name()).collect();
    format!("error: {} needs a subcommand: {} (see --help)", path.join(" "), choices.join(", "))
}

/// The API endpoint when neither --endpoint nor EVS_ENDPOINT is given.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:10810";
/// The token file tried when neither --token nor EVS_TOKEN is given (the daemon's default
/// data directory, as seen from where the daemon was started).
pub const DEFAULT_TOKEN_FILE: &str = "./evs-data/admin.token";

#[derive(Debug, Parser)]
#[command(name = "evsctl", version, about = "Command-line client of the EVS engine", propagate_version = true)]
pub struct Cli {
    /// gRPC API of the evs-target daemon.
    #[arg(long, global = true, value_name = "URL", env = "EVS_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Tenant token [default: ./evs-data/admin.token if readable].
    #[arg(long, global = true, value_name = "TOKEN", env = "EVS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the daemon's certificate; needed for an https://
    /// endpoint (the system's trusted roots are not used).
    #[arg(long, global = true, value_name = "FILE", env = "EVS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Output format: human-readable table, or one JSON document on stdout.
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Volumes: create, list, show, delete, extend, set-tier, attach, detach.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots: create, create-group, list, show, delete, rollback, diff, attach, detach.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Tenants and their quotas (admin): create, list, show, delete, set-quota.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Servers, named sets of volumes (a VM's disks): create, list, show, delete.
    #[command(subcommand)]
    Server(ServerCommand),
    /// The audit log of mutating calls (admin).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Backups to object storage (VBS, CSBS): create, create-server, list, show, delete,
    /// restore, verify, gc, set-key.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Backup policies: create, bind, unbind, list, delete, run.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Jobs (long operations such as volume delete): list, show, wait, cancel.
    #[command(subcommand)]
    Job(JobCommand),
    /// Disaster recovery between AZs: protection groups, drills, switchover, failover.
    #[command(subcommand)]
    Dr(DrCommand),
}

#[derive(Debug, Subcommand)]
pub enum DrCommand {
    /// Protection groups: create, list, show, delete.
    #[command(subcommand)]
    Group(DrGroupCommand),
    /// Add a server to a group: its volumes get replicas on the target.
    Protect {
        group: String,
        #[arg(long)]
        server: String,
        /// Wait for the initial sync (a progress bar on a terminal).
        #[arg(long)]
        wait: bool,
    },
    /// Remove a server from a group (its replicas on the target are deleted).
    Unprotect {
        group: String,
        #[arg(long)]
        server: String,
    },
    /// Start replicating.
    Enable { group: String },
    /// Stop replicating (the target keeps its last consistent point).
    Disable { group: String },
    /// Per pair: state, last consistent point, RPO, bytes transferred.
    Status { group: String },
    /// Drills: clones of the target's last consistent point, attachable over NBD.
    #[command(subcommand)]
    Drill(DrDrillCommand),
    /// Planned: stop writes here, final sync, promote the target, reverse the direction.
    Switchover {
        group: String,
        #[arg(long)]
        wait: bool,
    },
    /// Run on the target with the source lost: promote the last consistent point.
    Failover {
        group: String,
        #[arg(long)]
        wait: bool,
    },
    /// Run on the new source after a failover: replicate back, sending only the delta.
    Reprotect {
        group: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrGroupCommand {
    /// Create a group on this daemon (the source) and register it on the target.
    Create {
        name: String,
        /// The target AZ daemon's API, http://HOST:PORT or https://HOST:PORT.
        #[arg(long, value_name = "ENDPOINT")]
        target: String,
        /// The tenant's token on the target daemon.
        #[arg(long, value_name = "TOKEN", env = "EVS_TARGET_TOKEN", hide_env_values = true)]
        target_token: String,
        /// The AZ the target must be in.
        #[arg(long, value_name = "AZ")]
        target_az: Option<String>,
        /// Seconds between replication cycles [default: 5].
        #[arg(long, value_name = "SECONDS")]
        interval: Option<u64>,
        /// Bandwidth limit of the group, bytes per second (K, M, G suffixes) [default: none].
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        bandwidth: Option<u64>,
        /// Where the target reaches this daemon, for the reverse direction [default: this
        /// daemon's API address].
        #[arg(long, value_name = "ENDPOINT")]
        source_endpoint: Option<String>,
        /// CA certificate (PEM) of the target's TLS certificate, for an https target (and of
        /// this daemon's, which the target calls back) [default: --ca-cert]. A flag of its own:
        /// a `--ca-cert` here would be the global one, for this daemon's API.
        #[arg(long, value_name = "FILE")]
        peer_ca_cert: Option<PathBuf>,
    },
    List,
    Show {
        name: String,
    },
    /// Delete a group on both sides (the target's replicas are deleted).
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrDrillCommand {
    Start { group: String },
    Stop { group: String },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a volume, online (incremental: only what changed since its last backup).
    Create {
        volume: String,
        /// A label for the backup.
        #[arg(long)]
        name: Option<String>,
        /// Read every allocated chunk, not only the changed ones (still deduplicated).
        #[arg(long)]
        full: bool,
        /// Wait for the backup job (progress bar on a terminal); exit with its result.
        #[arg(long)]
        wait: bool,
    },
    /// Back up every volume of a server at one instant.
    CreateServer {
        server: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// List backups (of one volume or server).
    List {
        #[arg(long, conflicts_with = "server")]
        volume: Option<String>,
        #[arg(long)]
        server: Option<String>,
    },
    /// Show one backup.
    Show { id: String },
    /// Delete a backup (never breaks another).
    Delete {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Restore a backup to a new volume (a server backup: new volumes TO-VOLUME and a server
    /// TO), or in place (the volume must be detached).
    Restore {
        id: String,
        #[arg(long, value_name = "NEW_VOLUME", required_unless_present = "in_place", conflicts_with = "in_place")]
        to: Option<String>,
        #[arg(long)]
        in_place: bool,
        /// Tier of the new volume(s) [default: gpssd].
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Re-read every chunk of a backup; fails naming each missing or corrupt chunk.
    Verify { id: String },
    /// Remove chunks no backup references (admin).
    Gc {
        #[arg(long)]
        wait: bool,
    },
    /// Set the tenant's backup encryption key (32 bytes as 64 hex digits), or clear it.
    SetKey {
        #[arg(long, value_name = "HEX")]
        key_hex: Option<String>,
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy: a five-field cron schedule in UTC and a retention.
    Create {
        name: String,
        #[arg(long, value_name = "CRON")]
        schedule: String,
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_last: u32,
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_daily: u32,
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_monthly: u32,
    },
    /// Bind a policy to a volume or a server (one policy each).
    Bind {
        name: String,
        #[arg(long, required_unless_present = "server", conflicts_with = "server")]
        volume: Option<String>,
        #[arg(long)]
        server: Option<String>,
    },
    /// Unbind a policy from a volume or a server.
    Unbind {
        name: String,
        #[arg(long, required_unless_present = "server", conflicts_with = "server")]
        volume: Option<String>,
        #[arg(long)]
        server: Option<String>,
    },
    /// List the tenant's policies.
    List,
    /// Delete a policy (its backups stay).
    Delete { name: String },
    /// Run a policy now (its backups, then its retention as they finish).
    Run { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its token (shown only this once).
    Create {
        name: String,
        /// Most volumes the tenant may own [default, and with 0: the daemon's [quotas]; `tenant
        /// set-quota` with 0 lifts the limit].
        #[arg(long, value_name = "N")]
        max_volumes: Option<u64>,
        /// Most provisioned capacity (sum of volume sizes) [default: the daemon's [quotas]].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_capacity: Option<u64>,
    },
    /// List tenants with their usage and quotas.
    List,
    /// Show one tenant (a tenant may show itself).
    Show { name: String },
    /// Delete a tenant that owns no volumes.
    Delete { name: String },
    /// Change a tenant's quotas (0 = unlimited).
    SetQuota {
        name: String,
        #[arg(long, value_name = "N")]
        max_volumes: Option<u64>,
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_capacity: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create a server from volumes (each volume belongs to one server at most).
    Create {
        name: String,
        /// The server's volumes, comma-separated, in disk order.
        #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
        volumes: Vec<String>,
    },
    /// List the tenant's servers.
    List,
    /// Show one server.
    Show { name: String },
    /// Delete a server (its volumes stay).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest entries, oldest first.
    List {
        /// Only this tenant's calls ("-" for refused authentications).
        #[arg(long)]
        tenant: Option<String>,
        /// How many entries [default: 100, at most 10000].
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        limit: u32,
    },
}

/// Exit status of `job wait` (and of the commands that wait for a job, such as
/// `volume delete`): 0 succeeded, 1 failed (or any other error), 3 cancelled.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List the tenant's jobs, oldest first.
    List,
    /// Show one job.
    Show { id: u64 },
    /// Wait for a job to end (a progress bar on a terminal); the exit status is its result:
    /// 0 succeeded, 1 failed, 3 cancelled.
    Wait { id: u64 },
    /// Cancel a job: a queued one at once, a running one at its next check.
    Cancel { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume, online.
    Create { volume: String, name: String },
    /// Snapshot several volumes at one instant (all or nothing), each named NAME.
    CreateGroup {
        name: String,
        /// The volumes, comma-separated.
        #[arg(long, value_delimiter = ',', num_args = 1.., required_unless_present = "server", conflicts_with = "server")]
        volumes: Vec<String>,
        /// Every volume of this server.
        #[arg(long)]
        server: Option<String>,
    },
    /// List a volume's snapshots, oldest first.
    List { volume: String },
    /// Show one snapshot.
    Show {
        #[arg(value_name = "VOLUME@SNAP")]
        snapshot: String,
    },
    /// Delete a snapshot (its data is merged away in the background).
    Delete {
        #[arg(value_name = "VOLUME@SNAP")]
        snapshot: String,
    },
    /// Make the volume read as the snapshot again (no client may be connected to it); later
    /// snapshots stay.
    Rollback {
        #[arg(value_name = "VOLUME@SNAP")]
        snapshot: String,
    },
    /// Changed extents between two snapshots of a volume (metadata only).
    Diff {
        volume: String,
        /// Older snapshot [default: none: the allocated extents of --to].
        #[arg(long)]
        from: Option<String>,
        /// Newer snapshot [default: the volume's current state].
        #[arg(long)]
        to: Option<String>,
    },
    /// Export a snapshot read-only over NBD (or vhost-user) and print the URI (or socket).
    Attach {
        #[arg(value_name = "VOLUME@SNAP")]
        snapshot: String,
        /// Print the nbd+unix:// URI of the daemon's unix socket instead of nbd://.
        #[arg(long)]
        unix: bool,
        /// Front end: nbd, or vhost-user (prints the vhost-user-blk socket; a read-only disk).
        #[arg(long, default_value = "nbd", value_parser = ["nbd", "vhost-user"])]
        protocol: String,
    },
    /// Revoke a snapshot's NBD export.
    Detach {
        #[arg(value_name = "VOLUME@SNAP")]
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume, an instant clone of a snapshot, or a volume restored from a backup.
    Create {
        name: String,
        /// Size: bytes, or with a K, M, G, T suffix (binary units): 512M, 10G, 1T. With
        /// --from-snapshot or --from-backup it defaults to the snapshot's or backed-up volume's
        /// size, and may only be larger.
        #[arg(long, value_parser = parse_size, required_unless_present_any = ["from_snapshot", "from_backup"])]
        size: Option<u64>,
        /// Performance tier: common, high, gpssd, ultra-high, essd, unlimited, or one the daemon's
        /// config file adds [default: gpssd].
        #[arg(long)]
        tier: Option<String>,
        /// Clone of a snapshot: instant, shares its data until written.
        #[arg(long, value_name = "VOLUME@SNAP", conflicts_with = "from_backup")]
        from_snapshot: Option<String>,
        /// Restore of a volume backup (an id from `backup list`): the volume is created at
        /// once in state "restoring" and a restore job fills it; a failed restore removes it.
        #[arg(long, value_name = "BACKUP_ID")]
        from_backup: Option<String>,
        /// With --from-backup: follow the restore job to its end (progress bar; exit code as
        /// `job wait`).
        #[arg(long, requires = "from_backup")]
        wait: bool,
    },
    /// List the tenant's volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Delete a detached volume and its data (a job; waits for it unless --no-wait).
    Delete {
        name: String,
        /// Print the delete job and return at once (follow it with `evsctl job wait ID`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Grow a volume, online (never shrinks).
    Extend {
        name: String,
        /// New size: bytes, or with a K, M, G, T suffix.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Change a volume's performance tier, online.
    SetTier {
        name: String,
        #[arg(long)]
        tier: String,
    },
    /// Export a volume over NBD (or vhost-user) and print the URI (or socket) to give the client.
    Attach {
        name: String,
        /// Print the nbd+unix:// URI of the daemon's unix socket instead of nbd://.
        #[arg(long)]
        unix: bool,
        /// Front end: nbd, or vhost-user (prints the vhost-user-blk unix socket for QEMU,
        /// Cloud Hypervisor, Firecracker).
        #[arg(long, default_value = "nbd", value_parser = ["nbd", "vhost-user"])]
        protocol: String,
    },
    /// Revoke a volume's exports (NBD and vhost-user; their connections are closed).
    Detach { name: String },
}

impl Cli {
    /// Where to look for a token when none was given.
    pub fn default_token_file() -> PathBuf {
        PathBuf::from(DEFAULT_TOKEN_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("evsctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn create_with_size_and_tier() {
        let cli = parse(&["volume", "create", "db", "--size", "10G", "--tier", "essd"]).unwrap();
        match cli.command {
            Command::Volume(VolumeCommand::Create { name, size, tier, .. }) => {
                assert_eq!(name, "db");
                assert_eq!(size, Some(10 << 30));
                assert_eq!(tier.as_deref(), Some("essd"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_options_anywhere() {
        let cli = parse(&["volume", "list", "--output", "json", "--endpoint", "http://h:1", "--token", "t"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.endpoint, "http://h:1");
        assert_eq!(cli.token.as_deref(), Some("t"));
        let cli = parse(&["volume", "list", "--ca-cert", "ca.pem", "--endpoint", "https://h:1"]).unwrap();
        assert_eq!(cli.ca_cert, Some(PathBuf::from("ca.pem")));
        let cli = parse(&["--output", "json", "volume", "attach", "db", "--unix"]).unwrap();
        assert!(matches!(cli.command, Command::Volume(VolumeCommand::Attach { unix: true, .. })));
    }

    #[test]
    fn job_commands() {
        assert!(matches!(parse(&["job", "wait", "7"]).unwrap().command, Command::Job(JobCommand::Wait { id: 7 })));
        assert!(matches!(parse(&["job", "list"]).unwrap().command, Command::Job(JobCommand::List)));
        let cli = parse(&["volume", "delete", "db", "--no-wait"]).unwrap();
        assert!(matches!(cli.command, Command::Volume(VolumeCommand::Delete { no_wait: true, .. })));
        let e = parse(&["job", "show", "seven"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("seven"), "{e}");
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["volume", "create", "db"][..],
            &["volume", "create", "db", "--size", "ten"],
            &["volume", "extend", "db", "--size", "1.5G"],
            &["volume", "set-tier", "db"],
            &["volume", "frobnicate"],
            &["--output", "yaml", "volume", "list"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
        let e = parse(&["volume", "create", "db", "--size", "ten"]).unwrap_err().to_string();
        assert!(e.contains("--size") && e.contains("\"ten\""), "{e}");
    }

    #[test]
    fn a_missing_subcommand_is_one_line_with_the_choices() {
        for (args, want) in [
            (&[][..], "error: evsctl needs a subcommand: volume, snapshot, tenant"),
            (&["volume"], "error: evsctl volume needs a subcommand: create, list, show, delete, extend"),
            (&["--output", "json", "dr", "drill"], "error: evsctl dr drill needs a subcommand: "),
        ] {
            assert_eq!(
                parse(args).unwrap_err().kind(),
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
                "{args:?}"
            );
            let argv = std::iter::once("evsctl").chain(args.iter().copied()).map(String::from);
            let line = missing_subcommand_line(argv);
            assert!(
                line.starts_with(want) && line.ends_with("(see --help)") && !line.contains('\n'),
                "{args:?}: {line}"
            );
        }
    }

    #[test]
    fn a_usage_error_is_one_line_that_names_the_problem() {
        for (args, want) in [
            (&["volume", "create", "x"][..], "--size"),
            (&["volume", "create", "x", "--size", "1M", "--wait"], "--from-backup"),
            (&["volume", "list", "--bogus"], "--bogus"),
            (&["--output", "yaml", "volume", "list"], "yaml"),
        ] {
            let line = usage_error_line(&parse(args).unwrap_err());
            assert_eq!(line.lines().count(), 1, "{args:?}: {line}");
            assert!(
                line.starts_with("error: ") && line.contains(want) && line.ends_with("(see --help)"),
                "{args:?}: {line}"
            );
        }
    }
}
