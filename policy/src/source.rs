//! Policy source files, locations in them, and diagnostics rendered the way compilers do it:
//! `file:line:col`, the offending line, a caret under the spot, and a plain-language message.

use std::fmt::{self, Write as _};
use std::ops::Range;
use std::path::PathBuf;

/// Index of a file in a [`SourceMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub(crate) u32);

/// A place in a policy file: which file and which byte range.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Loc {
    pub file: FileId,
    pub span: Range<usize>,
}

impl Loc {
    pub(crate) fn new(file: FileId, span: Range<usize>) -> Self {
        Loc { file, span }
    }
}

/// The text of one policy file, with its line starts for line/column lookups.
#[derive(Debug)]
pub struct SourceFile {
    /// The path as the user gave it (joined with the file name), used in messages.
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

/// All files of one policy, so that any [`Loc`] can be shown as `file:line:col`.
#[derive(Debug, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, path: PathBuf, text: String) -> FileId {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let id = FileId(self.files.len() as u32);
        self.files.push(SourceFile {
            path,
            text,
            line_starts,
        });
        id
    }

    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(i as u32), f))
    }

    /// 1-based line and column (in characters) of byte offset `offset` of `file`.
    pub fn line_col(&self, file: FileId, offset: usize) -> (usize, usize) {
        let f = self.file(file);
        let offset = offset.min(f.text.len());
        let line = match f.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = f.line_starts[line];
        let col = f
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    /// `path:line` — how rules are cited in verdicts ("rule files, policy/x.toml:12").
    pub fn cite(&self, loc: &Loc) -> String {
        let (line, _) = self.line_col(loc.file, loc.span.start);
        format!("{}:{}", self.file(loc.file).path.display(), line)
    }

    /// `path:line:col`.
    pub fn position(&self, loc: &Loc) -> String {
        let (line, col) = self.line_col(loc.file, loc.span.start);
        format!("{}:{}:{}", self.file(loc.file).path.display(), line, col)
    }

    fn line_text(&self, file: FileId, line: usize) -> &str {
        let f = self.file(file);
        let start = f.line_starts[line - 1];
        let end = f.line_starts.get(line).copied().unwrap_or(f.text.len());
        f.text
            .get(start..end)
            .unwrap_or("")
            .trim_end_matches(['\n', '\r'])
    }
}

/// How bad a finding is: errors make `check` fail, warnings are shown but do not (unless
/// `--deny-warnings`), notes only explain other findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
    Note,
}

impl Severity {
    /// `error`, `warning`, `note`: as printed before the message.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One finding about a policy, with where it is and, optionally, a related place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Where; `None` for findings about the directory itself (a missing operator file).
    pub loc: Option<Loc>,
    pub message: String,
    /// A second place worth showing ("first defined here").
    pub related: Option<(Loc, String)>,
}

impl Diagnostic {
    pub fn error(loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            loc: Some(loc),
            message: message.into(),
            related: None,
        }
    }

    pub fn warning(loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            loc: Some(loc),
            message: message.into(),
            related: None,
        }
    }

    pub fn note(loc: Loc, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Note,
            loc: Some(loc),
            message: message.into(),
            related: None,
        }
    }

    pub fn global(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            loc: None,
            message: message.into(),
            related: None,
        }
    }

    pub fn with_related(mut self, loc: Loc, note: impl Into<String>) -> Self {
        self.related = Some((loc, note.into()));
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    pub fn is_warning(&self) -> bool {
        self.severity == Severity::Warning
    }

    /// Renders the diagnostic with its source line and caret(s).
    pub fn render(&self, sources: &SourceMap) -> String {
        let mut out = String::new();
        let label = self.severity.label();
        match &self.loc {
            None => {
                let _ = writeln!(out, "{label}: {}", self.message);
            }
            Some(loc) => {
                let _ = writeln!(out, "{}: {label}: {}", sources.position(loc), self.message);
                render_snippet(&mut out, sources, loc);
            }
        }
        if let Some((loc, note)) = &self.related {
            let _ = writeln!(out, "  {}: note: {note}", sources.position(loc));
            render_snippet(&mut out, sources, loc);
        }
        out
    }
}

fn render_snippet(out: &mut String, sources: &SourceMap, loc: &Loc) {
    let (line, col) = sources.line_col(loc.file, loc.span.start);
    let text = sources.line_text(loc.file, line);
    let width = {
        let (end_line, end_col) = sources.line_col(loc.file, loc.span.end);
        if end_line == line && end_col > col {
            end_col - col
        } else {
            1
        }
    };
    let gutter = line.to_string().len();
    let _ = writeln!(out, "{:gutter$} |", "");
    let _ = writeln!(out, "{line} | {text}");
    let pad: String = text
        .chars()
        .take(col - 1)
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let _ = writeln!(out, "{:gutter$} | {pad}{}", "", "^".repeat(width.max(1)));
}

/// The diagnostics of one load, with the sources needed to show them.
#[derive(Debug)]
pub(crate) struct Report<'a> {
    pub(crate) sources: &'a SourceMap,
    pub(crate) diagnostics: &'a [Diagnostic],
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.diagnostics {
            writeln!(f, "{}", d.render(self.sources))?;
        }
        Ok(())
    }
}
