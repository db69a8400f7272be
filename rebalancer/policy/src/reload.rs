//! Keeps the last good policy set while the admin edits the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{load_dir, LoadError};
use crate::policy::PolicySet;

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The directory validates to the set already in use.
    Unchanged,
    /// A new set is in use.
    Replaced { policies: usize },
}

/// The policy directory and the set in use.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: Arc<PolicySet>,
    generation: u64,
    last_error: Option<LoadError>,
}

impl PolicyStore {
    /// A store with an empty set (no policy acts) until the first successful [`Self::reload`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PolicyStore {
            dir: dir.into(),
            current: Arc::new(PolicySet::default()),
            generation: 0,
            last_error: None,
        }
    }

    /// Loads `dir`; fails when it does not validate.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LoadError> {
        let mut s = Self::new(dir);
        s.reload()?;
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set in use; cheap to clone and hand to an evaluation.
    pub fn current(&self) -> Arc<PolicySet> {
        Arc::clone(&self.current)
    }

    /// Increases each time a different set is put in use (0 = the initial empty set).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The problems of the last failed reload, cleared by a successful one.
    pub fn last_error(&self) -> Option<&LoadError> {
        self.last_error.as_ref()
    }

    /// Re-reads the directory. On error the set in use stays, and the error is returned and kept.
    pub fn reload(&mut self) -> Result<ReloadOutcome, LoadError> {
        match load_dir(&self.dir) {
            Ok(set) => {
                self.last_error = None;
                if *self.current == set && self.generation > 0 {
                    return Ok(ReloadOutcome::Unchanged);
                }
                let policies = set.len();
                self.current = Arc::new(set);
                self.generation += 1;
                tracing::info!(dir = %self.dir.display(), policies, generation = self.generation, "policy set loaded");
                Ok(ReloadOutcome::Replaced { policies })
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), problems = e.problems.len(), "policy reload failed; keeping the last good set");
                self.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}
