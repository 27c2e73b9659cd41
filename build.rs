//! Records the git commit warren is built from, for `warren_build_info{revision}` in /metrics.
//!
//! `WARREN_GIT_REVISION` in the build environment wins (a build from a source tarball or a
//! container without `.git`); else `git rev-parse --short HEAD`; else nothing, and the binary
//! says `unknown` (src/metrics.rs).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WARREN_GIT_REVISION");
    let revision = std::env::var("WARREN_GIT_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    if let Some(revision) = revision {
        println!("cargo:rustc-env=WARREN_GIT_REVISION={revision}");
    }
    // Run again when HEAD moves: HEAD itself (checkout), the branch it names (commit) and the
    // packed refs. Only existing files: a missing one would rerun this script on every build.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
