//! Layered configuration loading: built-in defaults (`serde(default)`), then an optional TOML
//! file, then environment variables with a prefix (`PREFIX__KEY__SUBKEY`).
//!
//! Every error names where the bad value came from (the file, or the environment) and the key,
//! so a component refuses to start with a message an operator can act on.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration that could not be loaded or did not validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist; pass an existing file with --config")]
    NotFound { path: PathBuf },
    #[error("bad config in {source_name}: {message}")]
    Invalid {
        /// The file (or "environment") the offending value came from.
        source_name: String,
        message: String,
    },
    #[error("bad config in {source_name}: key `{key}`: {message}")]
    Key {
        source_name: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A validation failure of one key, found after the layers were merged.
    pub fn key(file: Option<&Path>, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            source_name: source_name(file),
            key: key.into(),
            message: message.into(),
        }
    }
}

fn source_name(file: Option<&Path>) -> String {
    match file {
        Some(p) => p.display().to_string(),
        None => "defaults/environment".to_string(),
    }
}

/// Loads `T` from defaults, `file` (TOML, if given) and the environment (`{prefix}__KEY`).
///
/// Unknown keys are refused when `T` is `#[serde(deny_unknown_fields)]`; the message then
/// names the key and the file.
pub fn load<T: DeserializeOwned>(file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::NotFound {
                path: path.to_path_buf(),
            });
        }
        builder = builder
            .add_source(config::File::from(path.to_path_buf()).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    let built = builder.build().map_err(|e| ConfigError::Invalid {
        source_name: source_name(file),
        message: e.to_string(),
    })?;
    built
        .try_deserialize::<T>()
        .map_err(|e| ConfigError::Invalid {
            source_name: source_name(file),
            message: e.to_string(),
        })
}

/// Deserializes a duration written like "500ms", "5s" or "2m".
pub use humantime_serde as duration;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        port: u16,
        #[serde(with = "humantime_serde")]
        every: std::time::Duration,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                port: 1,
                every: std::time::Duration::from_secs(1),
            }
        }
    }

    #[test]
    fn bad_type_names_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "port = \"not a number\"\n").expect("write");
        let err = load::<Sample>(Some(&path), "FBL_TEST_A").expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("port"), "{msg}");
    }

    #[test]
    fn unknown_key_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("y.toml");
        std::fs::write(&path, "prot = 5\n").expect("write");
        let err = load::<Sample>(Some(&path), "FBL_TEST_B").expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("y.toml") && msg.contains("prot"), "{msg}");
    }

    #[test]
    fn defaults_then_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.toml");
        std::fs::write(&path, "every = \"250ms\"\n").expect("write");
        let s = load::<Sample>(Some(&path), "FBL_TEST_C").expect("loads");
        assert_eq!(s.port, 1);
        assert_eq!(s.every, std::time::Duration::from_millis(250));
    }
}
