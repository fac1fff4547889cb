//! One job over many processes: [`Shard`]s of the input list, and [`merge`], the only join.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{
    npy_header, parent, safetensors_header, sibling, work_dir, FeatureFile, FeatureFormat, Summary,
    SHARD_KEY,
};
use crate::error::{Error, Result};
use crate::io::OutputLock;

/// Shard `index` of `count` (0-based): a contiguous part of a job's input list, `K/N` on the
/// command line. The shards `0/N` .. `N-1/N` cover the list once, in order, in whole batches:
/// each shard's batches are the single run's batches (the CPU ops' arithmetic depends on a
/// batch's size, so that is what makes a merge the single run's bytes), and the shards differ
/// by at most one batch.
///
/// ```
/// use candle_zoo::data::features::Shard;
/// // 10 inputs in batches of 2: 5 batches over 3 shards.
/// let parts: Vec<_> = (0..3).map(|k| Shard::new(k, 3).unwrap().range(10, 2)).collect();
/// assert_eq!(parts, [0..2, 2..6, 6..10]);
/// assert_eq!("2/3".parse::<Shard>()?, Shard::new(2, 3)?);
/// assert!("3/3".parse::<Shard>().is_err());
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Invalid(format!(
                "shard {index}/{count}: the index counts from 0 and must be below the count"
            )));
        }
        Ok(Self { index, count })
    }

    /// The inputs of this shard, of `len` in all, processed in batches of `batch`.
    pub fn range(self, len: usize, batch: usize) -> Range<usize> {
        let batch = batch.max(1);
        let batches = len.div_ceil(batch);
        let at = |k: usize| {
            let b = (k as u128 * batches as u128 / self.count as u128) as usize;
            b.saturating_mul(batch).min(len)
        };
        at(self.index)..at(self.index + 1)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parse = || -> Option<(usize, usize)> {
            let (k, n) = s.trim().split_once('/')?;
            Some((k.trim().parse().ok()?, n.trim().parse().ok()?))
        };
        let (k, n) = parse()
            .ok_or_else(|| Error::parse("shard", s, "K/N: shard K (counting from 0) of N"))?;
        Shard::new(k, n)
    }
}

/// Joins the outputs of a sharded job into `out`: the file (and manifest) one process would
/// have written over the whole list, byte for byte.
///
/// Nothing is written unless every check passes, and a failed check names the shard at fault:
/// each file is finished (it exists, with no work folder beside it), records a shard, and
/// records the same job (model, layout, layer, pipeline, batch size, program and input list) as
/// the others;
/// the shards are `0/N` .. `N-1/N`, none missing, none twice; their rows all have the same
/// width. `out` is written as [`super::FeatureWriter::finish`] does: locked, the manifest then
/// the features file, each atomically.
///
/// ```no_run
/// let shards = ["fc7-0.safetensors", "fc7-1.safetensors"].map(std::path::PathBuf::from);
/// let summary = candle_zoo::data::features::merge(&shards, "fc7.safetensors".as_ref())?;
/// println!("{} rows", summary.rows);
/// # Ok::<(), candle_zoo::Error>(())
/// ```
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<Summary> {
    let refuse = |shard: &Path, reason: String| Error::Shard {
        path: shard.to_path_buf(),
        reason,
    };
    let mut files = Vec::with_capacity(shards.len());
    for path in shards {
        if work_dir(path).exists() {
            return Err(refuse(
                path,
                format!(
                    "unfinished: {} holds its work; resume it first",
                    work_dir(path).display()
                ),
            ));
        }
        if !path.exists() {
            return Err(refuse(path, "missing: no such file".into()));
        }
        let file = FeatureFile::open(path).map_err(|e| refuse(path, e.to_string()))?;
        let shard: Shard = file
            .metadata
            .get(SHARD_KEY)
            .ok_or_else(|| {
                refuse(
                    path,
                    "it records no shard: not the output of --shard".into(),
                )
            })?
            .parse()
            .map_err(|e: Error| refuse(path, e.to_string()))?;
        files.push((path.clone(), shard, file));
    }
    let Some((first_path, first_shard, first)) = files.first().cloned() else {
        return Err(Error::Invalid("nothing to merge: no shards".into()));
    };
    let job = |meta: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        let mut meta = meta.clone();
        meta.remove(SHARD_KEY);
        meta
    };
    let expected = job(&first.metadata);
    let n = first_shard.count;
    let mut by_index: Vec<Option<usize>> = vec![None; n];
    for (i, (path, shard, file)) in files.iter().enumerate() {
        if shard.count != n {
            return Err(refuse(
                path,
                format!(
                    "it is shard {shard}, of another split than {} ({first_shard})",
                    first_path.display()
                ),
            ));
        }
        if file.format != first.format {
            return Err(refuse(
                path,
                format!("it is {}, not {}", file.format, first.format),
            ));
        }
        let meta = job(&file.metadata);
        if meta != expected {
            let key = expected
                .keys()
                .chain(meta.keys())
                .find(|k| meta.get(*k) != expected.get(*k))
                .expect("they differ");
            return Err(refuse(
                path,
                format!(
                    "its {key} is `{}` where {} has `{}`: another job",
                    meta.get(key).map_or("nothing", String::as_str),
                    first_path.display(),
                    expected.get(key).map_or("nothing", String::as_str)
                ),
            ));
        }
        if let Some(j) = by_index[shard.index].replace(i) {
            return Err(refuse(
                path,
                format!("shard {shard} twice: {} is too", files[j].0.display()),
            ));
        }
    }
    if let Some(k) = by_index.iter().position(Option::is_none) {
        return Err(Error::Shard {
            path: PathBuf::from(format!("{k}/{n}")),
            reason: format!(
                "missing: no file among the {} given is shard {k}/{n}",
                files.len()
            ),
        });
    }
    let ordered: Vec<&(PathBuf, Shard, FeatureFile)> = by_index
        .iter()
        .map(|i| &files[i.expect("checked")])
        .collect();
    let dims: Vec<usize> = ordered
        .iter()
        .filter(|(_, _, f)| f.rows > 0)
        .map(|(_, _, f)| f.dim)
        .collect();
    let dim = dims.first().copied().unwrap_or(0);
    if let Some((path, _, f)) = ordered.iter().find(|(_, _, f)| f.rows > 0 && f.dim != dim) {
        return Err(refuse(
            path,
            format!("its rows have {} values where the others have {dim}", f.dim),
        ));
    }

    // The manifests, rows renumbered: shard k's rows follow those of the shards before it.
    let mut csv = String::from("row,path,status,reason\n");
    let mut failed = Vec::new();
    let mut offset = 0;
    for (path, _, file) in &ordered {
        let manifest = path.with_extension("csv");
        let text = std::fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
        let records = manifest_records(&text).ok_or_else(|| {
            refuse(
                path,
                format!("{}: not this crate's manifest", manifest.display()),
            )
        })?;
        let mut rows = 0;
        for (row, rest) in records {
            match row {
                Some(r) => {
                    if r != rows {
                        return Err(refuse(
                            path,
                            format!("{}: row {r} out of order", manifest.display()),
                        ));
                    }
                    csv.push_str(&format!("{},{rest}", offset + r));
                    rows += 1;
                }
                None => {
                    csv.push(',');
                    csv.push_str(&rest);
                    failed.push(failure(&rest));
                }
            }
        }
        if rows != file.rows {
            return Err(refuse(
                path,
                format!(
                    "{} lists {rows} rows but the file has {}",
                    manifest.display(),
                    file.rows
                ),
            ));
        }
        offset += rows;
    }

    let metadata = expected;
    let _lock = OutputLock::acquire(sibling(out, ".lock"))?.remove_on_release();
    let dir = parent(out);
    let manifest = out.with_extension("csv");
    crate::io::write_atomic(&manifest, csv.as_bytes())?;
    if first.format == FeatureFormat::Npy {
        let json = serde_json::to_vec_pretty(&metadata).expect("serialisable");
        crate::io::write_atomic(out.with_extension("json"), &json)?;
    }
    let header = match first.format {
        FeatureFormat::Safetensors => safetensors_header(&metadata, offset, dim),
        FeatureFormat::Npy => npy_header(offset, dim),
    };
    crate::io::write_atomic_with(out, |w| {
        w.write_all(&header)?;
        for (path, _, file) in &ordered {
            let mut f = std::fs::File::open(path)?;
            f.seek(std::io::SeekFrom::Start(file.data_start))?;
            let len = (file.rows * file.dim * 4) as u64;
            let copied = std::io::copy(&mut f.take(len), w)?;
            if copied != len {
                return Err(std::io::Error::other(format!(
                    "{}: {copied} bytes where {len} were expected",
                    path.display()
                )));
            }
        }
        Ok(())
    })?;
    crate::io::sync_dir(dir)?;
    Ok(Summary {
        features: out.to_path_buf(),
        manifest,
        rows: offset,
        dim,
        failed,
    })
}

/// A manifest's records as `(row, the rest of the record with its line break)`, `row` `None` for
/// an image that failed; `None` for text that is not a manifest. Fields are quoted as
/// [`crate::io::csv_field`] quotes them, so a record can span lines.
fn manifest_records(text: &str) -> Option<Vec<(Option<usize>, String)>> {
    let body = text.strip_prefix("row,path,status,reason\n")?;
    let mut records = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        // The record ends at the first line break outside quotes.
        let mut quoted = false;
        let end = rest.char_indices().find_map(|(i, c)| match c {
            '"' => {
                quoted = !quoted;
                None
            }
            '\n' if !quoted => Some(i + 1),
            _ => None,
        })?;
        let (record, tail) = rest.split_at(end);
        let (row, fields) = record.split_once(',')?;
        let row = if row.is_empty() {
            None
        } else {
            Some(row.parse().ok()?)
        };
        records.push((row, fields.to_string()));
        rest = tail;
    }
    Some(records)
}

/// The `(path, reason)` of a failed image's record (`path,failed,reason\n`).
fn failure(fields: &str) -> (PathBuf, String) {
    let unquote = |s: &str| -> String {
        match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(inner) => inner.replace("\"\"", "\""),
            None => s.to_string(),
        }
    };
    let fields = fields.strip_suffix('\n').unwrap_or(fields);
    // The path may be quoted (and hold commas); the status is `failed`.
    let (path, reason) = match fields.strip_prefix('"') {
        Some(_) => {
            let mut end = 1;
            let bytes = fields.as_bytes();
            while end < bytes.len() {
                if bytes[end] == b'"' {
                    if bytes.get(end + 1) == Some(&b'"') {
                        end += 2;
                        continue;
                    }
                    break;
                }
                end += 1;
            }
            let path = &fields[..=end.min(fields.len() - 1)];
            let reason = fields[path.len()..]
                .strip_prefix(",failed,")
                .unwrap_or_default();
            (path, reason)
        }
        None => fields.split_once(",failed,").unwrap_or((fields, "")),
    };
    (PathBuf::from(unquote(path)), unquote(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_list_once_in_order_in_whole_batches() {
        for len in [0usize, 1, 2, 7, 100, 1001] {
            for batch in [1, 3, 32] {
                for n in 1..=5 {
                    let batches = len.div_ceil(batch);
                    let mut next = 0;
                    for k in 0..n {
                        let r = Shard::new(k, n).unwrap().range(len, batch);
                        assert_eq!(r.start, next, "{k}/{n} of {len}");
                        assert!(r.start.is_multiple_of(batch), "{k}/{n} of {len} by {batch}");
                        let got = r.len().div_ceil(batch);
                        assert!(got + 1 >= batches / n && got <= batches / n + 1);
                        next = r.end;
                    }
                    assert_eq!(next, len);
                }
            }
        }
        for bad in ["3", "1/0", "2/2", "-1/2", "a/b"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_records_keep_quoted_line_breaks() {
        let text = "row,path,status,reason\n0,a.jpg,ok,\n,\"b\nc,d.jpg\",failed,\"x, \"\"y\"\"\"\n1,e.jpg,ok,\n";
        let records = manifest_records(text).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0], (Some(0), "a.jpg,ok,\n".to_string()));
        assert_eq!(records[2], (Some(1), "e.jpg,ok,\n".to_string()));
        assert_eq!(
            failure(&records[1].1),
            (PathBuf::from("b\nc,d.jpg"), "x, \"y\"".to_string())
        );
    }
}
