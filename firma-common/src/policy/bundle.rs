use super::error::PolicyError;
use crate::proto::authority as pb;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The Cedar schema shipped with Firma (`policies/firma.cedarschema`), used when a policy
/// directory carries none of its own.
pub const SHIPPED_SCHEMA: &str = include_str!("../../../policies/firma.cedarschema");

/// One policy file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// File name without directory (e.g. `genai-app.cedar`); also the source of policy ids.
    pub name: String,
    pub content: String,
}

/// The text of a policy directory, as loaded, hashed and streamed. Not yet parsed: see
/// [`PolicyBundle::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyBundle {
    /// Policy files in name order.
    pub files: Vec<PolicyFile>,
    /// Cedar schema, human syntax.
    pub schema: String,
    /// Hex SHA-256 over schema and files; see [`PolicyBundle::compute_version`].
    pub version: String,
}

impl PolicyBundle {
    /// Builds a bundle from parts, sorting files by name and computing the version.
    pub fn new(mut files: Vec<PolicyFile>, schema: String) -> Self {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let version = Self::compute_version(&schema, &files);
        Self {
            files,
            schema,
            version,
        }
    }

    /// Reads every `*.cedar` file directly in `dir` (name order; hidden files skipped) and the
    /// schema: the one `*.cedarschema` file in `dir` if present, else [`SHIPPED_SCHEMA`].
    /// Only reads; call [`PolicyBundle::compile`] to check the content.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        if !dir.is_dir() {
            return Err(PolicyError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PolicyError::Io {
                path,
                cause: source,
            }
        };
        let mut files = Vec::new();
        let mut schema: Option<(String, String)> = None;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                return Err(PolicyError::FileName { path });
            };
            if name.starts_with('.') || !path.is_file() {
                continue;
            }
            match path.extension().and_then(|e| e.to_str()) {
                Some("cedar") => {
                    let content = std::fs::read_to_string(&path).map_err(io(&path))?;
                    files.push(PolicyFile { name, content });
                }
                Some("cedarschema") => {
                    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                    if let Some((first, _)) = &schema {
                        let (first, second) = if *first < name {
                            (first.clone(), name)
                        } else {
                            (name, first.clone())
                        };
                        return Err(PolicyError::MultipleSchemas {
                            dir: dir.to_path_buf(),
                            first,
                            second,
                        });
                    }
                    schema = Some((name, text));
                }
                _ => {}
            }
        }
        let schema = schema.map_or_else(|| SHIPPED_SCHEMA.to_string(), |(_, text)| text);
        Ok(Self::new(files, schema))
    }

    /// `hex(SHA-256("firma-bundle-v1" || frame(schema) || for each file in name order:
    /// frame(name) || frame(content)))`, where `frame(x)` is the 8-byte big-endian length of `x`
    /// followed by its UTF-8 bytes. Length framing keeps (name, content) boundaries unambiguous.
    pub fn compute_version(schema: &str, files: &[PolicyFile]) -> String {
        let mut h = Sha256::new();
        h.update(b"firma-bundle-v1");
        let mut frame = |s: &str| {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        };
        frame(schema);
        for f in files {
            frame(&f.name);
            frame(&f.content);
        }
        hex::encode(h.finalize())
    }

    /// Number of policy files (what the startup log reports).
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The gRPC message for this bundle, stamped with `sent_at` (Unix seconds).
    pub fn to_proto(&self, sent_at: i64) -> pb::PolicyBundle {
        pb::PolicyBundle {
            version: self.version.clone(),
            policies: self
                .files
                .iter()
                .map(|f| pb::PolicyFile {
                    name: f.name.clone(),
                    content: f.content.clone(),
                })
                .collect(),
            schema: self.schema.clone(),
            sent_at,
        }
    }

    /// Rebuilds a bundle from the wire, refusing one whose `version` does not match its
    /// content (a truncated or tampered copy must never be installed).
    pub fn from_proto(msg: pb::PolicyBundle) -> Result<Self, PolicyError> {
        let files = msg
            .policies
            .into_iter()
            .map(|f| PolicyFile {
                name: f.name,
                content: f.content,
            })
            .collect();
        let bundle = Self::new(files, msg.schema);
        if bundle.version != msg.version {
            return Err(PolicyError::VersionMismatch {
                claimed: msg.version,
                computed: bundle.version,
            });
        }
        Ok(bundle)
    }
}
