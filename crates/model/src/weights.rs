//! Named tensors in HF layout and naming (`model.layers.{i}.self_attn.q_proj.weight`, `[out, in]`).
//!
//! Loading reads `model.safetensors` or a sharded `model.safetensors.index.json`; every tensor is
//! converted to F32 on the CPU. Writing is atomic (temp file + fsync + rename).
//!
//! A truncated or malformed file is reported as [`ModelError::Malformed`] naming the file: the
//! header, the data offsets and the dtypes are checked by the `safetensors` parser before any
//! tensor is built, so a bad file never panics.
use crate::error::{ModelError, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A checkpoint's tensors by HF name. Linear weights are `[out_features, in_features]`,
/// embeddings `[vocab, hidden]`, norms `[hidden]`; all F32 on the CPU.
pub type Weights = BTreeMap<String, Tensor>;

/// File name of a single-file HF checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensors that some HF checkpoints carry but that are recomputed at load time; dropped on load.
fn is_ignored_tensor(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Loads every tensor of an HF folder as F32 on the CPU.
///
/// Reads `dir/model.safetensors` if present, else the shards listed in
/// `dir/model.safetensors.index.json` (`{"weight_map": {tensor: shard_file}}`). F32, F16 and BF16
/// are accepted; other dtypes give [`ModelError::Malformed`].
pub fn load_safetensors_dir(dir: &Path) -> Result<Weights> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return load_safetensors_file(&single);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(ModelError::Malformed {
            path: dir.into(),
            msg: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Malformed {
            path: index.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Malformed {
            path: index.clone(),
            msg: "no `weight_map` object".into(),
        })?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::Malformed {
            path: index.clone(),
            msg: format!("weight_map entry for `{name}` is not a string"),
        })?;
        if file.contains("..") || Path::new(file).is_absolute() {
            return Err(ModelError::Malformed {
                path: index.clone(),
                msg: format!("shard path `{file}` escapes the folder"),
            });
        }
        shards.insert(file.to_string());
    }
    let mut weights = Weights::new();
    for shard in &shards {
        let path = dir.join(shard);
        for (name, t) in load_safetensors_file(&path)? {
            if weights.insert(name.clone(), t).is_some() {
                return Err(ModelError::Malformed {
                    path: path.clone(),
                    msg: format!("tensor `{name}` appears in two shards"),
                });
            }
        }
    }
    for name in map.keys() {
        if !is_ignored_tensor(name) && !weights.contains_key(name) {
            return Err(ModelError::Malformed {
                path: index.clone(),
                msg: format!("tensor `{name}` is listed but missing from its shard"),
            });
        }
    }
    Ok(weights)
}

/// Loads one `.safetensors` file, converting every tensor to F32 on the CPU.
pub fn load_safetensors_file(path: &Path) -> Result<Weights> {
    use std::io::{Read, Seek, SeekFrom};
    let malformed = |msg: String| ModelError::Malformed {
        path: path.into(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|_| malformed("safetensors: file is shorter than its header".into()))?;
    let header_len = u64::from_le_bytes(len8);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(malformed(format!(
            "safetensors: header length {header_len} exceeds the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("safetensors: invalid header JSON: {e}")))?;
    let data_start = 8 + header_len;
    // Read tensor by tensor (one transient buffer at a time) rather than the whole file, so that
    // peak memory stays near the size of the F32 weights.
    let mut out = Weights::new();
    for (name, info) in &header {
        if name == "__metadata__" || is_ignored_tensor(name) {
            continue;
        }
        let bad = |m: &str| malformed(format!("tensor `{name}`: {m}"));
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some(other) => {
                return Err(bad(&format!(
                    "unsupported dtype {other} (F32/F16/BF16 only)"
                )))
            }
            None => return Err(bad("no dtype")),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .ok_or_else(|| bad("bad shape"))
            })
            .collect::<Result<_>>()?;
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no data_offsets"))?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| bad("bad data_offsets")))
            .collect::<Result<_>>()?;
        let [begin, end] = offs[..] else {
            return Err(bad("data_offsets must have two entries"));
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        let nbytes = numel as u64 * dtype.size_in_bytes() as u64;
        if end < begin || end - begin != nbytes {
            return Err(bad(&format!(
                "data_offsets {begin}..{end} do not match shape {shape:?}"
            )));
        }
        if data_start + end > file_len {
            return Err(bad(&format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                data_start + end
            )));
        }
        f.seek(SeekFrom::Start(data_start + begin))
            .map_err(|e| ModelError::io(path, e))?;
        let mut buf = vec![0u8; nbytes as usize];
        f.read_exact(&mut buf)
            .map_err(|e| ModelError::io(path, e))?;
        let t = Tensor::from_raw_buffer(&buf, dtype, &shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| bad(&e.to_string()))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Parses safetensors bytes; `path` is only used in error messages.
pub fn load_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Weights> {
    let malformed = |msg: String| ModelError::Malformed {
        path: path.into(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(format!("safetensors: {e}")))?;
    let mut out = Weights::new();
    for (name, view) in st.iter() {
        if is_ignored_tensor(name) {
            continue;
        }
        match view.dtype() {
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {}
            other => {
                return Err(malformed(format!(
                    "tensor `{name}` has unsupported dtype {other:?} (F32/F16/BF16 only)"
                )))
            }
        }
        let t = view
            .load(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| malformed(format!("tensor `{name}`: {e}")))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Writes `weights` to `path` as one safetensors file (metadata `{"format": "pt"}`), atomically:
/// the data goes to a temp file in the same folder, is fsynced, then renamed over `path`.
pub fn save_safetensors_atomic(weights: &Weights, path: &Path) -> Result<()> {
    let tmp = temp_sibling(path);
    let res = (|| -> Result<()> {
        let cpu: Vec<(&str, Tensor)> = weights
            .iter()
            .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(cpu, Some(meta), &tmp).map_err(|e| {
            ModelError::Malformed {
                path: path.into(),
                msg: format!("writing safetensors: {e}"),
            }
        })?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        sync_parent(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| ModelError::io(&tmp, e))?;
        f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        sync_parent(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_file(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| ModelError::io(path, e))?;
    f.sync_all().map_err(|e| ModelError::io(path, e))
}

/// Best effort: fsync the folder so the rename itself is durable.
pub(crate) fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Weights {
        let mut w = Weights::new();
        w.insert(
            "a.weight".into(),
            Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        );
        w.insert(
            "b.bias".into(),
            Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap(),
        );
        w
    }

    fn assert_same(a: &Weights, b: &Weights) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in a {
            let u = &b[k];
            assert_eq!(t.dims(), u.dims(), "{k}");
            assert_eq!(u.dtype(), DType::F32);
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y, "{k}");
        }
    }

    #[test]
    fn roundtrip_single_file_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let w = sample();
        save_safetensors_atomic(&w, &dir.path().join(SINGLE_FILE)).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SINGLE_FILE)]);
        assert_same(&w, &load_safetensors_dir(dir.path()).unwrap());
    }

    #[test]
    fn f16_and_bf16_are_converted_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let w = sample();
        let mut half = Weights::new();
        half.insert(
            "a.weight".to_string(),
            w["a.weight"].to_dtype(DType::F16).unwrap(),
        );
        half.insert(
            "b.bias".to_string(),
            w["b.bias"].to_dtype(DType::BF16).unwrap(),
        );
        save_safetensors_atomic(&half, &dir.path().join(SINGLE_FILE)).unwrap();
        // Values are exactly representable in f16/bf16.
        assert_same(&w, &load_safetensors_dir(dir.path()).unwrap());
    }

    #[test]
    fn sharded_index_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let w = sample();
        let mut s1 = Weights::new();
        s1.insert("a.weight".to_string(), w["a.weight"].clone());
        let mut s2 = Weights::new();
        s2.insert("b.bias".to_string(), w["b.bias"].clone());
        save_safetensors_atomic(&s1, &dir.path().join("model-00001-of-00002.safetensors")).unwrap();
        save_safetensors_atomic(&s2, &dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        assert_same(&w, &load_safetensors_dir(dir.path()).unwrap());
        // A listed tensor that no shard holds is an error.
        let index = serde_json::json!({"weight_map": {
            "a.weight": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        assert!(matches!(
            load_safetensors_dir(dir.path()),
            Err(ModelError::Malformed { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_files_are_malformed_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        save_safetensors_atomic(&sample(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            match load_safetensors_dir(dir.path()) {
                Err(ModelError::Malformed { path: p, .. }) => assert_eq!(p, path, "cut {cut}"),
                other => panic!("cut {cut}: expected Malformed, got {other:?}"),
            }
        }
        // A header length that points far past the end of the file.
        let mut evil = (1u64 << 40).to_le_bytes().to_vec();
        evil.extend_from_slice(b"{}");
        std::fs::write(&path, &evil).unwrap();
        assert!(matches!(
            load_safetensors_dir(dir.path()),
            Err(ModelError::Malformed { .. })
        ));
        // Valid JSON header whose tensor data lies past the end.
        let header = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bad = (header.len() as u64).to_le_bytes().to_vec();
        bad.extend_from_slice(header);
        bad.extend_from_slice(&[0u8; 8]);
        std::fs::write(&path, &bad).unwrap();
        let err = load_safetensors_dir(dir.path()).unwrap_err();
        assert!(matches!(err, ModelError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains(SINGLE_FILE), "{err}");
    }

    #[test]
    fn empty_folder_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_safetensors_dir(dir.path()),
            Err(ModelError::Malformed { .. })
        ));
    }
}
