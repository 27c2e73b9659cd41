//! The systemd unit (`deploy/systemd/warren.service`) read by systemd's own parser,
//! `systemd-analyze verify`, with its paths pointed at this build's `warren` and the repository's
//! `proxy.toml`: a misspelt directive or value, a missing executable or a bad dependency shows up
//! here instead of on an operator's machine. What it cannot show is the unit running under a
//! real systemd (these machines run none as PID 1); docs/operations.md says how to check that.

use std::path::Path;
use std::process::Command;

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("deploy/systemd/warren.service"))
        .expect("read deploy/systemd/warren.service");
    assert!(
        unit.contains("/usr/local/bin/warren") && unit.contains("/etc/warren/warren.toml"),
        "the unit names the installed binary and config (the paths this test substitutes)"
    );
    let config = repo.join("proxy.toml");
    let text = unit
        .replace("/usr/local/bin/warren", env!("CARGO_BIN_EXE_warren"))
        .replace(
            "/etc/warren/warren.toml",
            config.to_str().expect("UTF-8 path"),
        );
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("systemd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // verify takes the unit's name from the file name.
    let path = dir.join("warren.service");
    std::fs::write(&path, text).unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}); it comes with Debian's `systemd` package \
                 (.ci/run installs it)"
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify rejected the unit (exit {:?}):\n{stderr}",
        out.status.code()
    );

    // The command systemd runs before starting (and on reload) accepts the shipped example.
    let check = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run warren check");
    assert!(
        check.status.success(),
        "warren check --config proxy.toml: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}
