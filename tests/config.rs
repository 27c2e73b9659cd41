//! Runs the `warren` binary: `check`, `--version`, usage errors, and start/stop of `run`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml")
}

/// Writes `text` to a fresh file under the cargo-provided temporary directory.
fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("warren-config-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn warren(args: &[&str]) -> Output {
    Command::new(WARREN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run warren")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `warren check --config <path>`; asserts exit code 2 and returns stderr.
fn check_fails(path: &Path) -> String {
    let out = warren(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).is_empty(),
        "nothing on stdout on failure: {}",
        stdout(&out)
    );
    stderr(&out)
}

const VALID: &str = r#"listen = "127.0.0.1:5673"

[[clusters]]
name = "shard-a"
role = "shard"
nodes = ["127.0.0.1:5701", "127.0.0.1:5702"]
"#;

#[test]
fn check_accepts_the_example_file() {
    let path = example();
    let out = warren(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{}: ok (2 shard clusters, control: control)\n",
            path.display()
        )
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn check_accepts_config_before_subcommand_and_short_flag() {
    let path = example();
    let path = path.to_str().unwrap();
    for args in [["--config", path, "check"], ["check", "-c", path]] {
        let out = warren(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(": ok (2 shard clusters"),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn check_without_control_cluster_names_the_fallback() {
    let path = temp_config("no-control", VALID);
    let out = warren(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{}: ok (1 shard cluster, control: none, using shard cluster shard-a)\n",
            path.display()
        )
    );
}

#[test]
fn check_reports_duplicate_cluster_name_with_location() {
    let text =
        format!("{VALID}\n[[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [\"h:1\"]\n");
    let path = temp_config("duplicate-name", &text);
    let err = check_fails(&path);
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:9:8: duplicate cluster name \"shard-a\" (first defined at line 4)",
            path.display()
        )
    );
}

#[test]
fn check_reports_syntax_error_with_location() {
    let path = temp_config("syntax", &VALID.replace("role = \"shard\"", "role = shard"));
    let err = check_fails(&path);
    assert!(
        err.starts_with(&format!("{}:5:8: ", path.display())),
        "{err}"
    );
    assert!(err.contains("must be quoted"), "{err}");
}

#[test]
fn check_reports_unknown_key_with_location() {
    let path = temp_config(
        "unknown-key",
        &format!("{VALID}\n[limits]\nframe_size = 4096\n"),
    );
    let err = check_fails(&path);
    assert!(
        err.starts_with(&format!("{}:9:1: unknown key `frame_size`", path.display())),
        "{err}"
    );
}

#[test]
fn check_reports_bad_values_with_location() {
    let cases = [
        (
            VALID.replace("127.0.0.1:5702", "127.0.0.1:0"),
            "6:28:",
            "port 0 is not allowed",
        ),
        (
            format!("{VALID}weight = 0\n"),
            "7:10:",
            "weight must be at least 1",
        ),
        (
            format!("{VALID}\n[limits]\nframe_max = 100\n"),
            "9:13:",
            "frame_max = 100 is too small",
        ),
        (
            VALID.replace("\"shard\"", "\"control\""),
            "3:1:",
            "no shard cluster",
        ),
    ];
    for (i, (text, at, reason)) in cases.iter().enumerate() {
        let path = temp_config(&format!("bad-value-{i}"), text);
        let err = check_fails(&path);
        assert!(
            err.starts_with(&format!("{}:{at} ", path.display())),
            "want {at}: {err}"
        );
        assert!(err.contains(reason), "want {reason:?}: {err}");
    }
}

#[test]
fn check_reports_missing_file() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("does-not-exist.toml");
    let err = check_fails(&path);
    assert!(
        err.starts_with(&format!("{}: cannot read", path.display())),
        "{err}"
    );
}

#[test]
fn config_is_required() {
    for args in [&["check"][..], &[]] {
        let out = warren(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
    }
}

#[test]
fn run_rejects_invalid_config_before_starting() {
    let path = temp_config("run-invalid", &format!("{VALID}drain = 1\n"));
    let out = warren(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(":7:9: invalid type"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_prints_crate_version() {
    let out = warren(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).trim(),
        format!("warren {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_describes_subcommands_and_options() {
    let out = warren(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for needle in ["check", "--config", "--log-format", "RUST_LOG", "SIGTERM"] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

#[test]
fn unknown_log_format_is_a_usage_error() {
    let out = warren(&["--log-format", "xml", "check", "-c", "proxy.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("xml"), "{}", stderr(&out));
}

/// A config listening on `listen`, with broker nodes on ports nothing listens on.
fn run_config(name: &str, listen: &str) -> PathBuf {
    let text = format!(
        "listen = \"{listen}\"\n[timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 200\n\n\
         [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n"
    );
    temp_config(name, &text)
}

#[test]
fn run_reports_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let path = run_config("port-in-use", &addr);
    let out = warren(&["--config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("failed to start"), "{}", stderr(&out));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let path = run_config("sigterm", "127.0.0.1:0");
    let mut child = Command::new(WARREN)
        .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Forward stdout lines so the test can wait for "warren started" with a deadline.
    let (lines_tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = loop {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains("warren started") => break line,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("no \"warren started\" line ({e}); stderr: {}", stderr(&out));
            }
        }
    };
    assert!(started.starts_with('{'), "json log line: {started}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("warren did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = lines.iter().collect(); // until stdout closes
    assert!(
        rest.iter().any(|l| l.contains("shutdown complete")),
        "log after SIGTERM: {rest:#?}"
    );
}
