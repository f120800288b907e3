//! Locating the external tools tests drive (Envoy, promtool) and skipping cleanly without them
//! on a developer machine; under `CI=true` a missing tool fails the test instead.
//!
//! Lookup order: the `SWITCHYARD_<TOOL>` environment variable, then the cache that
//! `scripts/install-test-deps.sh` fills (`<repo>/.cache/...`), then `PATH`.

use std::path::{Path, PathBuf};

/// Returns from the calling test when the option is `None`, through [`missing_dependency`]
/// (which panics instead under `CI=true`).
#[macro_export]
macro_rules! require_tool {
    ($found:expr, $what:expr) => {
        match $found {
            Some(path) => path,
            None => {
                $crate::support::tools::missing_dependency(&format!(
                    "{} not found (run scripts/install-test-deps.sh)",
                    $what
                ));
                return;
            }
        }
    };
}

/// True when the environment says this is CI (`CI=true`, as GitHub Actions and most CI systems
/// set it, or `CI=1`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// A test dependency that is not hardware (a tool, a library, a tokenizer file) is missing.
/// Locally the caller skips after this prints `SKIPPED: <why>`; under `CI=true` a skip would let
/// the test pass without checking anything, so this panics naming what is missing. Tests that
/// need a GPU skip on their own (absent by design on CI runners) and never call this.
pub fn missing_dependency(why: &str) {
    if in_ci() {
        panic!("missing test dependency under CI=true: {why}");
    }
    println!("SKIPPED: {why}");
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn locate(env_var: &str, cached: &[&str], name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).map(PathBuf::from) {
        return is_executable(&p).then_some(p);
    }
    cached
        .iter()
        .map(|rel| repo_root().join(rel))
        .find(|p| is_executable(p))
        .or_else(|| on_path(name))
}

/// The Envoy binary (`SWITCHYARD_ENVOY`, `.cache/venv/bin/envoy`, or `envoy` on PATH).
pub fn envoy() -> Option<PathBuf> {
    locate("SWITCHYARD_ENVOY", &[".cache/venv/bin/envoy"], "envoy")
}

/// The promtool binary (`SWITCHYARD_PROMTOOL`, `.cache/prometheus/usr/bin/promtool`, or PATH).
pub fn promtool() -> Option<PathBuf> {
    locate(
        "SWITCHYARD_PROMTOOL",
        &[".cache/prometheus/usr/bin/promtool"],
        "promtool",
    )
}

/// Runs `promtool check metrics` on `text`; returns its exit code (0 clean, 3 parsed with lint
/// problems printed one per line, 1 a parse error) and its stdout + stderr.
pub fn promtool_check(promtool: &std::path::Path, text: &str) -> (i32, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads the page");
    let out = child.wait_with_output().expect("promtool exits");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// gVisor's `runsc` (`SWITCHYARD_RUNSC`, `.cache/runsc/usr/bin/runsc` from the Debian package
/// that `scripts/install-test-deps.sh` unpacks, or PATH).
pub fn runsc() -> Option<PathBuf> {
    locate("SWITCHYARD_RUNSC", &[".cache/runsc/usr/bin/runsc"], "runsc")
}

/// The real GGUF model `scripts/fetch-model.sh` fetches (Qwen2.5-Coder-0.5B-Instruct), or
/// `SWITCHYARD_GGUF` when set.
pub fn real_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHYARD_GGUF") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    Some(repo_root().join(".cache/models/qwen2.5-coder-0.5b-instruct.gguf")).filter(|p| p.is_file())
}

/// The python of the llama.cpp venv `scripts/llama-venv.sh` builds.
pub fn llama_python() -> Option<PathBuf> {
    let venv = repo_root().join(".cache/llama-venv");
    Some(venv.join("bin/python")).filter(|p| is_executable(p) && venv.join(".version").is_file())
}
