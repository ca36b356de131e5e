//! NBD over TLS: the server side of the TLS handshake after `NBD_OPT_STARTTLS`, and a pump
//! between the client's encrypted socket and a plain-text unix socket pair.
//!
//! The transmission phase hands a socket fd to the I/O engine (io_uring or portable) and lets
//! file reads land right behind the reply header: it needs plain text in a file descriptor.
//! So a TLS connection gets a `UnixStream::pair()`: the connection thread resumes haggling and
//! then runs the unchanged transmission phase on one end; a pump thread owns the rustls
//! session, the client's socket and the other end, and copies between them.
//!
//! The pump uses non-blocking sockets and poll(2). Its rules, each for a reason:
//! * decrypted data is drained from rustls on every pass, not only when the socket is
//!   readable: rustls can hold plaintext while the socket has nothing more to say;
//! * the socket is read only while rustls wants more (it refuses to buffer beyond its limit
//!   while decrypted data waits), and the unix end only once rustls took everything read
//!   before: both directions are bounded, so a slow reader on either side slows the other;
//! * an end of the client's socket without `close_notify` is a normal end (libnbd and qemu
//!   drop sessions that way);
//! * ends travel both ways: the client's end becomes a shutdown of the unix end's write side
//!   (the transmission phase then answers what it has and closes), and the closing of the
//!   unix end becomes a `close_notify` and a shutdown of the client's socket. Shutting down the
//!   client's socket from another thread (detach, SIGTERM) reaches the pump like a client end.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustls::{ServerConfig, ServerConnection};

/// Decrypted bytes held for the unix end before the client's socket stops being read.
const TO_PLAIN_CAP: usize = 256 << 10;
/// Encrypted bytes rustls queues for the client before it accepts no more plaintext.
const TLS_BUFFER_LIMIT: usize = 256 << 10;
/// Bytes read from the unix end at a time.
const CHUNK: usize = 256 << 10;
/// How long the last bytes and the `close_notify` may take to leave once the NBD side has
/// closed (a client that stopped reading must not keep the thread, and a drain, forever).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the pump needs of the client's socket (TCP, or the unix listener's socket when every
/// connection must use TLS).
pub trait Socket: Read + Write + AsFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl Socket for std::net::TcpStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, on)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        std::net::TcpStream::shutdown(self, how)
    }
}

impl Socket for UnixStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Runs the server side of the TLS handshake on `sock`, blocking, within the socket's
/// timeouts. A failure has been reported to the client (alert) as far as it can be.
pub fn accept<S: Socket>(config: Arc<ServerConfig>, sock: &mut S) -> io::Result<ServerConnection> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(sock)?;
    }
    Ok(tls)
}

/// Copies between the TLS session on `sock` and `plain` until both directions have ended.
/// Returns after closing both sockets' directions it used.
pub fn pump<S: Socket>(tls: ServerConnection, sock: S, plain: UnixStream) -> io::Result<()> {
    let mut p = Pump {
        tls,
        sock,
        plain,
        to_plain: Buffer::default(),
        to_tls: Buffer::default(),
        tls_eof: false,
        sock_eof: false,
        plain_eof: false,
        plain_shut: false,
        close_sent: false,
    };
    p.tls.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
    let r = p.sock.set_nonblocking(true).and_then(|()| p.plain.set_nonblocking(true)).and_then(|()| p.run());
    let _ = p.plain.shutdown(Shutdown::Both);
    let _ = p.sock.shutdown(Shutdown::Both);
    r
}

struct Pump<S> {
    tls: ServerConnection,
    sock: S,
    plain: UnixStream,
    /// Decrypted, not yet written to the unix end.
    to_plain: Buffer,
    /// Read from the unix end, not yet accepted by rustls.
    to_tls: Buffer,
    /// No more plaintext comes from the client (close_notify, or its socket ended).
    tls_eof: bool,
    /// The client's socket returned end-of-file.
    sock_eof: bool,
    /// The NBD side closed (or cannot take data any more).
    plain_eof: bool,
    /// The unix end's write side was shut down (the client's end, passed on).
    plain_shut: bool,
    close_sent: bool,
}

/// Readiness seen by the last poll (or assumed until an operation would block).
struct Ready {
    sock_in: bool,
    sock_out: bool,
    plain_in: bool,
    plain_out: bool,
}

impl<S: Socket> Pump<S> {
    fn run(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        let mut ready = Ready { sock_in: true, sock_out: true, plain_in: true, plain_out: true };
        loop {
            let mut progress = self.decrypted_out(&mut buf)?;
            progress |= self.write_plain(&mut ready);
            progress |= self.encrypt()?;
            progress |= self.write_sock(&mut ready)?;
            if self.plain_eof && self.to_tls.is_empty() && !self.tls.wants_write() {
                if self.close_sent {
                    let _ = self.sock.shutdown(Shutdown::Write);
                    return Ok(());
                }
                self.tls.send_close_notify();
                self.close_sent = true;
                continue;
            }
            progress |= self.read_sock(&mut ready)?;
            progress |= self.read_plain(&mut buf, &mut ready);
            if !progress && !self.wait(&mut ready)? {
                return Ok(());
            }
        }
    }

    /// Moves decrypted data out of rustls (bounded by [`TO_PLAIN_CAP`]).
    fn decrypted_out(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut progress = false;
        while !self.tls_eof && self.to_plain.len() < TO_PLAIN_CAP {
            let room = (TO_PLAIN_CAP - self.to_plain.len()).min(buf.len());
            match self.tls.reader().read(&mut buf[..room]) {
                Ok(0) => self.tls_eof = true,
                Ok(n) => {
                    self.to_plain.extend(&buf[..n]);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The client's socket ended without close_notify: a normal end here.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.tls_eof = true,
                Err(e) => return Err(e),
            }
        }
        if self.tls_eof && self.to_plain.is_empty() && !self.plain_shut {
            // The transmission phase sees the end, answers what it has, and closes its end.
            let _ = self.plain.shutdown(Shutdown::Write);
            self.plain_shut = true;
            progress = true;
        }
        Ok(progress)
    }

    fn write_plain(&mut self, ready: &mut Ready) -> bool {
        let mut progress = false;
        while ready.plain_out && !self.to_plain.is_empty() && !self.plain_eof {
            match (&self.plain).write(self.to_plain.data()) {
                Ok(n) if n > 0 => {
                    self.to_plain.consume(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.plain_out = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // The NBD side is gone (an error, or a write that takes nothing): nothing
                    // more to deliver to it.
                    self.plain_eof = true;
                    self.to_plain.clear();
                    progress = true;
                }
            }
        }
        if self.plain_eof && !self.to_plain.is_empty() {
            self.to_plain.clear();
        }
        if self.tls_eof && self.to_plain.is_empty() && !self.plain_shut {
            let _ = self.plain.shutdown(Shutdown::Write);
            self.plain_shut = true;
            progress = true;
        }
        progress
    }

    /// Hands what the NBD side wrote to rustls, as much as it takes.
    fn encrypt(&mut self) -> io::Result<bool> {
        let mut progress = false;
        while !self.to_tls.is_empty() && !self.close_sent {
            let n = self.tls.writer().write(self.to_tls.data())?;
            if n == 0 {
                break;
            }
            self.to_tls.consume(n);
            progress = true;
        }
        Ok(progress)
    }

    fn write_sock(&mut self, ready: &mut Ready) -> io::Result<bool> {
        let mut progress = false;
        while ready.sock_out && self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.sock_out = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    fn read_sock(&mut self, ready: &mut Ready) -> io::Result<bool> {
        // Once the NBD side has closed, only our last bytes and the close_notify matter.
        if !ready.sock_in || self.sock_eof || self.plain_eof || !self.tls.wants_read() {
            return Ok(false);
        }
        match self.tls.read_tls(&mut self.sock) {
            Ok(0) => self.sock_eof = true,
            Ok(_) => {
                if let Err(e) = self.tls.process_new_packets() {
                    // Send the alert rustls queued, then give up: the session is unusable.
                    let _ = self.tls.write_tls(&mut self.sock);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.sock_in = false;
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    fn read_plain(&mut self, buf: &mut [u8], ready: &mut Ready) -> bool {
        if !ready.plain_in || self.plain_eof || !self.to_tls.is_empty() {
            return false;
        }
        match (&self.plain).read(buf) {
            Ok(0) => self.plain_eof = true,
            Ok(n) => self.to_tls.extend(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.plain_in = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Reset by the NBD side: its end.
            Err(_) => self.plain_eof = true,
        }
        true
    }

    /// Waits until a socket can do what the pump wants of it. `false`: nothing can happen any
    /// more, or the close took longer than [`CLOSE_TIMEOUT`].
    fn wait(&mut self, ready: &mut Ready) -> io::Result<bool> {
        let mut sock_ev = PollFlags::empty();
        if !self.sock_eof && !self.plain_eof && self.tls.wants_read() {
            sock_ev |= PollFlags::IN;
        }
        if self.tls.wants_write() {
            sock_ev |= PollFlags::OUT;
        }
        let mut plain_ev = PollFlags::empty();
        if !self.plain_eof && self.to_tls.is_empty() {
            plain_ev |= PollFlags::IN;
        }
        if !self.plain_eof && !self.to_plain.is_empty() {
            plain_ev |= PollFlags::OUT;
        }
        // Only the sockets something is wanted of: a hung-up socket is always "ready" and
        // would make poll spin.
        let mut fds = Vec::with_capacity(2);
        if !sock_ev.is_empty() {
            fds.push(PollFd::new(&self.sock, sock_ev));
        }
        if !plain_ev.is_empty() {
            fds.push(PollFd::new(&self.plain, plain_ev));
        }
        if fds.is_empty() {
            return Ok(false);
        }
        let close_timeout =
            Timespec { tv_sec: CLOSE_TIMEOUT.as_secs() as _, tv_nsec: CLOSE_TIMEOUT.subsec_nanos() as _ };
        let timeout = if self.plain_eof { Some(&close_timeout) } else { None };
        let n = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(false);
        }
        let mut i = 0;
        // An error or hang-up counts as ready both ways: the next operation reports it.
        let any = PollFlags::ERR | PollFlags::HUP;
        if !sock_ev.is_empty() {
            let r = fds[i].revents();
            ready.sock_in |= r.intersects(PollFlags::IN | any);
            ready.sock_out |= r.intersects(PollFlags::OUT | any);
            i += 1;
        }
        if !plain_ev.is_empty() {
            let r = fds[i].revents();
            ready.plain_in |= r.intersects(PollFlags::IN | any);
            ready.plain_out |= r.intersects(PollFlags::OUT | any);
        }
        Ok(true)
    }
}

/// Bytes waiting to be written, consumed from the front without moving the rest each time.
#[derive(Default)]
struct Buffer {
    data: Vec<u8>,
    start: usize,
}

impl Buffer {
    fn len(&self) -> usize {
        self.data.len() - self.start
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn data(&self) -> &[u8] {
        &self.data[self.start..]
    }
    fn extend(&mut self, b: &[u8]) {
        if self.start > 0 && self.start == self.data.len() {
            self.clear();
        } else if self.start >= self.data.len() / 2 && self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.extend_from_slice(b);
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.data.len() {
            self.clear();
        }
    }
    fn clear(&mut self) {
        self.data.clear();
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_consumes_from_the_front() {
        let mut b = Buffer::default();
        assert!(b.is_empty());
        b.extend(b"hello ");
        b.extend(b"world");
        b.consume(6);
        assert_eq!(b.data(), b"world");
        b.extend(b"!");
        assert_eq!(b.data(), b"world!");
        b.consume(6);
        assert!(b.is_empty());
        assert_eq!(b.len(), 0);
    }
}
