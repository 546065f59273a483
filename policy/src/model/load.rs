//! Reading a policy directory: `operator.toml` and `tenants/*.toml`, size and count limits,
//! every problem a diagnostic.

use super::*;

pub(super) struct PolicyFiles {
    pub(super) operator: Option<FileId>,
    pub(super) fragments: Vec<FileId>,
}

pub(super) fn read_policy_dir(
    dir: &Path,
    sources: &mut SourceMap,
    diags: &mut Vec<Diagnostic>,
) -> PolicyFiles {
    let mut files = PolicyFiles {
        operator: None,
        fragments: Vec::new(),
    };
    if !dir.is_dir() {
        diags.push(Diagnostic::global(format!(
            "{}: not a directory (a policy is a directory with operator.toml and tenants/*.toml)",
            dir.display()
        )));
        return files;
    }
    files.operator = read_one(&dir.join("operator.toml"), sources, diags);
    let tenants_dir = dir.join("tenants");
    if !tenants_dir.exists() {
        return files;
    }
    let entries = match fs::read_dir(&tenants_dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: cannot list: {e}",
                tenants_dir.display()
            )));
            return files;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    if paths.len() > MAX_FRAGMENTS {
        diags.push(Diagnostic::global(format!(
            "{}: {} fragments; at most {MAX_FRAGMENTS} are read",
            tenants_dir.display(),
            paths.len()
        )));
        paths.truncate(MAX_FRAGMENTS);
    }
    for p in paths {
        if let Some(id) = read_one(&p, sources, diags) {
            files.fragments.push(id);
        }
    }
    files
}

pub(super) fn read_one(
    path: &Path,
    sources: &mut SourceMap,
    diags: &mut Vec<Diagnostic>,
) -> Option<FileId> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: cannot read: {e}",
                path.display()
            )));
            return None;
        }
    };
    if bytes.len() > MAX_FILE_BYTES {
        diags.push(Diagnostic::global(format!(
            "{}: {} bytes; policy files are limited to {} bytes",
            path.display(),
            bytes.len(),
            MAX_FILE_BYTES
        )));
        return None;
    }
    match String::from_utf8(bytes) {
        Ok(text) => Some(sources.add(path.to_path_buf(), text)),
        Err(e) => {
            diags.push(Diagnostic::global(format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )));
            None
        }
    }
}
