//! Logs as etcd writes them. By default zap's JSON lines (`level`, `ts`,
//! `caller`, `msg`, then the event's fields with hyphenated names), which
//! log pipelines and test harnesses parse; `--log-format console` gives a
//! readable format instead. Lines go to every output of `--log-outputs`
//! (`default` and `stderr`, `stdout`, or files, appended to); colour codes
//! only in the console format and only when every output is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    // etcd's own words for both.
    #[error("unknown logger option {0:?}")]
    Logger(String),
    #[error("unknown log format {0:?} (json or console)")]
    Format(String),
    #[error(
        "log output {0:?} is not supported by Tessera (stderr, stdout, default or a file path)"
    )]
    Output(String),
    #[error("cannot open log output {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The logging flags, as given.
pub struct LogOptions<'a> {
    pub logger: &'a str,
    pub level: &'a str,
    pub format: &'a str,
    pub outputs: &'a [String],
}

/// Sets up the process's logging from the flags.
pub fn init(options: &LogOptions<'_>) -> Result<(), LogError> {
    if options.logger != "zap" {
        return Err(LogError::Logger(options.logger.to_string()));
    }
    let outputs = Outputs::open(options.outputs)?;
    let level = match options.level {
        "panic" | "fatal" => "error",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // Already set (tests in one process): the first one stays.
    let _ = match options.format {
        "json" => builder
            .with_writer(outputs)
            .event_format(ZapJson)
            .try_init(),
        "console" => builder
            .with_ansi(outputs.all_terminals())
            .with_writer(outputs)
            .try_init(),
        other => return Err(LogError::Format(other.to_string())),
    };
    Ok(())
}

#[derive(Clone)]
enum Output {
    Stderr,
    Stdout,
    File(Arc<Mutex<std::fs::File>>),
}

/// Where log lines go: every line to each output.
#[derive(Clone)]
pub struct Outputs(Arc<Vec<Output>>);

impl Outputs {
    pub fn open(specs: &[String]) -> Result<Outputs, LogError> {
        let mut outputs = Vec::new();
        for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            outputs.push(match spec {
                "default" | "stderr" => Output::Stderr,
                "stdout" => Output::Stdout,
                // systemd's journal: etcd writes to its socket; not here.
                "journal" => return Err(LogError::Output(spec.to_string())),
                path => {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|source| LogError::Open {
                            path: path.to_string(),
                            source,
                        })?;
                    Output::File(Arc::new(Mutex::new(file)))
                }
            });
        }
        if outputs.is_empty() {
            outputs.push(Output::Stderr);
        }
        Ok(Outputs(Arc::new(outputs)))
    }

    fn all_terminals(&self) -> bool {
        self.0.iter().all(|o| match o {
            Output::Stderr => std::io::stderr().is_terminal(),
            Output::Stdout => std::io::stdout().is_terminal(),
            Output::File(f) => f.lock().is_ok_and(|f| f.is_terminal()),
        })
    }
}

impl Write for Outputs {
    /// One formatted line at a time (the formatter writes each whole).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        for output in self.0.iter() {
            // A log line that cannot be written is dropped, not an error
            // that could stop the server.
            let _ = match output {
                Output::Stderr => std::io::stderr().lock().write_all(line),
                Output::Stdout => std::io::stdout().lock().write_all(line),
                Output::File(f) => match f.lock() {
                    Ok(mut f) => f.write_all(line),
                    Err(_) => Ok(()),
                },
            };
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Outputs {
    type Writer = Outputs;

    fn make_writer(&'a self) -> Outputs {
        self.clone()
    }
}

/// zap's production JSON encoding, as etcd configures it.
pub struct ZapJson;

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        writeln!(
            writer,
            "{}",
            zap_line(
                level_name(meta.level()),
                &zap_timestamp(SystemTime::now()),
                &caller(meta),
                &fields
            )
        )
    }
}

fn zap_line(level: &str, ts: &str, caller: &str, fields: &JsonFields) -> String {
    let mut line = format!(
        "{{\"level\":{},\"ts\":{},\"caller\":{},\"msg\":{}",
        json_string(level),
        json_string(ts),
        json_string(caller),
        json_string(&fields.message)
    );
    for (key, value) in &fields.pairs {
        line.push(',');
        line.push_str(&json_string(key));
        line.push(':');
        line.push_str(value);
    }
    line.push('}');
    line
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// zap has no trace level; tracing's trace is its debug.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        _ => "debug",
    }
}

/// zap's short caller, `package/file:line`: the file's directory, or the
/// crate for a file directly in `src/`.
fn caller(meta: &Metadata<'_>) -> String {
    let file = meta.file().unwrap_or("unknown");
    let mut parts = file.rsplit('/');
    let name = parts.next().unwrap_or(file);
    let dir = match parts.next() {
        Some("src") | None => meta
            .module_path()
            .and_then(|m| m.split("::").next())
            .unwrap_or("unknown"),
        Some(dir) => dir,
    };
    format!("{dir}/{name}:{}", meta.line().unwrap_or(0))
}

/// zap's ISO 8601 time in UTC with milliseconds, as etcd logs it:
/// `2026-12-05T12:35:09.871Z`.
fn zap_timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let day = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        day / 3600,
        day % 3600 / 60,
        day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An event's message and fields, the fields as JSON values.
#[derive(Default)]
struct JsonFields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl JsonFields {
    fn push(&mut self, field: &Field, value: String) {
        // etcd's field names are hyphenated: local-member-id.
        self.pairs.push((field.name().replace('_', "-"), value));
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.push(field, json_string(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.push(field, json_string(&text));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        let json = serde_json::Number::from_f64(value)
            .map_or_else(|| json_string(&value.to_string()), |n| n.to_string());
        self.push(field, json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_zaps_iso8601_in_utc() {
        let at = |secs: u64, ms: u64| {
            zap_timestamp(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_796_472_000, 871), "2026-12-05T12:00:00.871Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_line_is_one_json_object_in_zaps_key_order() {
        let fields = JsonFields {
            message: "published local member to cluster through raft".into(),
            pairs: vec![
                ("local-member-id".into(), json_string("8e9e05c52164694d")),
                ("took".into(), "3".into()),
                ("quote".into(), json_string("a \"b\"\n")),
            ],
        };
        let line = zap_line(
            "info",
            "2026-12-05T12:00:00.871Z",
            "etcdserver/server.go:2069",
            &fields,
        );
        assert!(line.starts_with(r#"{"level":"info","ts":"2026-12-05T12:00:00.871Z","caller":"etcdserver/server.go:2069","msg":"published"#), "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["local-member-id"], "8e9e05c52164694d");
        assert_eq!(parsed["took"], 3);
        assert_eq!(parsed["quote"], "a \"b\"\n");
    }

    #[test]
    fn bad_flags_are_refused_with_etcds_words() {
        let outputs = vec!["stderr".to_string()];
        let options = |logger, format| LogOptions {
            logger,
            level: "info",
            format,
            outputs: &outputs,
        };
        assert_eq!(
            init(&options("capnslog", "json")).unwrap_err().to_string(),
            "unknown logger option \"capnslog\""
        );
        assert!(matches!(
            init(&options("zap", "xml")),
            Err(LogError::Format(_))
        ));
        assert!(matches!(
            Outputs::open(&["journal".to_string()]),
            Err(LogError::Output(_))
        ));
        assert!(matches!(
            Outputs::open(&["/nonexistent-dir/x.log".to_string()]),
            Err(LogError::Open { .. })
        ));
    }
}
