//! The model's identity: a short hash of everything that decides its vectors (the ONNX file,
//! the tokenizer, pooling, normalisation, the longest input), so two workers agree on it exactly
//! when they put their vectors in the same space. Recorded with the index and every document
//! (see `store::generation`).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{EmbeddingConfig, ModelError};

/// Hex digits kept of the SHA-256: 64 bits, ample to tell a handful of models apart.
const HEX_DIGITS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The short hash, `HEX_DIGITS` lowercase hex digits.
    pub id: String,
    /// For people: "all-MiniLM-L6-v2 (model_int8.onnx, 384 dims)".
    pub name: String,
}

impl Fingerprint {
    /// The fingerprint of the ONNX file at `onnx`, the tokenizer at `tokenizer`, and `config`.
    pub fn of_files(
        onnx: &Path,
        tokenizer: &Path,
        config: &EmbeddingConfig,
    ) -> Result<Self, ModelError> {
        let mut hash = Sha256::new();
        hash.update(b"embed-worker model fingerprint 1\0");
        hash_file(&mut hash, onnx).map_err(|e| ModelError::ModelFile {
            path: onnx.to_path_buf(),
            reason: e.to_string(),
        })?;
        hash_file(&mut hash, tokenizer).map_err(|e| ModelError::Tokenizer {
            path: tokenizer.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file = onnx.file_name().map_or_else(
            || onnx.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        Ok(Self::finish(hash, config, &file))
    }

    /// A fake model's fingerprint (tests): `label` stands for its files.
    pub fn of_fake(label: &str, config: &EmbeddingConfig) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"embed-worker fake model\0");
        hash.update(label.as_bytes());
        Self::finish(hash, config, label)
    }

    fn finish(mut hash: Sha256, config: &EmbeddingConfig, file: &str) -> Self {
        hash.update(
            format!(
                "\0pooling={:?} normalize={} max_seq_length={} dimension={}",
                config.pooling, config.normalize, config.max_seq_length, config.dimension
            )
            .as_bytes(),
        );
        Self {
            id: hex(&hash.finalize(), HEX_DIGITS),
            name: format!("{} ({file}, {} dims)", config.name, config.dimension),
        }
    }
}

/// The first `digits` lowercase hex digits of `bytes` (a hash: the fingerprint, a text's digest).
pub fn hex(bytes: &[u8], digits: usize) -> String {
    bytes
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(digits)
        .map(|n| char::from_digit(u32::from(n), 16).expect("a nibble"))
        .collect()
}

fn hash_file(hash: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hash.update(&buf[..n]);
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}]", self.name, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Pooling;

    fn config() -> EmbeddingConfig {
        EmbeddingConfig {
            name: "m".into(),
            max_seq_length: 256,
            dimension: 384,
            pooling: Pooling::Mean,
            normalize: true,
        }
    }

    #[test]
    fn every_part_that_decides_the_vectors_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let (a, b, tok, tok2) = (
            write("a.onnx", b"weights"),
            write("b.onnx", b"weights2"),
            write("t.json", b"{}"),
            write("t2.json", b"{ }"),
        );
        let base = Fingerprint::of_files(&a, &tok, &config()).unwrap();
        assert_eq!(base.id.len(), HEX_DIGITS);
        assert!(base.id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(base.name, "m (a.onnx, 384 dims)");
        assert_eq!(base, Fingerprint::of_files(&a, &tok, &config()).unwrap());
        let same_bytes = write("copy.onnx", b"weights");
        assert_eq!(
            base.id,
            Fingerprint::of_files(&same_bytes, &tok, &config())
                .unwrap()
                .id,
            "the file's bytes count, not its name"
        );
        let mut others = vec![
            Fingerprint::of_files(&b, &tok, &config()).unwrap().id,
            Fingerprint::of_files(&a, &tok2, &config()).unwrap().id,
        ];
        let mut c = config();
        c.pooling = Pooling::Cls;
        others.push(Fingerprint::of_files(&a, &tok, &c).unwrap().id);
        let mut c = config();
        c.normalize = false;
        others.push(Fingerprint::of_files(&a, &tok, &c).unwrap().id);
        let mut c = config();
        c.max_seq_length = 128;
        others.push(Fingerprint::of_files(&a, &tok, &c).unwrap().id);
        for other in &others {
            assert_ne!(&base.id, other);
        }
        assert!(Fingerprint::of_files(&dir.path().join("missing"), &tok, &config()).is_err());
    }
}
