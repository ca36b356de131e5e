//! Property test: whatever bytes a client sends on the NBD socket (TCP or unix), the daemon
//! neither crashes nor blocks. Each case is one connection to a "victim" export carrying one
//! of:
//! * random bytes from the first byte on (before the greeting is even read);
//! * a valid client handshake cut at a random byte, then random bytes;
//! * a complete handshake, then random bytes in the transmission phase;
//! * a complete handshake, then request headers with the right magic and random fields
//!   (commands, flags, offsets near the end of the export and past it, lengths up to 4 GiB),
//!   each followed by a random amount of payload.
//!
//! After each case the client half-closes, and the server must close the connection within
//! [`REACT`] (no connection is left hanging on a client that is gone); the daemon must still
//! run; a client that stays connected the whole time to another export, and a fresh client
//! (over TCP and the unix socket alternately), must write and read back their data; at the end
//! the whole region written by the good clients must read back as the model says.
//!
//! `EVS_GARBAGE_CASES` sets the number of cases (default 1000, a few seconds here);
//! `EVS_TEST_SEED` replays a run (the seed is printed). A failing case is shrunk by proptest
//! and printed.

use std::cell::RefCell;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use evs_tests::nbd_client::consts::*;
use evs_tests::nbd_client::{info_request, request_bytes, Ending, RawConn, Target};
use evs_tests::util::{assert_bytes_eq, Rng, KIB, MIB};
use evs_tests::{ConnectOptions, Daemon, NbdClient, NbdUri};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// How long the server may take to close a connection the client has half-closed.
const REACT: Duration = Duration::from_secs(10);
const VICTIM_SIZE: u64 = 64 * MIB;
const GOOD_SIZE: &str = "16M";
/// The good clients' region: `SLOTS` slots of `SLOT` bytes.
const SLOT: u64 = 64 * KIB;
const SLOTS: u64 = 128;

#[derive(Debug, Clone)]
enum Case {
    /// Random bytes right after connecting.
    Garbage { unix: bool, bytes: Vec<u8> },
    /// A valid handshake cut after `cut` bytes (modulo its length), then random bytes.
    CutHandshake { unix: bool, go: bool, structured: bool, cut: usize, garbage: Vec<u8> },
    /// A complete handshake, then random bytes.
    Transmission { unix: bool, go: bool, structured: bool, bytes: Vec<u8> },
    /// A complete handshake, then requests with the right magic and random fields.
    Requests { unix: bool, go: bool, structured: bool, requests: Vec<Request> },
}

#[derive(Debug, Clone)]
struct Request {
    flags: u16,
    cmd: u16,
    offset: u64,
    len: u32,
    /// Payload bytes actually sent after the header (any command; may differ from `len`).
    payload: usize,
}

impl Case {
    /// The handshake the test runs (and checks) itself before sending the case's bytes.
    fn handshake(&self) -> Option<ConnectOptions> {
        match self {
            Case::Transmission { go, structured, .. } | Case::Requests { go, structured, .. } => {
                Some(ConnectOptions { structured_replies: *structured, use_export_name: !*go })
            }
            _ => None,
        }
    }

    fn unix(&self) -> bool {
        match self {
            Case::Garbage { unix, .. }
            | Case::CutHandshake { unix, .. }
            | Case::Transmission { unix, .. }
            | Case::Requests { unix, .. } => *unix,
        }
    }
}

fn offsets() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..VICTIM_SIZE / 4096).prop_map(|b| b * 4096),
        (0..8192u64).prop_map(|d| VICTIM_SIZE.wrapping_sub(4096).wrapping_add(d)),
        any::<u64>(),
        Just(u64::MAX),
    ]
}

fn lengths() -> impl Strategy<Value = u32> {
    prop_oneof![0..70_000u32, Just(32u32 << 20), (32u32 << 20)..(33u32 << 20), any::<u32>()]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![Just(0u16), 0..32u16, any::<u16>()],
        prop_oneof![0..8u16, any::<u16>()],
        offsets(),
        lengths(),
        prop_oneof![Just(0usize), 0..8192usize],
    )
        .prop_map(|(flags, cmd, offset, len, payload)| Request { flags, cmd, offset, len, payload })
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        (any::<bool>(), vec(any::<u8>(), 0..4096)).prop_map(|(unix, bytes)| Case::Garbage { unix, bytes }),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<usize>(), vec(any::<u8>(), 0..2048))
            .prop_map(|(unix, go, structured, cut, garbage)| Case::CutHandshake { unix, go, structured, cut, garbage }),
        (any::<bool>(), any::<bool>(), any::<bool>(), vec(any::<u8>(), 0..4096))
            .prop_map(|(unix, go, structured, bytes)| Case::Transmission { unix, go, structured, bytes }),
        (any::<bool>(), any::<bool>(), any::<bool>(), vec(request(), 1..24))
            .prop_map(|(unix, go, structured, requests)| Case::Requests { unix, go, structured, requests }),
    ]
}

/// The client's side of a complete fixed-newstyle handshake for `export`, sent without
/// waiting for the server's replies.
fn handshake_bytes(export: &str, go: bool, structured: bool) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let mut option = |opt: u32, data: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    if structured {
        option(OPT_STRUCTURED_REPLY, &[]);
    }
    if go {
        option(OPT_GO, &info_request(export, &[INFO_BLOCK_SIZE]));
    } else {
        option(OPT_EXPORT_NAME, export.as_bytes());
    }
    b
}

/// The bytes a case sends.
fn case_bytes(case: &Case, export: &str, rng: &mut Rng) -> Vec<u8> {
    match case {
        Case::Garbage { bytes, .. } => bytes.clone(),
        Case::CutHandshake { go, structured, cut, garbage, .. } => {
            let mut b = handshake_bytes(export, *go, *structured);
            b.truncate(cut % b.len());
            b.extend_from_slice(garbage);
            b
        }
        Case::Transmission { bytes, .. } => bytes.clone(),
        Case::Requests { requests, .. } => {
            let mut b = Vec::new();
            for (i, r) in requests.iter().enumerate() {
                let payload = rng.bytes(r.payload);
                b.extend_from_slice(&request_bytes(REQUEST_MAGIC, r.flags, r.cmd, i as u64, r.offset, r.len, &payload));
            }
            b
        }
    }
}

/// Sends the case on its own connection (after a complete handshake, checked, if `handshake`),
/// half-closes, and waits for the server to close.
fn run_case(target: &Target, export: &str, handshake: Option<ConnectOptions>, bytes: &[u8]) -> Result<(), String> {
    let mut c = RawConn::connect(target).map_err(|e| format!("connect: {e}"))?;
    c.stream.set_write_timeout(Some(REACT)).map_err(|e| format!("set_write_timeout: {e}"))?;
    c.set_read_timeout(REACT);
    if let Some(opts) = handshake {
        let n = NbdClient::handshake(c, export, &opts).map_err(|e| format!("handshake: {e}"))?;
        if n.size() != VICTIM_SIZE {
            return Err(format!("handshake: export of {} bytes, expected {VICTIM_SIZE}", n.size()));
        }
        c = n.conn;
    }
    // The server may close before everything is sent (it stops reading at the first bad
    // byte): a failed send is fine, what matters is what happens next.
    let _ = c.send(bytes);
    let _ = c.stream.shutdown(Shutdown::Write);
    let t0 = Instant::now();
    match c.wait_closed(REACT) {
        Ending::Closed { .. } => Ok(()),
        Ending::StillOpen { bytes_received } => Err(format!(
            "the server kept the connection open {:?} after the client's EOF ({bytes_received} bytes received meanwhile)",
            t0.elapsed()
        )),
    }
}

struct Good {
    /// Connected from the start, to the good export, over TCP.
    steady: NbdClient,
    tcp: String,
    unix: String,
    model: Vec<u8>,
    rng: Rng,
    checks: u64,
}

impl Good {
    /// A write and a read-back on the steady connection and on a fresh one.
    fn check(&mut self, fresh_over_unix: bool) -> Result<(), String> {
        let uri = if fresh_over_unix { &self.unix } else { &self.tcp };
        let mut fresh = NbdClient::connect(uri).map_err(|e| format!("a fresh client cannot connect to {uri}: {e}"))?;
        fresh.set_timeout(REACT);
        for (name, c) in [("steady", &mut self.steady), ("fresh", &mut fresh)] {
            let slot = self.rng.below(SLOTS);
            let len = self.rng.range(1, SLOT + 1);
            let off = slot * SLOT + self.rng.below(SLOT - len + 1);
            let data = self.rng.bytes(len as usize);
            c.write(off, &data).map_err(|e| format!("{name} client: write {off}+{len}: {e}"))?;
            let got = c.read(off, len as u32).map_err(|e| format!("{name} client: read {off}+{len}: {e}"))?;
            if got != data {
                return Err(format!("{name} client: read back other data than it wrote at {off}+{len}"));
            }
            self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        fresh.disconnect().map_err(|e| format!("fresh client: disconnect: {e}"))?;
        self.checks += 1;
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("EVS_GARBAGE_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

#[test]
fn garbage_on_the_nbd_socket_never_crashes_or_blocks_the_daemon() {
    let mut d = Daemon::start();
    let (victim_tcp, victim_unix) = d.create_volume("victim", &format!("{}M", VICTIM_SIZE / MIB));
    let (good_tcp, good_unix) = d.create_volume("good", GOOD_SIZE);
    let victim = NbdUri::parse(&victim_tcp).unwrap();
    let tcp_target = victim.target.clone();
    let unix_target = NbdUri::parse(&victim_unix).unwrap().target;
    let export = victim.export.clone();

    let steady = NbdClient::connect(&good_tcp).expect("steady client");
    steady.set_timeout(REACT);
    let seed = std::env::var("EVS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let n = cases();
    eprintln!("garbage: {n} cases, seed {seed} (replay with EVS_TEST_SEED={seed}; more cases with EVS_GARBAGE_CASES)");
    let good = RefCell::new(Good {
        steady,
        tcp: good_tcp,
        unix: good_unix,
        model: vec![0u8; (SLOTS * SLOT) as usize],
        rng: Rng::new(seed ^ 0x600d),
        checks: 0,
    });
    let payload_rng = RefCell::new(Rng::new(seed));
    let ran = RefCell::new(0u64);

    let config = Config {
        cases: n,
        failure_persistence: None,
        max_shrink_iters: 64,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let t0 = Instant::now();
    let result = {
        let daemon = RefCell::new(&mut d);
        TestRunner::new(config).run(&case(), |case| {
            *ran.borrow_mut() += 1;
            let target = if case.unix() { &unix_target } else { &tcp_target };
            let bytes = case_bytes(&case, &export, &mut payload_rng.borrow_mut());
            run_case(target, &export, case.handshake(), &bytes).map_err(TestCaseError::fail)?;
            if !daemon.borrow_mut().is_running() {
                return Err(TestCaseError::fail("evs-target exited"));
            }
            good.borrow_mut().check(!case.unix()).map_err(TestCaseError::fail)?;
            Ok(())
        })
    };
    let elapsed = t0.elapsed();
    let ran = *ran.borrow();
    if let Err(e) = result {
        d.assert_running();
        panic!("after {ran} connections (seed {seed}): {e}");
    }
    d.assert_running();

    let mut good = good.into_inner();
    assert_eq!(good.checks, u64::from(n), "every case was followed by a check of the good clients");
    let got = good.steady.read_all(0, SLOTS * SLOT, 1 << 20).expect("read the good region back");
    assert_bytes_eq(&got, &good.model, 0, "the good export after all the garbage");
    eprintln!("garbage: {n} cases ({ran} connections with garbage) in {elapsed:?}, daemon still serving");
}
