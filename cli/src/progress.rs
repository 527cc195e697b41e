//! A progress bar on stderr (`\r`-redrawn), shown only when stderr is a terminal; silent in
//! pipes and files. Also the human-readable byte counts the commands print.

use std::io::Write;
use std::time::{Duration, Instant};

const REDRAW: Duration = Duration::from_millis(100);
const WIDTH: usize = 28;

pub fn stderr_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

pub struct Progress {
    enabled: bool,
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        Progress {
            enabled: stderr_is_terminal(),
            label: label.to_string(),
            total,
            done: 0,
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    pub fn update(&mut self, done: u64) {
        self.done = done;
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < REDRAW) && done < self.total {
            return;
        }
        self.last = Some(now);
        self.draw(now);
    }

    pub fn add(&mut self, n: u64) {
        self.update(self.done + n);
    }

    fn draw(&mut self, now: Instant) {
        let frac = if self.total == 0 {
            1.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        };
        let fill = (frac * WIDTH as f64) as usize;
        let secs = (now - self.start).as_secs_f64();
        let rate = if secs > 0.0 { self.done as f64 / secs } else { 0.0 };
        let line = format!(
            "\r{} [{}{}] {:3.0}% {} / {} {}/s\x1b[K",
            self.label,
            "#".repeat(fill),
            ".".repeat(WIDTH - fill),
            frac * 100.0,
            human_bytes(self.done),
            human_bytes(self.total),
            human_bytes(rate as u64)
        );
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(line.as_bytes());
        let _ = e.flush();
        self.drawn = true;
    }

    /// Erases the bar (the next update draws it again), e.g. before printing a line.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(b"\r\x1b[K");
            let _ = e.flush();
            self.drawn = false;
            self.last = None;
        }
    }

    /// Prints a line on stdout without tearing the bar.
    pub fn println(&mut self, line: &str) {
        self.clear();
        println!("{line}");
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// `1536` -> `1.5 KiB`; below 1 KiB, exact bytes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `5GB` (10^9), `5GiB` (2^30), `500MB`, `1024` (bytes): the size forms Hugging Face accepts.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    let v = num * mult as f64;
    (1.0..1.8e19).contains(&v).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1.5MB"), Some(1_500_000));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("5XB"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
