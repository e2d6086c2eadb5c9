//! Writes that never leave a half-written file or folder behind.
//!
//! Every output goes to a hidden sibling first (`.NAME.tmp-PID-N`) and is renamed into place
//! once complete, so a reader sees the old version or the new one, never a mix. The writing
//! process holds an advisory lock (`flock`) on the sibling while it exists; the kernel drops
//! that lock when the process dies, even on `kill -9`. [`remove_stale`] (run by [`Staging::new`]
//! and [`write_atomic`]) removes the siblings whose lock nobody holds: leftovers of a dead
//! process, never the work of a live one, whatever its PID.
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The folder that holds `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Input(format!("{}: path has no file name", path.display())))
}

/// A fresh hidden sibling of `path`: `.NAME.tmp-PID-N` (unique within this process too).
pub fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = file_name(path)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent_dir(path).join(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

/// Best effort: fsync the folder holding `path`, so that a rename into it is durable.
pub fn sync_parent(path: &Path) {
    if let Ok(d) = File::open(parent_dir(path)) {
        let _ = d.sync_all();
    }
}

/// Whether a sibling name is one of ours for `name`: `.NAME.tmp-…` or `.NAME.old-…`.
fn is_sibling_of(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(name))
        .is_some_and(|r| r.starts_with(".tmp-") || r.starts_with(".old-"))
}

/// Removes the staging siblings of `path` (`.NAME.tmp-*`, `.NAME.old-*`) that no live process
/// holds. Returns the paths removed. Siblings a live process is writing are left alone.
pub fn remove_stale(path: &Path) -> Result<Vec<PathBuf>> {
    let name = file_name(path)?;
    let dir = parent_dir(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut removed = vec![];
    for e in entries.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        if !is_sibling_of(&entry, &name) {
            continue;
        }
        let p = e.path();
        let Ok(f) = File::open(&p) else { continue };
        // A held lock means a live writer; anything else (taken, or unsupported) is stale.
        if matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)) {
            continue;
        }
        let res = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if res.is_ok() {
            removed.push(p);
        }
        drop(f);
    }
    Ok(removed)
}

/// Writes `bytes` to `path` through a locked temp sibling, fsync and rename; creates the parent
/// folder. On any error the temp file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _ = remove_stale(path);
    let tmp = temp_sibling(path)?;
    let res = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let _ = f.try_lock();
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_parent(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes `value` as pretty JSON (with a final newline) through [`write_atomic`].
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

/// A folder (or file) built under a hidden locked sibling and renamed onto its target.
///
/// Dropping it without [`Staging::commit`] removes the sibling; a process killed meanwhile leaves
/// it locked-free, and the next [`Staging::new`] for the same target removes it.
#[derive(Debug)]
pub struct Staging {
    tmp: PathBuf,
    target: PathBuf,
    /// The lock holder: the staging folder itself (or, for a file, the file).
    lock: Option<File>,
    committed: bool,
}

impl Staging {
    /// An empty staging folder beside `target` (whose parent is created). Removes stale
    /// siblings of dead processes first.
    pub fn dir(target: &Path) -> Result<Self> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let _ = remove_stale(target)?;
        let tmp = temp_sibling(target)?;
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let lock = File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let _ = lock.try_lock();
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            lock: Some(lock),
            committed: false,
        })
    }

    /// A staging file beside `target`, opened for writing (see [`Staging::file_handle`]).
    pub fn file(target: &Path) -> Result<(Self, File)> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let _ = remove_stale(target)?;
        let tmp = temp_sibling(target)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let _ = f.try_lock();
        let lock = f.try_clone().map_err(|e| Error::io(&tmp, e))?;
        Ok((
            Self {
                tmp,
                target: target.to_path_buf(),
                lock: Some(lock),
                committed: false,
            },
            f,
        ))
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the staged folder or file onto the target. An existing target is replaced only
    /// with `overwrite` (moved aside under a locked `.NAME.old-…` name first and removed after,
    /// and put back if the rename fails); without it an existing target is an error.
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        let target = self.target.clone();
        if target.symlink_metadata().is_ok() {
            if !overwrite {
                return Err(Error::Input(format!(
                    "{} already exists (not replaced)",
                    target.display()
                )));
            }
            let name = file_name(&target)?;
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let old = parent_dir(&target).join(format!(".{name}.old-{}-{n}", std::process::id()));
            // Locked before the move, so no other process mistakes it for a leftover.
            let guard = File::open(&target).ok();
            if let Some(g) = &guard {
                let _ = g.try_lock();
            }
            std::fs::rename(&target, &old).map_err(|e| Error::io(&target, e))?;
            if let Err(e) = std::fs::rename(&self.tmp, &target) {
                let _ = std::fs::rename(&old, &target);
                return Err(Error::io(&target, e));
            }
            let _ = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            drop(guard);
        } else {
            std::fs::rename(&self.tmp, &target).map_err(|e| Error::io(&target, e))?;
        }
        sync_parent(&target);
        self.committed = true;
        self.lock = None;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = if self.tmp.is_dir() {
                std::fs::remove_dir_all(&self.tmp)
            } else {
                std::fs::remove_file(&self.tmp)
            };
        }
    }
}

/// An exclusive advisory lock on `path` (created if missing), held until dropped; waits for
/// another holder (another process fetching the same asset, say) to let go.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock is ours.
    pub fn acquire(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent_dir(path)).map_err(|e| Error::io(parent_dir(path), e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.lock().map_err(|e| Error::io(path, e))?;
        Ok(Self { _file: file })
    }

    /// `None` when another holder has it.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>> {
        std::fs::create_dir_all(parent_dir(path)).map_err(|e| Error::io(parent_dir(path), e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_sibling() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.json");
        write_atomic(&p, b"one").unwrap();
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        let v: serde_json::Value = read_json(&p).unwrap();
        assert_eq!(v["a"], 1);
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.json")]);
    }

    #[test]
    fn staging_commits_replaces_and_cleans_up_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        let s = Staging::dir(&target).unwrap();
        std::fs::write(s.path().join("a"), b"1").unwrap();
        s.commit(false).unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");

        let s = Staging::dir(&target).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        assert!(Staging::dir(&target).is_ok());
        let tmp = s.path().to_path_buf();
        // Not replaced without overwrite; the staging folder is gone once dropped.
        assert!(s.commit(false).is_err());
        assert!(!tmp.exists());

        let s = Staging::dir(&target).unwrap();
        std::fs::write(s.path().join("b"), b"2").unwrap();
        s.commit(true).unwrap();
        assert!(target.join("b").exists() && !target.join("a").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_siblings_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        // A leftover of a dead process: nobody holds its lock (its PID may even be ours).
        let dead = dir
            .path()
            .join(format!(".out.tmp-{}-999", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("x"), b"half").unwrap();
        let dead_old = dir.path().join(".out.old-1-0");
        std::fs::write(&dead_old, b"old").unwrap();
        // A live writer's staging folder, and an unrelated hidden file.
        let live = Staging::dir(&target).unwrap();
        let other = dir.path().join(".outer.tmp-1-0");
        std::fs::write(&other, b"keep").unwrap();
        assert!(
            !dead.exists() && !dead_old.exists(),
            "Staging::dir removes stale siblings"
        );
        let removed = remove_stale(&target).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(live.path().exists());
        assert!(other.exists());
    }

    #[test]
    fn file_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let a = FileLock::acquire(&p).unwrap();
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(a);
        assert!(FileLock::try_acquire(&p).unwrap().is_some());
    }
}
