//! komnet-testkit: support shared by the workspace's test suites, never a dependency of a
//! product crate. It owns where the policy examples are (`examples/policy/<name>`) and
//! throwaway copies of them: each in a temporary directory that is deleted when the copy is
//! dropped, so a test edits its own copy and leaves nothing behind.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// `examples/policy/<name>` of this workspace (`landkreis`, `st-wendel`, ...).
pub fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policy")
        .join(name)
}

/// A copy of the policy example `name` in a new temporary directory.
///
/// # Panics
/// When the example cannot be read or copied: a test cannot go on without it.
pub fn copy_example(name: &str) -> PolicyCopy {
    let dir = tempfile::Builder::new()
        .prefix(&format!("komnet-policy-{name}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a temporary directory: {e}"));
    copy_dir(&example_dir(name), dir.path());
    PolicyCopy(dir)
}

/// Copies the files and directories below `from` into `to` (created if missing).
///
/// # Panics
/// When something cannot be read or written.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dst.display()));
        }
    }
}

/// A policy directory of the test's own, deleted on drop; used like a `Path`.
#[derive(Debug)]
pub struct PolicyCopy(tempfile::TempDir);

impl PolicyCopy {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl std::ops::Deref for PolicyCopy {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for PolicyCopy {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<OsStr> for PolicyCopy {
    fn as_ref(&self) -> &OsStr {
        self.0.path().as_os_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_has_the_examples_files_and_goes_away_when_dropped() {
        let copy = copy_example("landkreis");
        assert!(copy.join("operator.toml").is_file());
        assert!(copy.join("tenants").read_dir().unwrap().next().is_some());
        let path = copy.path().to_owned();
        drop(copy);
        assert!(!path.exists());
    }
}
