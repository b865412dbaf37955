//! What the command log said about one step: what kind of step its label
//! names, and how it ended.

/// What a step is, from its label: phases report their own progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Git,
    FlakeUpdate,
    Rebuild,
    Other,
}

impl StepKind {
    pub fn of(label: &str) -> Self {
        if label.starts_with("git ") {
            StepKind::Git
        } else if label.starts_with("nix flake update") {
            StepKind::FlakeUpdate
        } else if label.starts_with("nixos-rebuild") {
            StepKind::Rebuild
        } else {
            StepKind::Other
        }
    }
}

/// How one step ended.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub label: String,
    pub code: i32,
    /// The supervisor's words: `exit code 3`, `killed by signal 15`, why
    /// it could not start, `timed out after 600s`.
    pub how: String,
    pub ok: bool,
    /// The stderr line that best says what went wrong (ErrorDetail).
    pub detail: String,
    pub not_started: bool,
    pub timed_out: bool,
}

impl StepResult {
    /// The quoted stderr line, else the supervisor's words.
    pub fn detail_or_how(&self) -> &str {
        if self.detail.is_empty() {
            &self.how
        } else {
            &self.detail
        }
    }
}
