//! A fault-injecting engine for tests: wraps a real engine and fails the ops a rule picks,
//! without executing them (as a disk returning EIO or ENOSPC would).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::{Completion, EngineKind, IoEngine, Op};

/// Decides, per op, whether it fails and with which errno.
pub type FaultRule = Arc<dyn Fn(&Op) -> Option<i32> + Send + Sync>;

pub struct FaultyEngine {
    inner: Box<dyn IoEngine>,
    rule: FaultRule,
    failed: Vec<Completion>,
}

/// The rule of test builds (the `failpoints` feature), wrapped around every engine: a write
/// fails while the fail point `io-write-fault` is on, with the errno its argument names
/// (`FAILPOINTS="io-write-fault=20*off->5*return(28)"`: the 21st to 25th writes fail with
/// ENOSPC), EIO without one. Writes are data writes of NBD and vhost-user requests.
#[cfg(feature = "failpoints")]
pub fn failpoint_rule(op: &Op) -> Option<i32> {
    match op {
        Op::Write { .. } => fail::eval("io-write-fault", |arg| arg.and_then(|a| a.parse().ok()).unwrap_or(libc::EIO)),
        _ => None,
    }
}

impl FaultyEngine {
    pub fn new(inner: Box<dyn IoEngine>, rule: FaultRule) -> FaultyEngine {
        FaultyEngine { inner, rule, failed: Vec::new() }
    }
}

impl IoEngine for FaultyEngine {
    fn push(&mut self, tag: u64, op: Op) {
        match (self.rule)(&op) {
            Some(errno) => self.failed.push(Completion { tag, result: Err(io::Error::from_raw_os_error(errno)), op }),
            None => self.inner.push(tag, op),
        }
    }

    fn wait(&mut self, min_complete: usize) -> io::Result<()> {
        let min = min_complete.saturating_sub(self.failed.len());
        self.inner.wait(min)
    }

    fn wait_until(&mut self, min_complete: usize, deadline: Instant) -> io::Result<()> {
        let min = min_complete.saturating_sub(self.failed.len());
        self.inner.wait_until(min, deadline)
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.failed);
        self.inner.drain(out);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}
