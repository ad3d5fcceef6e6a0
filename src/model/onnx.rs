//! The ONNX Runtime backend: loads the library and the session, pads a batch to its longest
//! member, runs the encoder, pools and normalises.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

use super::config::{EmbeddingConfig, Pooling};
use super::pooling::{normalize, pool};
use super::{Embedder, Encoded, ModelError};
use crate::settings::Settings;

/// Where the files come from and how ORT runs them.
#[derive(Debug, Clone)]
pub struct OnnxOptions {
    pub model_path: PathBuf,
    /// libonnxruntime.so; `None` = $ORT_DYLIB_PATH.
    pub ort_library: Option<PathBuf>,
    /// Intra-op threads; 0 = what this process may use (cgroup-aware).
    pub intra_threads: usize,
    /// Idle intra-op threads spin instead of sleeping (ORT's default is to spin).
    pub intra_spinning: bool,
    /// "disable", "basic", "extended" or "all".
    pub optimization: String,
}

impl OnnxOptions {
    pub fn from_settings(settings: &Settings) -> Self {
        let m = &settings.model;
        Self {
            model_path: settings.model_path(),
            ort_library: Some(&m.ort_library)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            intra_threads: m.intra_threads,
            intra_spinning: m.intra_spinning,
            optimization: m.optimization.clone(),
        }
    }
}

fn optimization_level(name: &str) -> Option<GraphOptimizationLevel> {
    match name {
        "disable" => Some(GraphOptimizationLevel::Disable),
        "basic" => Some(GraphOptimizationLevel::Level1),
        "extended" => Some(GraphOptimizationLevel::Level2),
        "all" => Some(GraphOptimizationLevel::All),
        _ => None,
    }
}

pub struct OnnxEmbedder {
    session: Session,
    // Sessions need the environment alive; ort keeps it behind an Arc.
    _env: ort::environment::Environment,
    name: String,
    dimension: usize,
    pooling: Pooling,
    normalize: bool,
    wants_token_types: bool,
    output_name: String,
}

/// The CPUs this process may really use. std reads the cgroup quota and affinity mask,
/// which ORT's own default (all cores of the host) ignores.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Loads the ONNX Runtime library once per process; a missing or too-old library is a clear error.
pub fn init_runtime(library: Option<&Path>) -> Result<ort::environment::Environment, ModelError> {
    let path = match library {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                return Err(ModelError::Runtime {
                    path: "(none)".into(),
                    reason: "neither model.ort_library nor ORT_DYLIB_PATH is set".into(),
                })
            }
        },
    };
    let runtime_err = |reason: String| ModelError::Runtime {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_file() {
        return Err(runtime_err("file not found".into()));
    }
    ort::init_from(&path)
        .map_err(|e| runtime_err(e.to_string()))?
        .with_name("embed-worker")
        .build()
        .map_err(|e| runtime_err(e.to_string()))
}

impl OnnxEmbedder {
    pub fn load(options: &OnnxOptions, config: &EmbeddingConfig) -> Result<Self, ModelError> {
        let env = init_runtime(options.ort_library.as_deref())?;
        let path = &options.model_path;
        let file_err = |reason: String| ModelError::ModelFile {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(file_err("file not found".into()));
        }
        let threads = if options.intra_threads == 0 {
            available_cpus()
        } else {
            options.intra_threads
        };
        // Settings::validate has already refused any other name.
        let level =
            optimization_level(&options.optimization).unwrap_or(GraphOptimizationLevel::All);
        // One operator at a time (inter 1): this encoder is a chain, so parallel branches gain
        // nothing and a second pool would only compete for the same cores.
        let session = Session::builder(&env)
            .and_then(|b| Ok(b.with_optimization_level(level)?))
            .and_then(|b| Ok(b.with_intra_threads(threads)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|b| Ok(b.with_intra_op_spinning(options.intra_spinning)?))
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| file_err(e.to_string()))?;

        let sig_err = |reason: String| ModelError::Signature {
            path: path.clone(),
            reason,
        };
        let input_names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !input_names.contains(&required) {
                return Err(sig_err(format!(
                    "no input named {required:?} (inputs: {input_names:?})"
                )));
            }
        }
        if let Some(other) = input_names
            .iter()
            .find(|n| !["input_ids", "attention_mask", "token_type_ids"].contains(n))
        {
            return Err(sig_err(format!("unexpected input {other:?}")));
        }
        let wants_token_types = input_names.contains(&"token_type_ids");
        let output = session
            .outputs()
            .first()
            .ok_or_else(|| sig_err("no outputs".into()))?;
        let output_name = output.name().to_string();
        let shape: Vec<i64> = match output.dtype() {
            ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
            other => {
                return Err(sig_err(format!(
                    "output {output_name:?} is {other:?}, not a tensor"
                )))
            }
        };
        let dimension = match shape.as_slice() {
            [_, _, d] if *d > 0 => *d as usize,
            _ => {
                return Err(sig_err(format!(
                    "output {output_name:?} has shape {shape:?}; expected [batch, sequence, dim] with a fixed dim \
                     (token embeddings, before pooling)"
                )))
            }
        };
        if dimension != config.dimension {
            return Err(sig_err(format!(
                "output dimension {dimension} disagrees with embedding.json's {}",
                config.dimension
            )));
        }
        tracing::info!(model = %path.display(), dimension, threads, spinning = options.intra_spinning,
            optimization = %options.optimization, "model loaded");
        Ok(Self {
            session,
            _env: env,
            name: config.name.clone(),
            dimension,
            pooling: config.pooling,
            normalize: config.normalize,
            wants_token_types,
            output_name,
        })
    }
}

impl Embedder for OnnxEmbedder {
    fn embed(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let rows = batch.len();
        // An empty encoding (a tokenizer without special tokens given "") still needs one column.
        let cols = batch.iter().map(Encoded::len).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::zeros((rows, cols));
        let mut mask = Array2::<i64>::zeros((rows, cols));
        // One sequence per row: every token type is 0.
        let types = Array2::<i64>::zeros((rows, cols));
        for (r, enc) in batch.iter().enumerate() {
            for (c, &id) in enc.ids.iter().enumerate() {
                ids[[r, c]] = i64::from(id);
                mask[[r, c]] = 1;
            }
        }
        let infer = |e: ort::Error| ModelError::Inference(e.to_string());
        let mut inputs = vec![
            (
                "input_ids",
                Tensor::from_array(ids).map_err(infer)?.into_dyn(),
            ),
            (
                "attention_mask",
                Tensor::from_array(mask.clone()).map_err(infer)?.into_dyn(),
            ),
        ];
        if self.wants_token_types {
            inputs.push((
                "token_type_ids",
                Tensor::from_array(types).map_err(infer)?.into_dyn(),
            ));
        }
        let outputs = self.session.run(inputs).map_err(infer)?;
        let (shape, hidden) = outputs[self.output_name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(infer)?;
        let dim = self.dimension;
        if shape.len() != 3
            || shape[0] as usize != rows
            || shape[1] as usize != cols
            || shape[2] as usize != dim
        {
            return Err(ModelError::Inference(format!(
                "output shape {:?}, expected [{rows}, {cols}, {dim}]",
                &shape[..]
            )));
        }
        let per_row = cols * dim;
        let vectors = (0..rows)
            .map(|r| {
                let mask_row = mask.row(r);
                let mask_slice = mask_row
                    .as_slice()
                    .expect("a row of a standard-layout array is contiguous");
                let mut v = pool(
                    &hidden[r * per_row..(r + 1) * per_row],
                    mask_slice,
                    dim,
                    self.pooling,
                );
                if self.normalize {
                    normalize(&mut v);
                }
                v
            })
            .collect();
        Ok(vectors)
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn name(&self) -> &str {
        &self.name
    }
}
