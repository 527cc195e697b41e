//! What a command reports when it fails: one line on stderr and an exit code.

use std::fmt;

/// A failure the command reports: one line on stderr and an exit code (2: usage, 1: failure).
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn usage(cmd: &str, msg: impl fmt::Display) -> Self {
        CliError {
            code: 2,
            message: format!("dcp {cmd}: {msg} (see 'dcp {cmd} --help')"),
        }
    }
    pub fn fail(cmd: &str, msg: impl fmt::Display) -> Self {
        CliError {
            code: 1,
            message: format!("dcp {cmd}: {msg}"),
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;
