//! Secrets in the configuration: where they come from and how they are read.
//!
//! A secret is written in one of three ways:
//!
//! ```toml
//! secret = "inline value"                  # in the config file itself
//! secret = { file = "intake-secret" }      # a file, relative to the config file's directory
//! secret = { credential = "intake-secret" } # a systemd credential ($CREDENTIALS_DIRECTORY)
//! ```
//!
//! This module owns reading them. It must never log, print or `Debug`-format
//! a secret's value: the value lives in a [`SecretString`] (zeroed on drop,
//! redacted in `Debug`) and leaves it only through [`Secret::expose`].

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// Secrets larger than this are refused: a file that big was named by mistake.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where a secret's value comes from, as written in the config.
pub enum SecretSource {
    Inline(SecretString),
    File(PathBuf),
    Credential(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline([redacted])"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Credential(name) => f.debug_tuple("Credential").field(name).finish(),
        }
    }
}

impl Clone for SecretSource {
    fn clone(&self) -> Self {
        match self {
            Self::Inline(value) => Self::Inline(value.expose_secret().into()),
            Self::File(path) => Self::File(path.clone()),
            Self::Credential(name) => Self::Credential(name.clone()),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SourceVisitor;

        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret: a string, { file = \"PATH\" } or { credential = \"NAME\" }")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(value.into()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "empty table: write { file = \"PATH\" } or { credential = \"NAME\" }",
                    ));
                };
                let source = match key.as_str() {
                    "file" => SecretSource::File(map.next_value()?),
                    "credential" => SecretSource::Credential(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, &["file", "credential"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "`{extra}` given too: a secret has exactly one of `file` or `credential`"
                    )));
                }
                Ok(source)
            }
        }

        deserializer.deserialize_any(SourceVisitor)
    }
}

/// A secret from the configuration: its source, and its value once resolved.
///
/// [`crate::config::load`] resolves every secret before it returns a config,
/// so code outside this module only ever sees resolved secrets.
#[derive(Clone)]
pub struct Secret {
    source: Spanned<SecretSource>,
    value: Option<SecretString>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("source", self.source.get_ref())
            .finish_non_exhaustive()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self {
            source: Spanned::deserialize(deserializer)?,
            value: None,
        })
    }
}

/// What resolving secrets needs to know about the world.
#[derive(Debug, Clone, Default)]
pub struct SecretEnvironment {
    /// Directory that relative `file` paths are relative to: the config file's.
    pub config_directory: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, set by systemd for units with `LoadCredential=`.
    pub credentials_directory: Option<PathBuf>,
}

impl SecretEnvironment {
    /// The environment of this process, for a config file in `config_directory`.
    pub fn from_process(config_directory: &Path) -> Self {
        Self {
            config_directory: config_directory.to_path_buf(),
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
}

/// The outcome of resolving one secret that did not fail.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// The secret is written inline in the config file.
    pub inline: bool,
    /// A reason to warn, e.g. the secret file is readable by every user.
    pub warning: Option<String>,
}

impl Secret {
    /// The secret's value.
    ///
    /// # Panics
    /// If the secret was not resolved, which [`crate::config::load`] rules
    /// out: it fails rather than return a config with unresolved secrets.
    pub fn expose(&self) -> &str {
        self.value
            .as_ref()
            .expect("config::load resolves every secret before returning")
            .expose_secret()
    }

    /// Where the secret was written in the config file.
    pub(crate) fn span(&self) -> std::ops::Range<usize> {
        self.source.span()
    }

    /// Reads the secret's value. On failure, says why in one sentence.
    pub(crate) fn resolve(&mut self, env: &SecretEnvironment) -> Result<Resolved, String> {
        let (value, inline, warning) = match self.source.get_ref() {
            SecretSource::Inline(value) => (SecretString::from(value.expose_secret()), true, None),
            SecretSource::File(path) => {
                let path = env.config_directory.join(path);
                let (value, warning) = read_secret_file(&path)?;
                (value, false, warning)
            }
            SecretSource::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(format!("`{name}` is not a credential name"));
                }
                let Some(directory) = &env.credentials_directory else {
                    return Err(format!(
                        "credential `{name}` needs $CREDENTIALS_DIRECTORY, which systemd sets \
                         for a unit with LoadCredential= or SetCredential=; it is not set"
                    ));
                };
                // systemd makes the credentials directory private to the
                // service, so its files' own modes are not a concern.
                let (value, _) = read_secret_file(&directory.join(name))?;
                (value, false, None)
            }
        };
        if value.expose_secret().is_empty() {
            return Err("the secret is empty".to_owned());
        }
        self.value = Some(value);
        Ok(Resolved { inline, warning })
    }
}

/// Reads a secret file: the whole file less one trailing line break, as
/// `echo secret > file` leaves one. No copy of the value is left unzeroed.
fn read_secret_file(path: &Path) -> Result<(SecretString, Option<String>), String> {
    let describe = |e: std::io::Error| format!("cannot read secret file {}: {e}", path.display());
    let file = fs::File::open(path).map_err(describe)?;
    let metadata = file.metadata().map_err(describe)?;
    if !metadata.is_file() {
        return Err(format!(
            "secret file {} is not a regular file",
            path.display()
        ));
    }
    if metadata.len() > MAX_SECRET_BYTES {
        return Err(format!(
            "secret file {} is {} bytes, more than the {MAX_SECRET_BYTES} a secret may have",
            path.display(),
            metadata.len()
        ));
    }
    // Sized up front so that reading never reallocates (and frees) a copy.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_SECRET_BYTES as usize + 1));
    file.take(MAX_SECRET_BYTES)
        .read_to_end(&mut bytes)
        .map_err(describe)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("secret file {} is not valid UTF-8", path.display()))?;
    let value = text
        .strip_suffix('\n')
        .map_or(text, |line| line.strip_suffix('\r').unwrap_or(line));
    let warning = readable_by_others(&metadata).then(|| {
        format!(
            "secret file {} is readable by every user; restrict it with `chmod o-rwx {}`",
            path.display(),
            path.display()
        )
    });
    Ok((SecretString::from(value), warning))
}

/// Whether users other than the owner and group may read a file.
pub(crate) fn readable_by_others(metadata: &fs::Metadata) -> bool {
    metadata.permissions().mode() & 0o004 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Secret, String> {
        #[derive(Deserialize)]
        struct Holder {
            secret: Secret,
        }
        toml::from_str::<Holder>(text)
            .map(|h| h.secret)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn the_three_forms_parse() {
        assert!(matches!(
            parse("secret = \"abc\"").unwrap().source.get_ref(),
            SecretSource::Inline(_)
        ));
        assert!(matches!(
            parse("secret = { file = \"s\" }").unwrap().source.get_ref(),
            SecretSource::File(p) if p == Path::new("s")
        ));
        assert!(matches!(
            parse("secret = { credential = \"c\" }").unwrap().source.get_ref(),
            SecretSource::Credential(n) if n == "c"
        ));
    }

    #[test]
    fn malformed_forms_are_refused_with_a_reason() {
        assert!(parse("secret = { path = \"x\" }")
            .unwrap_err()
            .contains("unknown field `path`"));
        assert!(parse("secret = { file = \"x\", credential = \"y\" }")
            .unwrap_err()
            .contains("exactly one"));
        assert!(parse("secret = {}").unwrap_err().contains("empty table"));
        assert!(parse("secret = 5").unwrap_err().contains("a secret"));
    }

    #[test]
    fn debug_never_shows_an_inline_value() {
        let secret = parse("secret = \"hunter2-hunter2\"").unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn credential_without_credentials_directory_says_what_is_missing() {
        let mut secret = parse("secret = { credential = \"token\" }").unwrap();
        let err = secret.resolve(&SecretEnvironment::default()).unwrap_err();
        assert!(err.contains("$CREDENTIALS_DIRECTORY"), "{err}");
    }

    #[test]
    fn credential_names_cannot_escape_the_directory() {
        let mut secret = parse("secret = { credential = \"../etc/shadow\" }").unwrap();
        let env = SecretEnvironment {
            credentials_directory: Some("/nonexistent".into()),
            ..Default::default()
        };
        let err = secret.resolve(&env).unwrap_err();
        assert!(err.contains("not a credential name"), "{err}");
    }
}
