//! Runs the `warren` binary into errors that stop it before it serves (an invalid configuration,
//! a listen port already taken) and checks how they are reported: exactly once, as one plain line
//! on stderr with the text log format, as one JSON log line on stdout (nothing on stderr) with
//! `--log-format json`. No RabbitMQ needed: the process exits before it connects anywhere.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// Writes `text` to a fresh file under the cargo-provided temporary directory (`name` may
/// hold a subdirectory).
fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("warren-startup-errors");
    let path = dir.join(format!("{name}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// A configuration listening on `listen`, with a broker node on a port nothing listens on.
fn config(name: &str, listen: &str) -> PathBuf {
    temp_config(
        name,
        &format!(
            "listen = \"{listen}\"\n[timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 200\n\n\
             [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n"
        ),
    )
}

/// An invalid configuration: `drain` is a boolean (line 4, column 9).
/// An invalid configuration, in a directory of its own per test: the tests run in parallel,
/// and one writing the file while another's warren read it gave that one an empty file.
fn invalid_config(test: &str) -> PathBuf {
    temp_config(
        &format!("{test}/invalid"),
        "listen = \"127.0.0.1:5673\"\n[[clusters]]\nname = \"a\"\ndrain = 1\n\
         role = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n",
    )
}

fn warren(path: &Path, format: &str) -> Output {
    Command::new(WARREN)
        .args(["--config", path.to_str().unwrap(), "--log-format", format])
        .env_remove("RUST_LOG")
        .output()
        .expect("run warren")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Every stdout line parsed as JSON (the test fails on a line that is not).
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}\n{}", describe(out)))
        })
        .collect()
}

/// The ERROR events among `lines`.
fn errors(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines.iter().filter(|l| l["level"] == "ERROR").collect()
}

/// The JSON line has the shape of tracing's other JSON lines.
fn assert_log_shape(line: &serde_json::Value) {
    for key in ["timestamp", "level", "fields", "target"] {
        assert!(line.get(key).is_some(), "{key} missing from {line}");
    }
    assert!(line["fields"]["message"].is_string(), "{line}");
}

#[test]
fn invalid_config_is_one_json_line_under_json_logs() {
    let out = warren(&invalid_config("json"), "json");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr: {}",
        describe(&out)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{}", describe(&out));
    let line = &lines[0];
    assert_log_shape(line);
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["message"], "invalid configuration", "{line}");
    let error = line["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(":4:9: invalid type"), "{line}");
    let config = line["fields"]["config"].as_str().unwrap_or_default();
    assert!(config.ends_with("invalid.toml"), "{line}");
}

#[test]
fn invalid_config_is_one_stderr_line_under_text_logs() {
    let out = warren(&invalid_config("text"), "text");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        describe(&out)
    );
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(
        stderr.starts_with("warren: invalid configuration: ")
            && stderr.contains(":4:9: invalid type"),
        "{}",
        describe(&out)
    );
}

/// How many times the listener's error shows up on stdout and stderr together.
fn mentions(out: &Output, needle: &str) -> usize {
    text(&out.stdout).matches(needle).count() + text(&out.stderr).matches(needle).count()
}

#[test]
fn busy_port_is_reported_once_under_text_logs() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = warren(&config("busy-text", &addr), "text");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let needle = format!("cannot listen on {addr}");
    assert_eq!(mentions(&out, &needle), 1, "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", describe(&out));
    assert!(
        stderr.starts_with("warren: failed to start: ") && stderr.contains(&needle),
        "{}",
        describe(&out)
    );
}

#[test]
fn busy_port_is_one_json_line_under_json_logs() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = warren(&config("busy-json", &addr), "json");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr: {}",
        describe(&out)
    );
    let needle = format!("cannot listen on {addr}");
    assert_eq!(mentions(&out, &needle), 1, "{}", describe(&out));
    let lines = json_lines(&out);
    let errors = errors(&lines);
    assert_eq!(errors.len(), 1, "{}", describe(&out));
    assert_log_shape(errors[0]);
    assert_eq!(
        errors[0]["fields"]["message"], "failed to start",
        "{}",
        errors[0]
    );
    let error = errors[0]["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&needle), "{}", errors[0]);
}
