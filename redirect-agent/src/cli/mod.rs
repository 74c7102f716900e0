//! The command line's own parts: argument types (clap), tables and printing, exit codes. The
//! library (`redirect_agent`) links neither clap nor anyhow; this module is the binary's.

pub mod detect;
pub mod probe;
pub mod render;
pub mod table;
