//! Reloading the model when its file changes on disk.
//!
//! The watch is on the file's directory, not on the file. An editor that saves by writing a new
//! file and renaming it over the old one replaces the inode, and a watch on the old inode would
//! see nothing after the first such save. Events for other names in the directory are ignored.
//! One save is a burst of events (a truncate and several writes, or a create, writes and a
//! rename), so the reload runs only once the file has been quiet for [`DEBOUNCE`]. A file that is
//! absent at that moment, between an unlink and a rename, is waited for rather than reported.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ModelReloader, ReloadTrigger};

/// How long the model file must stay unchanged after an event before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Events waiting for the debounce; more than this in one burst are dropped, since any one of
/// them triggers the same reload.
const EVENT_QUEUE: usize = 64;

/// A watch on the model file's directory, set up and ready to [`run`](ModelFileWatch::run).
pub struct ModelFileWatch {
    reloader: Arc<ModelReloader>,
    changes: mpsc::Receiver<()>,
    // Dropping the watcher ends the watch.
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching the directory of the reloader's model file. Changes made after this returns
/// are seen.
///
/// # Errors
/// When the watch cannot be set up: the directory does not exist, or the inotify instance or watch
/// limit is reached.
pub fn watch_model_file(reloader: Arc<ModelReloader>) -> anyhow::Result<ModelFileWatch> {
    let path = reloader.path().to_path_buf();
    let directory = watched_directory(&path);
    let file_name = path
        .file_name()
        .map(OsString::from)
        .with_context(|| format!("the model path {} has no file name", path.display()))?;

    let (events, changes) = mpsc::channel::<()>(EVENT_QUEUE);
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
        Ok(event) => {
            if is_change(&event.kind) && names_file(&event, &file_name) {
                // A full queue already holds a change that triggers the reload.
                let _ = events.try_send(());
            }
        }
        Err(error) => tracing::warn!(%error, "model file watch error; a change may be missed until the next one"),
    })
    .context("failed to create an inotify watcher for the model file")?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .with_context(|| format!("failed to watch {} for changes of the model file", directory.display()))?;
    tracing::info!(model = %path.display(), directory = %directory.display(), "watching the model file for changes");
    Ok(ModelFileWatch { reloader, changes, _watcher: watcher })
}

impl ModelFileWatch {
    /// Reloads the model after each change of its file, until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        let path = self.reloader.path().to_path_buf();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                change = self.changes.recv() => if change.is_none() { return },
            }
            // Wait out the rest of the burst.
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    change = tokio::time::timeout(DEBOUNCE, self.changes.recv()) => match change {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_quiet) => break,
                    },
                }
            }
            if !path.exists() {
                tracing::info!(model = %path.display(), "the model file is absent; the model in force stays until the file is back");
                continue;
            }
            // The reloader logs the outcome, an invalid file included.
            if let Err(error) = self.reloader.reload(ReloadTrigger::FileChange).await {
                tracing::warn!(%error, "model reload after a file change failed; the watch stops");
                return;
            }
        }
    }
}

/// Returns the directory to watch: the parent of `path`, or the working directory for a bare
/// file name.
fn watched_directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// True for events that can change the file's content: creation, modification, removal, renames,
/// and a close after writing. Opens and reads, the agent's own included, are not changes.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// True when the event concerns the model file, or names no path at all (an overflow of the
/// kernel's queue, after which any file may have changed).
fn names_file(event: &notify::Event, file_name: &OsString) -> bool {
    event.paths.is_empty() || event.paths.iter().any(|path| path.file_name() == Some(file_name.as_os_str()))
}
