//! A TCP forwarder whose connections a test can cut or slow down: between two daemons, to
//! break the replication link in the middle of a cycle; in front of the S3 server, for
//! errors and slow responses in the middle of a backup or a restore.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Live connections (both ends), shut down on a cut.
#[derive(Default)]
struct Conns(Mutex<Vec<TcpStream>>);

/// Forwards connections from `addr()` to a target address.
pub struct Proxy {
    addr: SocketAddr,
    conns: Arc<Conns>,
    stop: Arc<AtomicBool>,
    /// Delay before forwarding each piece of data, in milliseconds (0: none).
    delay_ms: Arc<AtomicU64>,
    /// While set, new connections are closed at once (the server looks down).
    down: Arc<AtomicBool>,
    /// Connections cut so far.
    pub cuts: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(Conns::default());
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        {
            let (conns, stop, delay, down) = (conns.clone(), stop.clone(), delay_ms.clone(), down.clone());
            l.set_nonblocking(true).unwrap();
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((client, _)) => {
                            if down.load(Ordering::Acquire) {
                                let _ = client.shutdown(Shutdown::Both);
                                continue;
                            }
                            client.set_nonblocking(false).unwrap();
                            let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                                continue;
                            };
                            {
                                let mut g = conns.0.lock().unwrap();
                                g.push(client.try_clone().unwrap());
                                g.push(server.try_clone().unwrap());
                            }
                            pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), delay.clone());
                            pipe(server, client, delay.clone());
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Proxy { addr, conns, stop, delay_ms, down, cuts: Arc::new(AtomicU64::new(0)) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the "server" down (every connection cut, new ones closed at once) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Release);
        if down {
            self.cut();
        }
    }

    /// Slows every connection down: each piece of data (up to 64 KiB) waits `d` first.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Shuts down every connection going through the proxy now.
    pub fn cut(&self) {
        let mut g = self.conns.0.lock().unwrap();
        for c in g.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay_ms: Arc<AtomicU64>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let d = delay_ms.load(Ordering::Relaxed);
                    if d > 0 {
                        thread::sleep(Duration::from_millis(d));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
    }
}
