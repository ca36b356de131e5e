//! A real `evs-target` process per test, in its own temporary directory, on free loopback
//! ports, plus the `evsctl` CLI pointed at it.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::nbd_client::NbdUri;
use crate::tools::{describe, format_output, output_with_timeout};

/// What the daemon prints on stderr once every listener is up.
pub const READY_LINE: &str = "evs-target ready";

/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How long `evsctl` may take for one command.
const EVSCTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Directory holding the workspace's binaries: `EVS_BIN_DIR` if set, else the directory two
/// levels above this test executable (`target/<profile>/deps/<test>-<hash>` →
/// `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EVS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("test executable has a directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of one of the workspace's binaries; panics with the build command if it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "{} not found: build the binaries before the tests (`cargo build --workspace --bins`, with the \
             same profile as the tests), or set EVS_BIN_DIR to the directory that holds them",
            p.display()
        );
    }
    p
}

/// The I/O backend the suite runs against: `EVS_TEST_IO_BACKEND` (uring, portable, auto).
pub fn io_backend() -> String {
    std::env::var("EVS_TEST_IO_BACKEND").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "auto".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}

fn start_timeout() -> Duration {
    let secs = std::env::var("EVS_TEST_START_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    Duration::from_secs(secs)
}

/// Removes ANSI colour sequences (in case the daemon colours its log).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// How to start a daemon beyond the defaults of [`Daemon::start`].
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Extra command-line arguments of `evs-target`, after the harness's own.
    pub args: Vec<String>,
    /// The daemon's `--az` [default: az1].
    pub az: Option<String>,
    /// Text of a TOML config file, written to `<root>/evs-target.toml` and passed as
    /// `--config`.
    pub config: Option<String>,
    /// Scheme of the API endpoint the harness gives evsctl (`http` unless the test serves the
    /// API over TLS: `https`).
    pub api_scheme: Option<String>,
    /// Extra global arguments of every `evsctl` call made through the harness (e.g.
    /// `--ca-cert FILE`).
    pub evsctl_args: Vec<String>,
    /// Files written into the daemon's root directory before its first start (path relative
    /// to the root, contents), e.g. certificates. The daemon runs in the root, so its
    /// arguments and config may name them by the relative path.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Extra environment of the daemon (e.g. the credentials of a private S3 server).
    pub env: Vec<(String, String)>,
    /// The data directory [default: `<root>/data`], e.g. a small filesystem the test mounted.
    pub data_dir: Option<PathBuf>,
}

/// One running (or stopped) `evs-target`. Dropping it kills the process and removes its
/// directory (set `EVS_TEST_KEEP=1` to keep the directory; its path is printed).
pub struct Daemon {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data_dir: PathBuf,
    pub nbd_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub nbd_socket: PathBuf,
    backend: String,
    child: Option<Child>,
    token: String,
    /// How many times the process was started (names the log files).
    starts: u32,
    opts: DaemonOptions,
}

impl Daemon {
    /// Starts a daemon on a fresh data directory and waits until it is ready.
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    /// [`start`](Self::start) with extra arguments and/or a config file.
    pub fn start_with(opts: DaemonOptions) -> Daemon {
        let dir = tempfile::Builder::new().prefix("evs-test-").tempdir().expect("create temp dir");
        let root = dir.path().to_path_buf();
        let data_dir = opts.data_dir.clone().unwrap_or_else(|| root.join("data"));
        let nbd_socket = root.join("nbd.sock");
        let mut d = Daemon {
            dir: Some(dir),
            root,
            data_dir,
            nbd_addr: "127.0.0.1:0".parse().unwrap(),
            api_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            nbd_socket,
            backend: io_backend(),
            child: None,
            token: String::new(),
            starts: 0,
            opts,
        };
        if let Some(text) = &d.opts.config {
            fs::write(d.config_path(), text).expect("write the daemon's config file");
        }
        for (rel, contents) in &d.opts.files {
            let path = d.root.join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("create a directory for a test file");
            }
            fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        // A port picked here can be taken by someone else before the daemon binds it: try
        // again with new ports when the daemon says so.
        for attempt in 0.. {
            d.pick_ports();
            match d.launch() {
                Ok(()) => break,
                Err(log) if attempt < 4 && log.to_lowercase().contains("in use") => {
                    eprintln!("evs-target could not bind its ports (attempt {attempt}); retrying with new ones");
                }
                Err(log) => d.fail_start(&log),
            }
        }
        d
    }

    fn pick_ports(&mut self) {
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        self.nbd_addr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        self.api_addr = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        self.metrics_addr = SocketAddr::from(([127, 0, 0, 1], ports[2]));
    }

    /// The command line of the daemon (without spawning it).
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin_path("evs-target"));
        c.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--nbd-listen")
            .arg(self.nbd_addr.to_string())
            .arg("--nbd-socket")
            .arg(&self.nbd_socket)
            .arg("--api-listen")
            .arg(self.api_addr.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics_addr.to_string())
            .arg("--io-backend")
            .arg(&self.backend)
            .arg("--az")
            .arg(self.opts.az.as_deref().unwrap_or("az1"))
            .current_dir(&self.root)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", std::env::var("EVS_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("EVS_TOKEN")
            .env_remove("EVS_ENDPOINT")
            .env_remove("EVS_CA_CERT");
        if self.opts.config.is_some() {
            c.arg("--config").arg(self.config_path());
        }
        c.args(&self.opts.args);
        c.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Where the config file of [`DaemonOptions::config`] is written.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("evs-target.toml")
    }

    /// Path of the stderr log of the current (or last) process.
    pub fn log_path(&self) -> PathBuf {
        self.root.join(format!("evs-target.{}.stderr.log", self.starts))
    }

    /// The stderr log of the current (or last) process.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).map(|s| strip_ansi(&s)).unwrap_or_default()
    }

    /// Spawns the process and waits until it is ready. `Err(log)` if it exited first.
    fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "evs-target is already running");
        self.starts += 1;
        let stderr = File::create(self.log_path()).expect("create log file");
        let stdout = File::create(self.root.join(format!("evs-target.{}.stdout.log", self.starts))).unwrap();
        let mut cmd = self.command();
        let what = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + start_timeout();
        let token_path = self.data_dir.join(ADMIN_TOKEN_FILE);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                return Err(format!("exited with {status} before it was ready\n{}", self.log()));
            }
            let ready = self.log().contains(READY_LINE);
            let token = fs::read_to_string(&token_path).map(|t| t.trim().to_string()).unwrap_or_default();
            if ready && !token.is_empty() {
                self.token = token;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut child = self.child.take().unwrap();
                let _ = child.kill();
                let _ = child.wait();
                self.fail_start(&format!(
                    "not ready after {:?} (\"{READY_LINE}\" logged: {ready}; {} present: {})\n{}",
                    start_timeout(),
                    token_path.display(),
                    !token.is_empty(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn fail_start(&self, detail: &str) -> ! {
        panic!(
            "evs-target (start #{}, --io-backend {}) did not come up: {detail}\n(command: {})",
            self.starts,
            self.backend,
            describe(&self.command())
        );
    }

    /// Starts the process again on the same data directory, ports and socket (after
    /// [`kill9`](Self::kill9) or [`terminate`](Self::terminate)) and waits until it is ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a daemon that is still running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.launch() {
                Ok(()) => return,
                // The old process's ports can take a moment to be free again.
                Err(log) if Instant::now() < deadline && log.to_lowercase().contains("in use") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => self.fail_start(&log),
            }
        }
    }

    /// Fails the test unless this evs-target was built with the `failpoints` feature (its
    /// start-up log says so): a test that arms a failpoint on a build without them proves nothing.
    pub fn require_failpoints(&self) {
        assert!(
            self.log().contains("failpoints=true"),
            "this evs-target has no failpoints: build it with `cargo build --workspace --bins --features evs-target/failpoints` (scripts/test.sh does)\n{}",
            self.log()
        );
    }

    /// Sets (`Some`) or removes (`None`) a variable of the daemon's environment, for its next
    /// start (e.g. `FAILPOINTS` of the crash-point tests).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.opts.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.opts.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Waits up to `timeout` for the process to exit on its own (a crash point, say); returns
    /// its exit status, or None (still running) after the timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut().expect("wait_exit() of a daemon that is not running");
            if let Some(status) = c.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9() of a daemon that is not running");
        child.kill().expect("kill -9 evs-target");
        child.wait().expect("wait for evs-target");
    }

    /// SIGTERM, and waits (up to 60 s) for the process to exit; returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("terminate() of a daemon that is not running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we own (our child, not yet reaped) and a valid signal.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("evs-target did not exit within 60 s of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still alive (a crash is reported with its log).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }

    /// Panics with the daemon's log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait().expect("try_wait") {
                panic!("evs-target exited ({status}) while it should be serving\n{}", self.log());
            }
        } else {
            panic!("evs-target is not running");
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The temporary directory of this daemon (data dir, socket and logs live in it); tests may
    /// put their own files here.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The admin token (read from `<data-dir>/admin.token` at each start).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A scrape of the metrics endpoint.
    pub fn metrics(&self) -> crate::metrics::Metrics {
        crate::metrics::Metrics::parse(&crate::metrics::http_get(self.metrics_addr, "/metrics"))
    }

    /// `http://127.0.0.1:PORT` of the gRPC API (`https://` when the options say so).
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.opts.api_scheme.as_deref().unwrap_or("http"), self.api_addr)
    }

    // ---- evsctl ----

    /// `evsctl` with nothing set: no endpoint, no token, EVS_* variables removed, run in the
    /// daemon's temporary root (which has no `./evs-data`), so tests can add exactly what they
    /// want.
    pub fn evsctl_bare(&self) -> Command {
        let mut c = Command::new(bin_path("evsctl"));
        c.current_dir(&self.root)
            .env_remove("EVS_TOKEN")
            .env_remove("EVS_ENDPOINT")
            .env_remove("EVS_CA_CERT")
            .env("NO_COLOR", "1");
        c
    }

    /// Runs `evsctl --endpoint ... --token ... ARGS` and returns its output, whatever the status.
    pub fn evsctl(&self, args: &[&str]) -> Output {
        self.evsctl_as(&self.token, args)
    }

    /// Runs `evsctl` with another tenant's token (same endpoint and options).
    pub fn evsctl_as(&self, token: &str, args: &[&str]) -> Output {
        let mut c = self.evsctl_bare();
        c.arg("--endpoint").arg(self.endpoint()).arg("--token").arg(token).args(&self.opts.evsctl_args).args(args);
        output_with_timeout(&mut c, EVSCTL_TIMEOUT)
    }

    /// Like [`evsctl`](Self::evsctl) but must succeed; returns stdout.
    pub fn evsctl_ok(&self, args: &[&str]) -> String {
        let out = self.evsctl(args);
        if !out.status.success() {
            panic!("`evsctl {}` failed\n{}", args.join(" "), format_output(&out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `evsctl --output json ARGS`, which must succeed and print one JSON document.
    pub fn evsctl_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = self.evsctl(&full);
        if !out.status.success() {
            panic!("`evsctl {}` failed\n{}", full.join(" "), format_output(&out));
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`evsctl {}` did not print one JSON document: {e}\n{}", full.join(" "), format_output(&out))
        })
    }

    /// `dr group create NAME` on this (source) daemon towards `target`, reached at `endpoint`
    /// (its API, or a proxy in front of it), with its admin token, its AZ and 1 s cycles, then
    /// `extra`; returns the group as evsctl prints it.
    pub fn create_dr_group(&self, name: &str, target: &Daemon, endpoint: &str, extra: &[&str]) -> Value {
        let az = target.opts.az.as_deref().unwrap_or("az1");
        let mut args = vec![
            "dr",
            "group",
            "create",
            name,
            "--target",
            endpoint,
            "--target-token",
            target.token(),
            "--target-az",
            az,
            "--interval",
            "1",
        ];
        args.extend_from_slice(extra);
        self.evsctl_json(&args)
    }

    /// Creates a volume and attaches it: `(nbd://127.0.0.1:PORT/TOKEN,
    /// nbd+unix:///TOKEN?socket=PATH)`, the same attachment reached over TCP and the unix socket
    /// (`nbds` forms when the daemon requires TLS there).
    pub fn create_volume(&self, name: &str, size: &str) -> (String, String) {
        self.evsctl_ok(&["volume", "create", name, "--size", size]);
        let tcp = self.attach(name);
        let u = NbdUri::parse(&tcp).unwrap_or_else(|e| panic!("`evsctl volume attach {name}` printed {e}"));
        let scheme = if u.tls { "nbds+unix" } else { "nbd+unix" };
        let unix = format!("{scheme}:///{}?socket={}", u.export, self.nbd_socket.display());
        (tcp, unix)
    }

    /// `evsctl --output json volume attach NAME` → the `uri` field.
    pub fn attach(&self, name: &str) -> String {
        let v = self.evsctl_json(&["volume", "attach", name]);
        uri_field(&v, &format!("volume attach {name}"))
    }

    /// `evsctl --output json volume attach NAME --unix` → the `uri` field (or `unix_uri`, if
    /// the document carries both forms).
    pub fn attach_unix(&self, name: &str) -> String {
        let v = self.evsctl_json(&["volume", "attach", name, "--unix"]);
        if let Some(u) = v.get("unix_uri").and_then(Value::as_str) {
            return u.to_string();
        }
        uri_field(&v, &format!("volume attach {name} --unix"))
    }

    /// `volume list --output json` as a list of volume objects.
    pub fn list_volumes(&self) -> Vec<Value> {
        volume_list(&self.evsctl_json(&["volume", "list"]))
    }

    /// `volume show NAME --output json` as a volume object.
    pub fn show_volume(&self, name: &str) -> Value {
        volume_object(self.evsctl_json(&["volume", "show", name]))
    }
}

fn uri_field(v: &Value, what: &str) -> String {
    v.get("uri")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("`evsctl --output json {what}` printed no string field `uri`: {v}"))
        .to_string()
}

/// The volumes of a `volume list --output json` document: a JSON array, or an object with a
/// `volumes` array.
pub fn volume_list(v: &Value) -> Vec<Value> {
    if let Some(a) = v.as_array() {
        return a.clone();
    }
    if let Some(a) = v.get("volumes").and_then(Value::as_array) {
        return a.clone();
    }
    panic!("`volume list --output json` printed neither an array nor an object with `volumes`: {v}");
}

/// The volume of a `volume show --output json` document: the object itself, or its `volume`.
pub fn volume_object(v: Value) -> Value {
    if v.get("name").is_some() {
        return v;
    }
    if let Some(inner) = v.get("volume") {
        if inner.get("name").is_some() {
            return inner.clone();
        }
    }
    panic!("`volume show --output json` printed no volume object with `name`: {v}");
}

/// An unsigned integer field of a JSON object (also accepted as a decimal string, as protobuf
/// JSON mapping prints 64-bit integers).
pub fn u64_field(v: &Value, field: &str) -> u64 {
    match v.get(field) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or_else(|| panic!("`{field}` is not a u64 in {v}")),
        Some(Value::String(s)) => s.parse().unwrap_or_else(|_| panic!("`{field}` is not a number in {v}")),
        _ => panic!("no numeric field `{field}` in {v}"),
    }
}

/// The `name` field of a volume object.
pub fn name_field(v: &Value) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or_else(|| panic!("no string field `name` in {v}"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let keep = std::env::var_os("EVS_TEST_KEEP").is_some();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- last {} lines of evs-target's stderr ({}) ----\n{}\n---- end of evs-target's stderr ----",
                tail.len(),
                self.log_path().display(),
                tail.join("\n")
            );
        }
        if keep {
            if let Some(dir) = self.dir.take() {
                let p = dir.keep();
                eprintln!("EVS_TEST_KEEP: kept {}", p.display());
            }
        }
    }
}
