//! The byte-stream workload (redirect-agent/tests/streams.rs): a client (`redirect-testbed
//! stream`) and a server (`redirect-testbed stream-server`) that move seeded pseudo-random byte
//! streams and check every byte end to end, through half-closes, resets, a slow reader,
//! `MSG_PEEK` and `sendfile`. Both print one JSON [`Outcome`] line per connection. It was
//! written for sk_msg acceleration, which it showed to lose data (docs/ACCELERATION.md); it
//! now holds the datapath itself to every byte.
//!
//! The client waits for readiness with `poll(2)` before every read and write of its
//! non-blocking socket, with a deadline: a socket whose data has arrived but which is not
//! reported readable (data queued where poll does not look) fails with `poll-timeout`.
//!
//! Each connection starts with a header line from the client, `CASE SIZE SEED\n`.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    str::FromStr,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use socket2::SockRef;

/// How long the client waits for its socket to become ready before it reports `poll-timeout`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One scenario of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[clap(rename_all = "kebab-case")]
pub enum Case {
    /// The client sends SIZE bytes and shuts down its write side; the server echoes as it
    /// reads and shuts down its write side at EOF: the reply flows after the client's FIN.
    Echo,
    /// The server sends SIZE bytes and shuts down its write side first; the client reads to
    /// EOF, then sends SIZE bytes of its own and shuts down: the server checks them.
    ServerFirst,
    /// The server sends SIZE bytes, waits for the client's `got` line, then resets.
    ServerReset,
    /// The client sends SIZE bytes, waits for the server's `got` line, then resets.
    ClientReset,
    /// The client sends SIZE bytes; the server reads 16 KiB at a time with a pause after each:
    /// the client's writes must block and resume. The server answers length and checksum.
    SlowReader,
    /// The server reads with `MSG_PEEK` before every read and checks that the read returns
    /// what the peek showed; it answers length and checksum.
    Peek,
    /// The server sends SIZE bytes from a file with `sendfile(2)`.
    Sendfile,
}

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::Echo => "echo",
            Case::ServerFirst => "server-first",
            Case::ServerReset => "server-reset",
            Case::ClientReset => "client-reset",
            Case::SlowReader => "slow-reader",
            Case::Peek => "peek",
            Case::Sendfile => "sendfile",
        }
    }
}

impl FromStr for Case {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Case> {
        <Case as clap::ValueEnum>::value_variants()
            .iter()
            .copied()
            .find(|c| c.name() == s)
            .with_context(|| format!("unknown case {s:?}"))
    }
}

/// What one side saw of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `client` or `server`.
    pub side: String,
    pub case: Case,
    pub size: u64,
    pub seed: u64,
    /// Bytes of the peer's stream received and checked.
    pub received: u64,
    /// How the peer's stream ended: `eof`, `reset`, or `error: ...`.
    pub end: String,
    /// `None` when every byte was as expected and the case's checks held; else why not.
    pub failure: Option<String>,
}

/// The seeded byte stream: xorshift64*, 8 bytes per step. `seed` 0 is mapped to 1.
pub struct Stream {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: seed.max(1),
            buf: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }
}

/// Checks received bytes against the expected stream as they come.
struct Checker {
    want: Stream,
    received: u64,
    first_bad: Option<u64>,
}

impl Checker {
    fn new(seed: u64) -> Checker {
        Checker {
            want: Stream::new(seed),
            received: 0,
            first_bad: None,
        }
    }

    fn feed(&mut self, got: &[u8]) {
        let mut want = vec![0; got.len()];
        self.want.fill(&mut want);
        if self.first_bad.is_none() {
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                self.first_bad = Some(self.received + i as u64);
            }
        }
        self.received += got.len() as u64;
    }

    /// `None` when exactly `size` correct bytes arrived.
    fn verdict(&self, size: u64) -> Option<String> {
        if let Some(at) = self.first_bad {
            return Some(format!("byte {at} differs from the stream sent"));
        }
        (self.received != size).then(|| format!("{} bytes of {size}", self.received))
    }
}

fn end_of(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "reset".into(),
        _ => format!("error: {e}"),
    }
}

// ---- client -------------------------------------------------------------------------------

/// `redirect-testbed stream`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, value_enum)]
    pub case: Case,
    /// Bytes of the stream each side sends (where the case sends one).
    #[arg(long)]
    pub size: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Connections run at once, each with its own seed (`seed + i`).
    #[arg(long, default_value_t = 1)]
    pub conns: u32,
}

pub fn client(args: ClientArgs) -> Result<()> {
    let out = Mutex::new(io::stdout());
    std::thread::scope(|s| {
        for i in 0..args.conns {
            let out = &out;
            let args = &args;
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(s, move || {
                    let seed = args.seed + u64::from(i);
                    let o = run_client(args.to, args.case, args.size, seed);
                    let mut line = serde_json::to_vec(&o).expect("serialisable");
                    line.push(b'\n');
                    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                })
                .expect("spawn a client thread");
        }
    });
    Ok(())
}

/// A non-blocking socket driven through `poll(2)`.
struct Polled {
    s: TcpStream,
}

impl Polled {
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.s.as_raw_fd(),
            events,
            revents: 0,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "poll-timeout"));
            }
            // SAFETY: one valid pollfd, its count passed alongside.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Reads one line (the server's answers are short lines).
    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if self.read(&mut b)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
            }
            if b[0] == b'\n' {
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(b[0]);
        }
    }
}

/// Writes wait for `POLLOUT`, reads for `POLLIN`, each with [`READY_TIMEOUT`].
impl io::Write for Polled {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.s.write(data) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Polled {
    /// One read once the socket is readable; `Ok(0)` at EOF.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.s.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn run_client(to: SocketAddr, case: Case, size: u64, seed: u64) -> Outcome {
    let mut o = Outcome {
        side: "client".into(),
        case,
        size,
        seed,
        received: 0,
        end: String::new(),
        failure: None,
    };
    if let Err(e) = client_case(to, case, size, seed, &mut o) {
        if o.end.is_empty() {
            o.end = end_of(&e);
        }
        o.failure.get_or_insert_with(|| format!("{e}"));
    }
    o
}

fn client_case(
    to: SocketAddr,
    case: Case,
    size: u64,
    seed: u64,
    o: &mut Outcome,
) -> io::Result<()> {
    let s = TcpStream::connect_timeout(&to, READY_TIMEOUT)?;
    s.set_nonblocking(true)?;
    let mut p = Polled { s };
    p.write_all(format!("{} {size} {seed}\n", case.name()).as_bytes())?;
    match case {
        Case::Echo => {
            // Write and read at once: a large echo would fill both directions' buffers.
            let writer = p.s.try_clone()?;
            let sender = std::thread::spawn(move || -> io::Result<()> {
                let mut w = Polled { s: writer };
                send_stream(&mut w, size, seed)?;
                w.s.shutdown(Shutdown::Write)
            });
            let mut check = Checker::new(seed);
            o.end = read_checked(&mut p, &mut check, 64 * 1024, Duration::ZERO);
            o.received = check.received;
            let sent = sender.join().expect("sender thread");
            o.failure = check
                .verdict(size)
                .or(sent.err().map(|e| format!("sending: {e}")));
        }
        Case::ServerFirst => {
            let mut check = Checker::new(seed);
            o.end = read_checked(&mut p, &mut check, 64 * 1024, Duration::ZERO);
            o.received = check.received;
            o.failure = check.verdict(size);
            send_stream(&mut p, size, seed ^ 0x5a5a)?;
            p.s.shutdown(Shutdown::Write)?;
            // The server closes once it has checked our stream.
            let mut rest = [0u8; 16];
            while p.read(&mut rest)? > 0 {}
        }
        Case::ServerReset => {
            let mut check = Checker::new(seed);
            read_at_most(&mut p, &mut check, size)?;
            o.received = check.received;
            o.failure = check.verdict(size);
            p.write_all(b"got\n")?;
            o.end = end_after(&mut p, "data after the stream");
        }
        Case::ClientReset => {
            send_stream(&mut p, size, seed)?;
            let got = p.read_line()?;
            if got != "got" {
                o.failure = Some(format!("server answered {got:?}"));
            }
            o.end = "reset sent".into();
            SockRef::from(&p.s).set_linger(Some(Duration::ZERO))?;
        }
        Case::SlowReader | Case::Peek => {
            send_stream(&mut p, size, seed)?;
            p.s.shutdown(Shutdown::Write)?;
            let answer = p.read_line()?;
            let want = format!("ok {size}");
            if answer != want {
                o.failure = Some(format!("server answered {answer:?}, expected {want:?}"));
            }
            o.end = end_after(&mut p, "data after the answer");
            o.received = size;
        }
        Case::Sendfile => {
            let mut check = Checker::new(seed);
            o.end = read_checked(&mut p, &mut check, 64 * 1024, Duration::ZERO);
            o.received = check.received;
            o.failure = check.verdict(size);
        }
    }
    Ok(())
}

// ---- server -------------------------------------------------------------------------------

/// `redirect-testbed stream-server`.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// Directory for the files `sendfile` sends.
    #[arg(long)]
    pub dir: PathBuf,
}

pub fn server(args: ServerArgs) -> Result<()> {
    let mut listeners = Vec::new();
    for a in &args.listen {
        listeners.push(crate::echo::listen(*a, true).with_context(|| format!("binding {a}"))?);
    }
    println!("ready");
    io::stdout().flush()?;
    let out = std::sync::Arc::new(Mutex::new(io::stdout()));
    let dir = std::sync::Arc::new(args.dir);
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l: TcpListener| {
            let out = out.clone();
            let dir = dir.clone();
            std::thread::spawn(move || loop {
                let Ok((s, _)) = l.accept() else { continue };
                let out = out.clone();
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let o = serve_one(s, &dir);
                    let mut line = serde_json::to_vec(&o).expect("serialisable");
                    line.push(b'\n');
                    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    bail!("listeners ended")
}

fn serve_one(s: TcpStream, dir: &std::path::Path) -> Outcome {
    let mut r = BufReader::new(s.try_clone().expect("clone the accepted socket"));
    let mut header = String::new();
    let mut o = Outcome {
        side: "server".into(),
        case: Case::Echo,
        size: 0,
        seed: 0,
        received: 0,
        end: String::new(),
        failure: None,
    };
    let parsed = r.read_line(&mut header).ok().and_then(|_| {
        let mut it = header.split_whitespace();
        Some((
            it.next()?.parse::<Case>().ok()?,
            it.next()?.parse::<u64>().ok()?,
            it.next()?.parse::<u64>().ok()?,
        ))
    });
    let Some((case, size, seed)) = parsed else {
        o.failure = Some(format!("bad header {header:?}"));
        return o;
    };
    (o.case, o.size, o.seed) = (case, size, seed);
    if let Err(e) = server_case(s, r, dir, &mut o) {
        if o.end.is_empty() {
            o.end = end_of(&e);
        }
        o.failure.get_or_insert_with(|| format!("{e}"));
    }
    o
}

/// Reads and checks until EOF or error from a reader that may hold buffered bytes.
fn read_checked(r: &mut impl Read, check: &mut Checker, chunk: usize, pause: Duration) -> String {
    let mut buf = vec![0; chunk];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return "eof".into(),
            Ok(n) => {
                check.feed(&buf[..n]);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return end_of(&e),
        }
    }
}

/// Writes `size` bytes of the stream of `seed`.
fn send_stream(w: &mut impl io::Write, size: u64, seed: u64) -> io::Result<()> {
    let mut gen = Stream::new(seed);
    let mut buf = vec![0; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads and checks until `size` bytes have come or EOF.
fn read_at_most(r: &mut impl Read, check: &mut Checker, size: u64) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    while check.received < size {
        let n = r.read(&mut buf[..(size - check.received).min(65536) as usize])?;
        if n == 0 {
            break;
        }
        check.feed(&buf[..n]);
    }
    Ok(())
}

/// How the stream ends after what was expected: `eof`, `what` if more data comes, or the error.
fn end_after(r: &mut impl Read, what: &str) -> String {
    let mut rest = [0u8; 16];
    match r.read(&mut rest) {
        Ok(0) => "eof".into(),
        Ok(_) => what.into(),
        Err(e) => end_of(&e),
    }
}

fn server_case(
    s: TcpStream,
    mut r: BufReader<TcpStream>,
    dir: &std::path::Path,
    o: &mut Outcome,
) -> io::Result<()> {
    let (size, seed) = (o.size, o.seed);
    match o.case {
        Case::Echo => {
            let mut buf = vec![0; 64 * 1024];
            let mut check = Checker::new(seed);
            o.end = loop {
                match r.read(&mut buf) {
                    Ok(0) => break "eof".into(),
                    Ok(n) => {
                        check.feed(&buf[..n]);
                        (&s).write_all(&buf[..n])?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break end_of(&e),
                }
            };
            o.received = check.received;
            o.failure = check.verdict(size);
            s.shutdown(Shutdown::Write)?;
        }
        Case::ServerFirst => {
            send_stream(&mut &s, size, seed)?;
            s.shutdown(Shutdown::Write)?;
            let mut check = Checker::new(seed ^ 0x5a5a);
            o.end = read_checked(&mut r, &mut check, 64 * 1024, Duration::ZERO);
            o.received = check.received;
            o.failure = check.verdict(size);
        }
        Case::ServerReset => {
            send_stream(&mut &s, size, seed)?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            if line != "got\n" {
                o.failure = Some(format!("client answered {line:?}"));
            }
            o.end = "reset sent".into();
            SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        }
        Case::ClientReset => {
            let mut check = Checker::new(seed);
            read_at_most(&mut r, &mut check, size)?;
            o.received = check.received;
            o.failure = check.verdict(size);
            (&s).write_all(b"got\n")?;
            o.end = end_after(&mut r, "data after the stream");
        }
        Case::SlowReader => {
            let mut check = Checker::new(seed);
            o.end = read_checked(&mut r, &mut check, 16 * 1024, Duration::from_millis(2));
            o.received = check.received;
            o.failure = check.verdict(size);
            answer(&s, o)?;
        }
        Case::Peek => {
            // Whatever the header read buffered first, then peek-and-read on the socket.
            let mut check = Checker::new(seed);
            let buffered = r.buffer().to_vec();
            check.feed(&buffered);
            let mut peeked = vec![0u8; 8192];
            let mut read = vec![0u8; 8192];
            o.end = loop {
                let n = match s.peek(&mut peeked) {
                    Ok(0) => break "eof".into(),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break end_of(&e),
                };
                let m = (&s).read(&mut read[..n])?;
                if read[..m] != peeked[..m] {
                    o.failure = Some(format!(
                        "read at byte {} differs from what MSG_PEEK showed",
                        check.received
                    ));
                }
                check.feed(&read[..m]);
            };
            o.received = check.received;
            if o.failure.is_none() {
                o.failure = check.verdict(size);
            }
            answer(&s, o)?;
        }
        Case::Sendfile => {
            let path = dir.join(format!("stream-{seed}-{size}"));
            {
                send_stream(&mut File::create(&path)?, size, seed)?;
            }
            let f = File::open(&path)?;
            let _ = std::fs::remove_file(&path);
            let mut off: libc::off_t = 0;
            while (off as u64) < size {
                let left = (size - off as u64) as usize;
                // SAFETY: two open descriptors and a valid offset pointer.
                let n = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut off, left) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                } else if n == 0 {
                    break;
                }
            }
            s.shutdown(Shutdown::Write)?;
            o.end = end_after(&mut r, "data after the header");
        }
    }
    Ok(())
}

/// `ok SIZE` when everything arrived as sent, else the failure; then the write side closes.
fn answer(s: &TcpStream, o: &Outcome) -> io::Result<()> {
    let line = match &o.failure {
        None => format!("ok {}\n", o.received),
        Some(f) => format!("failed {f}\n"),
    };
    let mut w = s;
    w.write_all(line.as_bytes())?;
    s.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_its_seed_and_checks_itself() {
        let mut a = vec![0; 1000];
        let mut b = vec![0; 1000];
        Stream::new(7).fill(&mut a);
        // Filled in pieces, the same bytes.
        let mut g = Stream::new(7);
        g.fill(&mut b[..3]);
        g.fill(&mut b[3..]);
        assert_eq!(a, b);
        let mut c = vec![0; 1000];
        Stream::new(8).fill(&mut c);
        assert_ne!(a, c);
        let mut check = Checker::new(7);
        check.feed(&a[..500]);
        check.feed(&a[500..]);
        assert_eq!(check.verdict(1000), None);
        let mut bad = a.clone();
        bad[600] ^= 1;
        let mut check = Checker::new(7);
        check.feed(&bad);
        assert_eq!(
            check.verdict(1000).as_deref(),
            Some("byte 600 differs from the stream sent")
        );
        assert_eq!(Checker::new(7).verdict(1).as_deref(), Some("0 bytes of 1"));
    }
}
