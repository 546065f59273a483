//! The one way komnet's programs write files: a secret file is readable by its owner only
//! (0600), a public one by everyone (0644), whatever the umask; a replaced file is replaced
//! atomically (temporary file, fsync, rename, fsync of the directory), so a crash or power loss
//! leaves the old content or the new one, never a mix or an empty file.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Who may read a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Keys, tokens, enrollments: mode 0600.
    Secret,
    /// Public keys, configuration: mode 0644.
    Public,
}

impl Visibility {
    fn mode(self) -> u32 {
        match self {
            Visibility::Secret => 0o600,
            Visibility::Public => 0o644,
        }
    }
}

/// Why a file was not written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: exists already; it is not overwritten")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Replaces `path` with `contents` atomically; the parent directory must exist.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// use komnet_proto::files::{write_atomic, Visibility};
/// let path = dir.path().join("enrollment.json");
/// write_atomic(&path, b"{}", Visibility::Secret).unwrap();
/// write_atomic(&path, b"{\"v\":2}", Visibility::Secret).unwrap();
/// assert_eq!(std::fs::read(&path).unwrap(), b"{\"v\":2}");
/// ```
pub fn write_atomic(path: &Path, contents: &[u8], visibility: Visibility) -> Result<(), FileError> {
    let file_name = path.file_name().ok_or_else(|| FileError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
    })?;
    let mut tmp_name = file_name.to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(visibility.mode())
            .open(&tmp)
            .map_err(io(&tmp))?;
        // The mode given to open() is filtered by the umask; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(visibility.mode()))
            .map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path)
}

/// Creates `path` (and its missing parent directories) with `contents`, refusing to replace
/// an existing file: for keys and tokens that must never be overwritten by accident.
pub fn create_new(path: &Path, contents: &[u8], visibility: Visibility) -> Result<(), FileError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(visibility.mode())
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                FileError::Exists {
                    path: path.to_owned(),
                }
            } else {
                FileError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    let written = file
        .set_permissions(fs::Permissions::from_mode(visibility.mode()))
        .and_then(|()| file.write_all(contents))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        // Nothing half-written stays behind.
        let _ = fs::remove_file(path);
        return Err(FileError::Io {
            path: path.to_owned(),
            source: e,
        });
    }
    sync_parent(path)
}

/// [`create_new`] for a secret (0600).
pub fn create_secret(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    create_new(path, contents, Visibility::Secret)
}

/// Makes a rename or creation in the file's directory durable.
fn sync_parent(path: &Path) -> Result<(), FileError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_hold_whatever_the_umask_and_old_content_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("key");
        write_atomic(&secret, b"one", Visibility::Secret).unwrap();
        assert_eq!(mode(&secret), 0o600);
        write_atomic(&secret, b"two", Visibility::Secret).unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"two");
        let public = dir.path().join("key.pub");
        write_atomic(&public, b"pub", Visibility::Public).unwrap();
        assert_eq!(mode(&public), 0o644);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn create_new_refuses_to_overwrite_and_makes_parents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/token.json");
        create_secret(&path, b"x").unwrap();
        assert_eq!(mode(&path), 0o600);
        let err = create_secret(&path, b"y").unwrap_err();
        assert!(matches!(err, FileError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("token.json"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/file");
        let err = write_atomic(&path, b"x", Visibility::Public).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
