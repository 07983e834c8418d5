//! Inline images in a request body, measured for budget reservations.

/// Inline images in a request body: strings that are base64 `data:image/…` URLs (vision chat
/// requests). Providers bill an image by its pixels after resizing, not by its bytes (at most
/// a few thousand tokens however large the base64), so a budget reservation counts these apart
/// from text. Only a well-formed image data URL counts: text dressed as `data:` does not, nor
/// other media (a base64 PDF can be billed as many tokens as its text).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineData {
    /// Base64 image data URLs in the body.
    pub count: u64,
    /// Their total length in bytes.
    pub bytes: u64,
}

/// `data:image/<subtype>;base64,<base64>`, strictly.
pub(super) fn is_inline_image(s: &str) -> bool {
    let Some((subtype, payload)) = s
        .strip_prefix("data:image/")
        .and_then(|r| r.split_once(";base64,"))
    else {
        return false;
    };
    !subtype.is_empty()
        && subtype.len() <= 64
        && subtype
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b))
        && payload
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

#[cfg(test)]
impl InlineData {
    /// What `pruned` measures, from a whole parsed document (the tests' reference).
    pub(super) fn of(v: &serde_json::Value, out: &mut Self) {
        match v {
            serde_json::Value::String(s) if is_inline_image(s) => {
                out.count += 1;
                out.bytes += s.len() as u64;
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| Self::of(v, out)),
            serde_json::Value::Object(m) => m.values().for_each(|v| Self::of(v, out)),
            _ => {}
        }
    }
}
