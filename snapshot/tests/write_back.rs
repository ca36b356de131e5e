//! Writes replied to before their op completed (`Volume::reply_early`): which writes qualify, a
//! flush that waits for them and reports their failure, and a second writer that turns it off.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use evs_snapshot::io_engine::run_one;
use evs_snapshot::volume::PendingWrite;
use evs_snapshot::{BlockStore, EngineKind, StoreError, StoreOptions, Volume, WritePlan};

const BLOCK: usize = 4096;

fn volume(dir: &tempfile::TempDir) -> (Arc<BlockStore>, Arc<Volume>) {
    let opts = StoreOptions { direct_writes: true, ..Default::default() };
    let store = BlockStore::open(dir.path(), opts).unwrap();
    let id = store.create_volume("t", "v", 64 * BLOCK as u64).unwrap().id;
    let vol = store.open_volume(id).unwrap();
    (store, vol)
}

/// Plans an aligned write; returns its op and pending state.
fn plan(vol: &Volume, off: u64, data: &[u8]) -> (evs_snapshot::Op, PendingWrite) {
    match vol.plan_write(off, data).unwrap() {
        WritePlan::Submit { op, pending } => (op, pending),
        WritePlan::Done => panic!("an aligned write was done inline"),
    }
}

fn read(vol: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    vol.read_at(off, &mut buf).unwrap();
    buf
}

/// Starts `vol.flush()` on another thread; the receiver gets its result.
fn flush_in_background(vol: &Arc<Volume>) -> mpsc::Receiver<Result<(), StoreError>> {
    let (tx, rx) = mpsc::channel();
    let v = vol.clone();
    thread::spawn(move || tx.send(v.flush()).unwrap());
    rx
}

/// Gives `rx`'s sender 100 ms, then checks it has sent nothing yet: it is still waiting.
fn assert_waiting<T>(rx: &mpsc::Receiver<T>, what: &str) {
    thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "{what}");
}

/// Runs a planned write's op and commits it.
fn complete(vol: &Volume, op: evs_snapshot::Op, pending: PendingWrite) {
    let mut engine = EngineKind::Portable.build(8).unwrap();
    let (_, r) = run_one(engine.as_mut(), op);
    r.unwrap();
    vol.commit_write(pending);
}

#[test]
fn only_overwrites_of_the_heads_blocks_qualify() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let _w = vol.open_writer();
    // Block 0 is a hole: a write there allocates, so its reply waits for the op.
    let (_op, mut p) = plan(&vol, 0, &[1u8; BLOCK]);
    assert!(!vol.reply_early(&mut p), "a write into a hole was replied to early");
    drop(p);
    vol.write_at(0, &[2u8; BLOCK]).unwrap();
    let (_op, mut p) = plan(&vol, 0, &[3u8; BLOCK]);
    assert!(vol.reply_early(&mut p), "an overwrite of a written block does not qualify");
    // Once is enough: asking twice does not count it twice.
    assert!(!vol.reply_early(&mut p));
    vol.commit_write(p);
    // Blocks 0 and 1: block 1 is a hole, so the write does not qualify.
    let (_op, mut p) = plan(&vol, 0, &[4u8; 2 * BLOCK]);
    assert!(!vol.reply_early(&mut p), "a write half over a hole was replied to early");
    drop(p);
    vol.flush().unwrap();
}

#[test]
fn only_writes_that_go_direct_qualify() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let _w = vol.open_writer();
    let max = StoreOptions::default().direct_write_max;
    vol.write_at(0, &vec![1u8; 2 * max]).unwrap();
    // Both overwrite written blocks; only the one small enough for O_DIRECT is answered early.
    let (_op, mut p) = plan(&vol, 0, &vec![2u8; max]);
    assert!(vol.reply_early(&mut p), "an O_DIRECT-sized overwrite does not qualify");
    vol.commit_write(p);
    let (_op, mut p) = plan(&vol, 0, &vec![3u8; max + BLOCK]);
    assert!(!vol.reply_early(&mut p), "a write through the page cache was replied to early");
    drop(p);
    vol.flush().unwrap();
}

#[test]
fn flush_waits_for_early_replied_writes_and_sees_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let _w = vol.open_writer();
    vol.write_at(0, &[1u8; BLOCK]).unwrap();
    let (op, mut p) = plan(&vol, 0, &[7u8; BLOCK]);
    assert!(vol.reply_early(&mut p));
    let done = flush_in_background(&vol);
    assert_waiting(&done, "a flush returned while a replied write was still in flight");
    complete(&vol, op, p);
    done.recv_timeout(Duration::from_secs(10)).expect("the flush never returned").unwrap();
    assert_eq!(read(&vol, 0, BLOCK), vec![7u8; BLOCK]);
    // With nothing in flight a flush does not wait.
    vol.flush().unwrap();
}

#[test]
fn writes_started_after_a_flush_do_not_hold_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let _w = vol.open_writer();
    vol.write_at(0, &[1u8; 2 * BLOCK]).unwrap();
    let (op_a, mut a) = plan(&vol, 0, &[2u8; BLOCK]);
    assert!(vol.reply_early(&mut a));
    let first = flush_in_background(&vol);
    thread::sleep(Duration::from_millis(50));
    // Replied after the flush started: the flush need not cover it.
    let (_op_b, mut b) = plan(&vol, BLOCK as u64, &[3u8; BLOCK]);
    assert!(vol.reply_early(&mut b));
    complete(&vol, op_a, a);
    first.recv_timeout(Duration::from_secs(10)).expect("a flush waited for a write replied after it began").unwrap();
    // The next flush does wait for it.
    let second = flush_in_background(&vol);
    assert_waiting(&second, "the next flush did not wait for the write replied before it");
    vol.commit_write(b);
    second.recv_timeout(Duration::from_secs(10)).expect("the second flush never returned").unwrap();
}

#[test]
fn a_failed_early_write_fails_the_next_flush_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let _w = vol.open_writer();
    vol.write_at(0, &[1u8; BLOCK]).unwrap();
    vol.flush().unwrap();
    let (_op, mut p) = plan(&vol, 0, &[9u8; BLOCK]);
    assert!(vol.reply_early(&mut p));
    vol.fail_write(p, &std::io::Error::from_raw_os_error(libc::EIO));
    match vol.flush() {
        Err(StoreError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        other => panic!("the flush after a failed write: {other:?}"),
    }
    vol.flush().expect("the failure is reported once");
    // The op never ran: the block keeps what the last flush made durable.
    assert_eq!(read(&vol, 0, BLOCK), vec![1u8; BLOCK]);
    // A pending write dropped without an outcome counts as failed too.
    let (_op, mut p) = plan(&vol, 0, &[5u8; BLOCK]);
    assert!(vol.reply_early(&mut p));
    drop(p);
    assert!(vol.flush().is_err(), "a replied write dropped without completing went unreported");
}

#[test]
fn a_second_writer_turns_early_replies_off_and_waits_for_the_given_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, vol) = volume(&dir);
    let first = vol.open_writer();
    vol.write_at(0, &[1u8; BLOCK]).unwrap();
    let (op, mut p) = plan(&vol, 0, &[6u8; BLOCK]);
    assert!(vol.reply_early(&mut p));
    // The newcomer waits until the replied write completed.
    let (tx, rx) = mpsc::channel();
    let v = vol.clone();
    let opener = thread::spawn(move || {
        let w = v.open_writer();
        tx.send(()).unwrap();
        w
    });
    assert_waiting(&rx, "a second writer started while a replied write was in flight");
    complete(&vol, op, p);
    rx.recv_timeout(Duration::from_secs(10)).expect("the second writer never started");
    let second = opener.join().unwrap();
    assert_eq!(read(&vol, 0, BLOCK), vec![6u8; BLOCK], "the second writer does not see the replied write");
    let (_op, mut p) = plan(&vol, 0, &[8u8; BLOCK]);
    assert!(!vol.reply_early(&mut p), "replied early with two writers");
    drop(p);
    drop(second);
    let (_op, mut p) = plan(&vol, 0, &[8u8; BLOCK]);
    assert!(vol.reply_early(&mut p), "one writer left, and still no early reply");
    vol.commit_write(p);
    drop(first);
    vol.flush().unwrap();
}
