//! Helpers shared by the integration tests.
//!
//! Every test starts its own `evs-target` ([`Daemon::start`]) in a temporary directory with
//! free loopback ports, drives it with the real `evsctl` binary and real NBD clients (qemu-img,
//! qemu-io, libnbd's nbdinfo/nbdcopy, and the small raw client of [`nbd_client`]), and checks
//! what comes back. The binaries are taken from the target directory of the test executable, so
//! `cargo build --workspace --bins` must run before the tests; the I/O backend under test comes
//! from `EVS_TEST_IO_BACKEND` (`uring`, `portable` or `auto`, the default).
//!
//! External tools (Debian packages, installed by the test command; a missing tool fails the
//! test with the package to install, it never skips): `qemu-img` and `qemu-io` (qemu-utils),
//! `nbdinfo` and `nbdcopy` (libnbd-bin).
//!
//! Environment knobs: `EVS_TEST_IO_BACKEND`, `EVS_BIN_DIR` (where the binaries are),
//! `EVS_TEST_KEEP=1` (keep each test's directory: data, socket, daemon logs),
//! `EVS_TEST_LOG` (the daemon's `RUST_LOG`, default `info`), `EVS_TEST_SEED` (replay a
//! randomised test), `EVS_TEST_START_TIMEOUT` (seconds to wait for readiness, default 60),
//! `EVS_CRASH_ITERATIONS` (kill -9 rounds of the crash test, default 20),
//! `EVS_GARBAGE_CASES` (connections of random garbage in `tests/garbage.rs`, default 1000).

pub mod daemon;
pub mod durability;
pub mod fio;
pub mod grpc;
pub mod metrics;
pub mod nbd_client;
pub mod proxy;
pub mod s3;
pub mod tools;
pub mod util;
pub mod vhost_driver;
pub mod vm;

pub use daemon::{bin_path, io_backend, name_field, u64_field, volume_list, volume_object, Daemon, DaemonOptions};
pub use nbd_client::{ConnectOptions, NbdClient, NbdUri, RawConn, TlsClient};
pub use tools::{require_tool, run_tool, tool};
