//! The plugin's log: lines appended to `pluginLogFile` (or stderr). Never stdout,
//! which carries the CNI result. Logging must never make the plugin fail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

pub use vpc_cni_proto::conf::LogLevel as Level;

enum Sink {
    File(File),
    Stderr,
    None,
}

struct Logger {
    sink: Sink,
    level: Level,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Opens the log once per process. `path` "stderr" logs to stderr; "" or "none" disables.
pub fn init(path: &str, level: Level) {
    let sink = match path {
        "" | "none" => Sink::None,
        "stderr" => Sink::Stderr,
        // stdout is the CNI result: never log there.
        "stdout" => Sink::Stderr,
        p => {
            if let Some(dir) = std::path::Path::new(p).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            // 0600 as upstream (a log names pods and addresses); non-blocking, so a FIFO
            // put there cannot hang the plugin, and only a regular file is written.
            use std::os::unix::fs::OpenOptionsExt;
            match OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
            {
                Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => Sink::File(f),
                _ => Sink::None,
            }
        }
    };
    let _ = LOGGER.set(Logger { sink, level });
}

pub fn log(level: Level, msg: std::fmt::Arguments<'_>) {
    let Some(l) = LOGGER.get() else { return };
    if level < l.level {
        return;
    }
    let line = format!(
        "{} {} pid={} {}\n",
        rfc3339_now(),
        level.as_str(),
        std::process::id(),
        msg
    );
    // One write per line: O_APPEND keeps concurrent plugins' lines whole.
    match &l.sink {
        Sink::File(f) => {
            let _ = (&*f).write_all(line.as_bytes());
        }
        Sink::Stderr => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        Sink::None => {}
    }
}

#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Debug, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Error, format_args!($($t)*)) } }

/// UTC timestamp with microseconds, without pulling in a date crate.
fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_779), (2026, 11, 22));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
