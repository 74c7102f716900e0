//! The agent's socket protocol: one JSON request per line, one JSON response per line.
//!
//! The socket is a unix stream socket, mode 0600, and the agent also refuses any peer whose
//! uid (`SO_PEERCRED`) is not 0. A connection may carry several requests, one after the other;
//! the CLI sends one and reads one answer.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    commands::{EnrollReport, GcReport, ListReport, StatsReport, UnenrollReport},
    spec::PodSpec,
};

/// Default socket of the agent; `--socket` or `REDIRECT_SOCKET` overrides it.
pub const DEFAULT_SOCKET: &str = "/var/run/redirect/agent.sock";

/// The longest request line the agent reads; a longer one is refused (a spec with the
/// per-pod maximum of rules is well below it).
pub const MAX_LINE: usize = 4 << 20;

/// What a client asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum Request {
    Enroll {
        spec: PodSpec,
    },
    Unenroll {
        name: String,
    },
    List,
    Stats {
        name: Option<String>,
    },
    Gc,
    /// Whether the agent is there and ready, and who it is.
    Status,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "value", rename_all = "snake_case")]
pub enum Response {
    Enrolled(EnrollReport),
    Unenrolled(UnenrollReport),
    List(ListReport),
    Stats(StatsReport),
    Gc(GcReport),
    Status {
        node_name: String,
        version: String,
    },
    /// The command failed: the message is what the CLI prints after `error: `.
    Error {
        message: String,
    },
}

/// Failures talking to a running agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("talking to the agent at {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the agent at {path} closed the connection without answering (the request may or may not have been carried out; `redirect-agent list` tells)")]
    NoAnswer { path: PathBuf },
    #[error("the agent at {path} answered something that is not a response: {detail}")]
    Protocol { path: PathBuf, detail: String },
}

/// Sends one request to the agent listening at `socket` and returns its answer; `Ok(None)`
/// when no agent listens there (no socket, or a socket nobody accepts on: an agent that was
/// killed), so the caller does the work itself.
pub fn call(socket: &Path, req: &Request) -> Result<Option<Response>, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(ClientError::NoAnswer {
            path: socket.to_owned(),
        });
    }
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| ClientError::Protocol {
            path: socket.to_owned(),
            detail: e.to_string(),
        })
}
