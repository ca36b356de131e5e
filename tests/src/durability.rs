//! The durability rule as a model: a workload of sequence-numbered block writes, trims,
//! write-zeroes and flushes over NBD, and a check of a volume read back after a crash —
//! every write acknowledged before a completed FLUSH (or written with FUA) reads back intact,
//! and no block reads as something it never held. Used by the kill -9 and crash-point tests.

use crate::nbd_client::consts::CMD_FLAG_FUA;
use crate::util::{Rng, BLOCK};
use crate::NbdClient;

pub const MAGIC: u64 = 0x4556_5343_5241_5348; // "EVSCRASH"

/// Content of block `blk` written by operation `seq`: a header naming both, then bytes derived
/// from them, so a block read back tells which write it came from, or that it is garbage.
pub fn block_content(seq: u64, blk: u64) -> Vec<u8> {
    let mut v = Rng::new(seq.wrapping_mul(0x1_0000_0001) ^ blk).bytes(BLOCK as usize);
    v[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v[16..24].copy_from_slice(&blk.to_le_bytes());
    v
}

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub seq: u64,
    /// A trim or write-zeroes: the block reads as zeros afterwards.
    pub zero: bool,
}

/// What the test knows about each block, across all iterations.
pub struct Model {
    /// Every operation ever sent for the block (acknowledged or not).
    pub history: Vec<Vec<Op>>,
    /// Latest operation acknowledged for the block.
    pub last_acked: Vec<Option<u64>>,
    /// Oldest operation whose result may still be seen: the latest one made durable by a
    /// completed FLUSH (or its own FUA). None: nothing durable yet, zeros are allowed.
    pub durable: Vec<Option<u64>>,
    pub next_seq: u64,
    pub flushes: u64,
    pub acked_ops: u64,
}

impl Model {
    /// A model of a volume of `blocks` blocks that was never written.
    pub fn new(blocks: u64) -> Model {
        Model {
            history: vec![Vec::new(); blocks as usize],
            last_acked: vec![None; blocks as usize],
            durable: vec![None; blocks as usize],
            next_seq: 1,
            flushes: 0,
            acked_ops: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.history.len() as u64
    }

    /// Every block of `all` (the whole volume, read back) against the model: the wrong ones,
    /// explained.
    pub fn check_all(&self, all: &[u8]) -> Vec<String> {
        let mut bad = Vec::new();
        for blk in 0..self.blocks() {
            let got = &all[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize];
            if let Err(why) = self.check(blk, got) {
                bad.push(format!("block {blk}: {why}"));
            }
        }
        bad
    }

    /// How many blocks have a durable write (or zeroing) to check.
    pub fn durable_blocks(&self) -> usize {
        self.durable.iter().filter(|d| d.is_some()).count()
    }

    pub fn make_durable(&mut self, blk: u64, seq: u64) {
        let d = &mut self.durable[blk as usize];
        *d = Some(d.map_or(seq, |old| old.max(seq)));
    }

    /// Checks one block read after a restart; Err explains what is wrong.
    pub fn check(&self, blk: u64, got: &[u8]) -> Result<(), String> {
        let floor = self.durable[blk as usize];
        let ops = &self.history[blk as usize];
        let allowed = |op: &Op| floor.is_none_or(|f| op.seq >= f);
        if got.iter().all(|&b| b == 0) {
            if floor.is_none() || ops.iter().any(|op| op.zero && allowed(op)) {
                return Ok(());
            }
            return Err(format!("reads as zeros, but write {} was durable", floor.unwrap()));
        }
        let magic = u64::from_le_bytes(got[0..8].try_into().unwrap());
        let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let which = u64::from_le_bytes(got[16..24].try_into().unwrap());
        if magic != MAGIC {
            return Err("holds garbage (no header of any write)".into());
        }
        if which != blk {
            return Err(format!("holds the content that write {seq} sent to block {which}"));
        }
        if got != block_content(seq, blk).as_slice() {
            return Err(format!("holds a torn or corrupted copy of write {seq}"));
        }
        match ops.iter().find(|op| op.seq == seq && !op.zero) {
            None => Err(format!("holds write {seq}, which never wrote this block")),
            Some(op) if !allowed(op) => Err(format!(
                "holds write {seq}, older than write {} that a completed flush made durable",
                floor.unwrap()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// One client's workload until the connection breaks: 1–4 block writes (1 in 10 with FUA),
/// some trims and write-zeroes, a FLUSH every `flush_every` operations.
pub fn workload(mut c: NbdClient, mut model: Model, mut rng: Rng, flush_every: u64) -> Model {
    // Acknowledgements of the previous daemon process are not covered by this one's flushes.
    model.last_acked.fill(None);
    let blocks = model.blocks();
    let mut since_flush = 0;
    loop {
        let n = rng.range(1, 5).min(blocks);
        let first = rng.below(blocks - n + 1);
        let seq = model.next_seq;
        model.next_seq += 1;
        let kind = rng.below(20);
        let zero = kind < 2;
        for b in first..first + n {
            model.history[b as usize].push(Op { seq, zero });
        }
        let mut fua = false;
        let res = match kind {
            0 => c.trim(first * BLOCK, (n * BLOCK) as u32),
            1 => c.write_zeroes(first * BLOCK, (n * BLOCK) as u32, 0),
            _ => {
                let mut data = Vec::with_capacity((n * BLOCK) as usize);
                for b in first..first + n {
                    data.extend_from_slice(&block_content(seq, b));
                }
                fua = rng.chance(10);
                c.write_flags(first * BLOCK, &data, if fua { CMD_FLAG_FUA } else { 0 })
            }
        };
        if res.is_err() {
            return model;
        }
        model.acked_ops += 1;
        for b in first..first + n {
            model.last_acked[b as usize] = Some(seq);
            if fua {
                model.make_durable(b, seq);
            }
        }
        since_flush += 1;
        if since_flush >= flush_every {
            since_flush = 0;
            // Everything acknowledged so far is covered by this flush.
            let covered: Vec<(u64, u64)> =
                model.last_acked.iter().enumerate().filter_map(|(b, s)| s.map(|s| (b as u64, s))).collect();
            if c.flush().is_err() {
                return model;
            }
            model.flushes += 1;
            for (b, s) in covered {
                model.make_durable(b, s);
            }
        }
    }
}
