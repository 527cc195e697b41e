//! Hand-written argument parsing: positionals, `--flag`, `--opt VALUE` / `--opt=VALUE`
//! (repeatable), `--` to end options, `-h`/`--help`.

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

/// What a subcommand accepts.
pub struct Spec {
    pub name: &'static str,
    /// Options without a value.
    pub flags: &'static [&'static str],
    /// Options taking a value.
    pub options: &'static [&'static str],
}

#[derive(Debug, Default)]
pub struct Args {
    pub positional: Vec<String>,
    flags: Vec<String>,
    values: Vec<(String, String)>,
}

#[derive(Debug)]
pub enum Parsed {
    Help,
    Args(Args),
}

impl Args {
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
    /// The last value given for `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.values.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }
}

pub fn parse(spec: &Spec, argv: &[String]) -> CliResult<Parsed> {
    let mut out = Args::default();
    let mut it = argv.iter();
    let mut only_positional = false;
    while let Some(a) = it.next() {
        if only_positional || a == "-" || !a.starts_with('-') {
            out.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (a.as_str(), None),
        };
        let bare = name.trim_start_matches('-');
        if name.starts_with("--") && spec.flags.contains(&bare) {
            if inline.is_some() {
                return Err(CliError::usage(spec.name, format!("option {name} takes no value")));
            }
            out.flags.push(bare.to_string());
        } else if name.starts_with("--") && spec.options.contains(&bare) {
            let v = match inline {
                Some(v) => v.to_string(),
                None => it
                    .next()
                    .ok_or_else(|| CliError::usage(spec.name, format!("option {name} needs a value")))?
                    .clone(),
            };
            out.values.push((bare.to_string(), v));
        } else {
            return Err(CliError::usage(spec.name, format!("unknown option {name}")));
        }
    }
    Ok(Parsed::Args(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        name: "t",
        flags: &["json"],
        options: &["filter", "dtype"],
    };

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses() {
        let Parsed::Args(a) = parse(&SPEC, &argv(&["a", "--json", "--filter", "x", "--filter=y", "--", "--dtype"])).unwrap() else {
            panic!()
        };
        assert_eq!(a.positional, vec!["a", "--dtype"]);
        assert!(a.flag("json"));
        assert_eq!(a.values("filter"), vec!["x", "y"]);
        assert_eq!(a.value("dtype"), None);
        assert!(matches!(parse(&SPEC, &argv(&["x", "--help"])).unwrap(), Parsed::Help));
        assert_eq!(parse(&SPEC, &argv(&["--nope"])).unwrap_err().code, 2);
        assert_eq!(parse(&SPEC, &argv(&["--filter"])).unwrap_err().code, 2);
        assert_eq!(parse(&SPEC, &argv(&["--json=1"])).unwrap_err().code, 2);
    }
}
