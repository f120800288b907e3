//! Locating the external tools tests drive (Envoy, promtool) and skipping cleanly without them.
//!
//! Lookup order: the `SWITCHYARD_<TOOL>` environment variable, then the cache that
//! `scripts/install-test-deps.sh` fills (`<repo>/.cache/...`), then `PATH`.

use std::path::{Path, PathBuf};

/// Prints `SKIPPED: <why>` and returns from the calling test when the option is `None`.
#[macro_export]
macro_rules! require_tool {
    ($found:expr, $what:expr) => {
        match $found {
            Some(path) => path,
            None => {
                println!(
                    "SKIPPED: {} not found (run scripts/install-test-deps.sh)",
                    $what
                );
                return;
            }
        }
    };
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
