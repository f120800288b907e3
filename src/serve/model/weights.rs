//! Safetensors checkpoints (single file or sharded with an index) read into f32 tensors.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{read_file, read_json, ModelError};

/// One tensor converted to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All tensors of a checkpoint by name. Tensors are moved out with [`WeightStore::take`] so the
/// model never holds two copies.
#[derive(Debug, Default)]
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
}

impl WeightStore {
    /// Loads every tensor of the checkpoint in `dir`: the files listed by
    /// `model.safetensors.index.json` when present, else `model.safetensors`, else every
    /// `*.safetensors` file. BF16, F16 and F32 are converted to f32.
    pub fn load(dir: &Path) -> Result<WeightStore, ModelError> {
        let mut store = WeightStore::default();
        for file in weight_files(dir)? {
            store.load_file(&file)?;
        }
        tracing::debug!(dir = %dir.display(), tensors = store.tensors.len(), "weights loaded");
        Ok(store)
    }

    fn load_file(&mut self, path: &Path) -> Result<(), ModelError> {
        let bytes = read_file(path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        for (name, view) in st.iter() {
            let data = to_f32(name, view.dtype(), view.data())?;
            let tensor = Tensor {
                shape: view.shape().to_vec(),
                data,
            };
            if self.tensors.insert(name.to_string(), tensor).is_some() {
                return Err(ModelError::DuplicateTensor {
                    name: name.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Builds a store from tensors already in memory (tests, benches).
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> WeightStore {
        WeightStore { tensors }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Moves tensor `name` out, checking that its shape is exactly `expected`.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if t.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t.data)
    }

    /// Names of tensors nobody took (logged after loading; usually buffers like
    /// `rotary_emb.inv_freq`).
    pub fn remaining(&self) -> BTreeSet<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
}

/// The safetensors files making up the checkpoint in `dir`, in load order.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                reason: format!("weight_map[\"{tensor}\"] is not a file name"),
            })?;
            // The index comes from the model directory; refuse paths that leave it.
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ModelError::Safetensors {
                    path: index.clone(),
                    reason: format!(
                        "weight_map[\"{tensor}\"] = \"{file}\" is not a plain file name"
                    ),
                });
            }
            files.insert(file.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(ModelError::NoWeights(dir.to_path_buf()));
    }
    files.sort();
    Ok(files)
}

/// Converts little-endian BF16/F16/F32 bytes to f32.
fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_half_types() {
        let bf = half::bf16::from_f32(1.5).to_bits().to_le_bytes();
        assert_eq!(to_f32("t", Dtype::BF16, &bf).unwrap(), vec![1.5]);
        let f = half::f16::from_f32(-0.25).to_bits().to_le_bytes();
        assert_eq!(to_f32("t", Dtype::F16, &f).unwrap(), vec![-0.25]);
        assert_eq!(
            to_f32("t", Dtype::I64, &[0; 8]).unwrap_err().to_string(),
            "tensor \"t\" has unsupported dtype I64 (supported: BF16, F16, F32)"
        );
    }

    #[test]
    fn take_checks_shape() {
        let mut m = HashMap::new();
        m.insert(
            "w".to_string(),
            Tensor {
                shape: vec![2, 3],
                data: vec![0.0; 6],
            },
        );
        let mut s = WeightStore::from_tensors(m);
        assert_eq!(
            s.take("w", &[3, 2]).unwrap_err().to_string(),
            "tensor \"w\" has shape [2, 3], expected [3, 2]"
        );
        assert_eq!(
            s.take("v", &[1]).unwrap_err().to_string(),
            "missing tensor \"v\""
        );
    }
}
