//! Writes replied to before their data reached the disk (write-back): with one connection on
//! a volume, an overwrite of written blocks is answered as soon as its O_DIRECT op is submitted.
//! What a client must still see: a read right after the reply returns the new data, a FLUSH
//! covers every replied write (kill -9 after it loses none), and with a second connection open
//! no write is replied to early, so the other connection reads it as soon as it is answered.

use evs_tests::nbd_client::consts::{CMD_READ, CMD_WRITE};
use evs_tests::util::{Rng, BLOCK, MIB};
use evs_tests::{Daemon, NbdClient};

const SIZE: u64 = 4 * MIB;
const BATCH: u64 = 8;

fn early_replies(d: &Daemon, volume: &str) -> f64 {
    d.metrics().get("evs_volume_write_early_replies_total", &[("volume", volume)]).unwrap_or(0.0)
}

/// Fills the volume (every block written and flushed): later writes are overwrites.
fn fill(c: &mut NbdClient, rng: &mut Rng) -> Vec<u8> {
    let data = rng.bytes(SIZE as usize);
    for off in (0..SIZE).step_by(MIB as usize) {
        c.write(off, &data[off as usize..(off + MIB) as usize]).unwrap();
    }
    c.flush().unwrap();
    data
}

/// Sends `BATCH` writes to every other block of a random span, then one read of the span,
/// before reading any reply; the read must return what was just written.
fn pipelined_round(c: &mut NbdClient, model: &mut [u8], rng: &mut Rng) {
    let span = 2 * BATCH;
    let first = rng.below(SIZE / BLOCK - span + 1);
    let mut writes = Vec::new();
    for b in (first..first + span).step_by(2) {
        let data = rng.bytes(BLOCK as usize);
        let h = c.send_request(0, CMD_WRITE, b * BLOCK, BLOCK as u32, &data).unwrap();
        model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&data);
        writes.push((h, b));
    }
    let (off, len) = (first * BLOCK, (span * BLOCK) as u32);
    let read = c.send_request(0, CMD_READ, off, len, &[]).unwrap();
    // Early replies go out as the writes start, so they precede the read's reply.
    for (h, b) in writes {
        c.read_reply(h, CMD_WRITE, b * BLOCK, BLOCK as u32).unwrap_or_else(|e| panic!("write of block {b}: {e}"));
    }
    let got = c.read_reply(read, CMD_READ, off, len).unwrap_or_else(|e| panic!("read: {e}")).expect("no read data");
    assert!(
        got == model[off as usize..off as usize + len as usize],
        "blocks {first}..{}: a read sent right after writes to them returned other data",
        first + span
    );
}

#[test]
fn reads_see_early_replied_writes_and_a_flush_makes_them_durable() {
    let mut d = Daemon::start();
    let (uri, unix) = d.create_volume("wb", "4M");
    let mut rng = Rng::from_env_or_time("write-back");
    let mut c = NbdClient::connect(&uri).unwrap();
    let mut model = fill(&mut c, &mut rng);
    let before = early_replies(&d, "wb");
    for _ in 0..50 {
        pipelined_round(&mut c, &mut model, &mut rng);
    }
    let early = early_replies(&d, "wb") - before;
    assert!(early >= (50 * BATCH) as f64, "only {early} of {} overwrites were replied to early", 50 * BATCH);
    // The flush covers every replied write: kill -9 right after it, and they are all there.
    c.flush().unwrap();
    drop(c);
    d.kill9();
    d.restart();
    let mut c = NbdClient::connect(&unix).unwrap();
    let got = c.read_all(0, SIZE, MIB as u32).unwrap();
    assert!(got == model, "after a flush, kill -9 and a restart the volume lost replied writes");
}

#[test]
fn a_second_connection_turns_early_replies_off() {
    let d = Daemon::start();
    let (uri, unix) = d.create_volume("wb2", "4M");
    let mut rng = Rng::from_env_or_time("write-back-two");
    let mut a = NbdClient::connect(&uri).unwrap();
    let mut model = fill(&mut a, &mut rng);
    let mut b = NbdClient::connect(&unix).unwrap();
    let before = early_replies(&d, "wb2");
    for i in 0..200u64 {
        let blk = rng.below(SIZE / BLOCK);
        let data = rng.bytes(BLOCK as usize);
        a.write(blk * BLOCK, &data).unwrap();
        model[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize].copy_from_slice(&data);
        // No flush in between: what a's reply covers, b reads at once.
        assert!(b.read(blk * BLOCK, BLOCK as u32).unwrap() == data, "write {i}: the other connection read old data");
    }
    assert_eq!(early_replies(&d, "wb2"), before, "writes were replied to early with two connections open");
    // With b gone, a replies early again. Until the daemon has seen b leave, a's writes are
    // answered at completion, in completion order: so single writes first (their replies
    // cannot cross), pipelined rounds once one was answered early.
    drop(b);
    let mut replied_early = false;
    for _ in 0..2000 {
        let blk = rng.below(SIZE / BLOCK);
        let data = rng.bytes(BLOCK as usize);
        a.write(blk * BLOCK, &data).unwrap();
        model[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize].copy_from_slice(&data);
        if early_replies(&d, "wb2") > before {
            replied_early = true;
            break;
        }
    }
    assert!(replied_early, "early replies stayed off after the second connection closed");
    for _ in 0..5 {
        pipelined_round(&mut a, &mut model, &mut rng);
    }
    a.flush().unwrap();
    assert!(a.read_all(0, SIZE, MIB as u32).unwrap() == model);
}
