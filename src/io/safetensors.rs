//! The safetensors container, as this crate reads and writes it: headers checked before any
//! tensor is touched, and files written with a sorted header, so that the same tensors and
//! metadata always give the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The largest header this crate reads (safetensors' own limit is 100 MB too).
pub(crate) const MAX_HEADER: u64 = 100 << 20;

/// Writes named tensors and string metadata as a safetensors file, atomically, with the
/// header's keys in sorted order.
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_core::{Device, Tensor};
/// use candle_zoo::weights::{save_safetensors, Checkpoint};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("t.safetensors");
/// let t = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let meta = BTreeMap::from([("layout".to_string(), "caffenet".to_string())]);
/// save_safetensors(&path, &[("x".to_string(), t)], &meta)?;
/// assert_eq!(Checkpoint::open(&path)?.metadata()["layout"], "caffenet");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let bytes = ::safetensors::serialize(cpu, meta).map_err(|e| Error::checkpoint(path, e))?;
    let bytes = sorted_header(bytes).map_err(|e| Error::checkpoint(path, e))?;
    crate::io::write_atomic(path, &bytes)
}

/// Rewrites a safetensors header with its keys in sorted order. `safetensors` writes the
/// metadata from a `HashMap`, in a different order on every run; sorted, the same tensors and
/// metadata always give the same bytes, and so the same checksum.
fn sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    let sorted = |v: serde_json::Value| -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let map: BTreeMap<String, serde_json::Value> = map.into_iter().collect();
                serde_json::to_value(map).expect("a map of JSON values")
            }
            v => v,
        }
    };
    let header: BTreeMap<String, serde_json::Value> =
        header.into_iter().map(|(k, v)| (k, sorted(v))).collect();
    let mut out = header_prefix(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// A safetensors file's first bytes for a header: its length, then its JSON padded with spaces
/// so that the data section starts 8-byte aligned, as safetensors writes it.
pub(crate) fn header_prefix(header: &BTreeMap<String, serde_json::Value>) -> Vec<u8> {
    let mut json = serde_json::to_string(header).expect("JSON values serialise");
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// What a safetensors header tells: sorted tensor names, string metadata, and the byte length
/// of the data section.
pub(crate) struct Header {
    pub keys: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub data_len: u64,
}

/// Parses a safetensors header's JSON.
pub(crate) fn parse_header(header: &[u8]) -> std::result::Result<Header, String> {
    let json: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let obj = json.as_object().ok_or("the header is not a JSON object")?;
    let mut keys = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut data_len = 0u64;
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    if let Some(v) = v.as_str() {
                        metadata.insert(k.clone(), v.to_string());
                    }
                }
            }
            continue;
        }
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| format!("tensor `{name}` has no data_offsets"))?;
        data_len = data_len.max(end);
        keys.push(name.clone());
    }
    keys.sort();
    Ok(Header {
        keys,
        metadata,
        data_len,
    })
}
