//! Running a guest: qemu with a console reader and a timeout.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use redirect_devtools::display;

use crate::console::{clean, RunEnd, M_BOOTED, M_DONE};

/// Runs `cmd`, collecting its stdout+stderr lines until `done_marker`, a kernel panic, exit or
/// the timeout (then it is killed). Returns the transcript, how it ended and when `booted_marker`
/// was seen.
pub fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    done_marker: &str,
    log: Option<&Path>,
) -> Result<(String, RunEnd, Option<Duration>)> {
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = tx.send(Some(String::from_utf8_lossy(&buf).into_owned()));
                    }
                }
            }
            let _ = tx.send(None);
        }));
    }
    drop(tx);
    let mut log_file = log.and_then(|p| fs::File::create(p).ok());
    let mut transcript = String::new();
    let mut open_streams = readers.len();
    let mut booted = None;
    let mut panic_line: Option<String> = None;
    let end = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break RunEnd::TimedOut(timeout);
        }
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(Some(line)) => {
                if let Some(f) = log_file.as_mut() {
                    let _ = f.write_all(line.as_bytes());
                }
                let cl = clean(&line);
                if booted.is_none() && cl.starts_with(M_BOOTED) {
                    booted = Some(start.elapsed());
                }
                if panic_line.is_none() && cl.contains("Kernel panic") {
                    panic_line = Some(cl.trim().to_string());
                }
                transcript.push_str(&line);
                if cl.starts_with(done_marker) {
                    break RunEnd::Completed;
                }
            }
            Ok(None) => {
                open_streams -= 1;
                if open_streams == 0 {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    break match panic_line.take() {
                        Some(l) => RunEnd::Panicked(l),
                        None => RunEnd::Exited(status),
                    };
                }
            }
            // panic=-1 reboots at once and -no-reboot makes qemu exit, which ends the streams.
            // The process ended but something it started keeps the pipes open: take what is
            // buffered and stop.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    while let Ok(Some(line)) = rx.recv_timeout(Duration::from_millis(300)) {
                        if let Some(f) = log_file.as_mut() {
                            let _ = f.write_all(line.as_bytes());
                        }
                        transcript.push_str(&line);
                    }
                    break match panic_line.take() {
                        Some(l) => RunEnd::Panicked(l),
                        None => RunEnd::Exited(status.to_string()),
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break match panic_line.take() {
                    Some(l) => RunEnd::Panicked(l),
                    None => RunEnd::Exited(status),
                };
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    // The readers end when the pipes close; a grandchild that kept them open must not block
    // us, so they are not joined.
    drop(readers);
    let end = match (end, panic_line) {
        (RunEnd::Completed, _) => RunEnd::Completed,
        (RunEnd::TimedOut(_), Some(l)) => RunEnd::Panicked(l),
        (e, _) => e,
    };
    Ok((transcript, end, booted))
}

/// Boots `vmlinuz` with `initrd` under qemu (TCG, one vCPU, `memory_mib`, the serial console
/// on stdio, no reboot: a panic ends qemu) until the init's end marker or the timeout; the
/// console goes to `log` too.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    memory_mib: u32,
    timeout: Duration,
    log: &Path,
) -> Result<(String, RunEnd, Option<Duration>)> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 oops=panic",
        ]);
    run_with_timeout(cmd, timeout, M_DONE, Some(log))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn timeout_kills_a_hung_guest() {
        let t = Instant::now();
        let (text, end, booted) = run_with_timeout(
            sh("echo '==> BOOTED x'; echo 'test a ... ok'; exec sleep 30"),
            Duration::from_millis(800),
            M_DONE,
            None,
        )
        .unwrap();
        assert_eq!(end, RunEnd::TimedOut(Duration::from_millis(800)));
        assert!(t.elapsed() < Duration::from_secs(10), "not killed in time");
        assert!(booted.is_some());
        assert!(text.contains("test a ... ok"));
    }

    #[test]
    fn panic_and_early_exit_are_failures() {
        let (_, end, _) = run_with_timeout(
            sh("echo '[ 1.0] Kernel panic - not syncing: Attempted to kill init!'; exit 0"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert!(matches!(end, RunEnd::Panicked(ref l) if l.contains("Attempted to kill init")));
        assert!(!end.ok());
        let (_, end, _) = run_with_timeout(
            sh("echo hello; exit 3"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert!(matches!(end, RunEnd::Exited(_)));
        let (_, end, _) = run_with_timeout(
            sh("echo '==> DONE 1.0'; sleep 30"),
            Duration::from_secs(10),
            M_DONE,
            None,
        )
        .unwrap();
        assert_eq!(end, RunEnd::Completed);
    }
}
