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
// One request lives at a time per connection: the size of the largest variant (a spec) costs
// nothing, and boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
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
    /// From the CNI plugin (issue 11): see [`crate::kubepods`].
    Cni(crate::kubepods::CniRequest),
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
        /// The directories the agent serves: a command for other ones is not its to run.
        state_dir: PathBuf,
        pin_root: PathBuf,
    },
    /// The answer to a [`Request::Cni`].
    Cni(crate::kubepods::CniResponse),
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

/// A connection to a running agent.
pub struct Client {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the agent listening at `socket`; `Ok(None)` when no agent listens there (no
    /// socket, or a socket nobody accepts on: an agent that was killed), so the caller does the
    /// work itself.
    pub fn connect(socket: &Path) -> Result<Option<Client>, ClientError> {
        match UnixStream::connect(socket) {
            Ok(s) => Ok(Some(Client {
                path: socket.to_owned(),
                stream: BufReader::new(s),
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(ClientError::Io {
                path: socket.to_owned(),
                source,
            }),
        }
    }

    /// Bounds every later read and write on the connection (the CNI plugin must not hang a
    /// sandbox's creation forever on a stuck agent).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.stream.get_ref().set_read_timeout(t)?;
        self.stream.get_ref().set_write_timeout(t)
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(req).expect("requests serialize");
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(io_err)?;
        let mut answer = String::new();
        self.stream
            .read_line(&mut answer)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if answer.is_empty() {
            return Err(ClientError::NoAnswer {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }
}

/// Sends one request to the agent listening at `socket` on a connection of its own;
/// `Ok(None)` when no agent listens there.
pub fn call(socket: &Path, req: &Request) -> Result<Option<Response>, ClientError> {
    match Client::connect(socket)? {
        Some(mut c) => c.call(req).map(Some),
        None => Ok(None),
    }
}

/// Whether two paths name the same directory (as given, or once resolved).
pub fn same_dir(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}
