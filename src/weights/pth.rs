//! PyTorch's zip checkpoints (`torch.save` since 1.6), read with bounds: what a crafted file can
//! make this reader do is fail with an error naming the file.
//!
//! candle's pickle reader executes whatever a file says: a few hundred bytes that keep doubling
//! a memoised list exhaust memory, a megabyte of nested tuples overflows the stack, a malformed
//! rebuild call panics, and a declared 2^30 x 2^30 tensor aborts on allocation. This reader runs
//! the subset of the pickle machine that `torch.save` of a state dict uses, where:
//! - memoised values are shared, never copied (`BINGET` costs one pointer);
//! - the objects a pickle builds are budgeted by its size ([`BUDGET_PER_BYTE`]), and the pickle
//!   itself is at most [`MAX_PICKLE`] bytes;
//! - nested values are freed without recursion, however deep they are;
//! - a tensor's shape, strides and offset are checked (in checked arithmetic) against the bytes
//!   of its storage entry, which must be stored uncompressed, before any tensor memory is taken:
//!   a tensor is never larger than what the file holds.
//!
//! Like PyTorch's `weights_only=True`, nothing in the file is ever run: the globals a pickle
//! names are only compared with the few that rebuild tensors.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The largest `data.pkl` read: a state dict's pickle takes a few kilobytes per hundred
/// tensors (torchvision's AlexNet: 1.3 KB).
pub(crate) const MAX_PICKLE: u64 = 1 << 20;
/// Bytes of objects a pickle may build per byte of its own: above what any one instruction
/// builds (at most ~112 bytes, a one-element tuple from one byte), so that a valid pickle always
/// fits, and what a pickle builds stays below 128 MiB whatever it says.
pub(crate) const BUDGET_PER_BYTE: usize = 128;
/// Dimensions of a tensor.
const MAX_RANK: usize = 16;

/// A tensor's entry in the file.
#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    /// Offset into the storage, in elements.
    offset: usize,
    /// The zip entry of its storage.
    entry: String,
    /// Elements in the storage, as the pickle declares them.
    storage_len: usize,
}

/// A `.pth` file's tensors, read and checked; their data is read on demand.
#[derive(Debug, Clone)]
pub(crate) struct Pth {
    path: std::path::PathBuf,
    tensors: HashMap<String, TensorInfo>,
}

impl Pth {
    /// Reads and checks the file's pickle: its tensors' names, dtypes and shapes.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::checkpoint(path, reason);
        let mut zip = archive(path)?;
        let names = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(|e| err(e.to_string()))?;
        let pickle = names
            .iter()
            .find(|n| n.ends_with("data.pkl"))
            .ok_or_else(|| err("no data.pkl in the archive: not a torch.save file".into()))?
            .clone();
        let prefix = pickle.strip_suffix("data.pkl").expect("ends with it");
        if let Some(order) = names.iter().find(|n| **n == format!("{prefix}byteorder")) {
            let mut entry = zip.by_name(order).map_err(|e| err(e.to_string()))?;
            let mut text = String::new();
            (&mut entry)
                .take(16)
                .read_to_string(&mut text)
                .map_err(|e| Error::io(path, e))?;
            if text.trim() != "little" {
                return Err(err(format!(
                    "byte order `{}`; only little-endian files are read",
                    text.trim()
                )));
            }
        }
        let bytes = {
            let entry = zip.by_name(&pickle).map_err(|e| err(e.to_string()))?;
            if entry.size() > MAX_PICKLE {
                return Err(err(format!(
                    "{pickle} is {} bytes; a state dict's pickle is far below {MAX_PICKLE}",
                    entry.size()
                )));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .take(MAX_PICKLE)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(path, e))?;
            bytes
        };
        let root = Machine::run(&bytes).map_err(|e| err(format!("{pickle}: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, value) in state_dict(&root).map_err(|e| err(format!("{pickle}: {e}")))? {
            let info = tensor_info(&value, prefix)
                .map_err(|e| err(format!("{pickle}: tensor `{name}`: {e}")))?;
            if let Some(info) = info {
                tensors.insert(name, info);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The tensors' names, sorted.
    pub(crate) fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.tensors.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Every tensor, on the CPU.
    pub(crate) fn load_all(&self) -> Result<HashMap<String, Tensor>> {
        let mut zip = archive(&self.path)?;
        self.tensors
            .iter()
            .map(|(name, info)| Ok((name.clone(), self.read(&mut zip, name, info)?)))
            .collect()
    }

    fn read<R: Read + Seek>(
        &self,
        zip: &mut zip::ZipArchive<R>,
        name: &str,
        info: &TensorInfo,
    ) -> Result<Tensor> {
        let err =
            |reason: String| Error::checkpoint(&self.path, format!("tensor `{name}`: {reason}"));
        let entry = zip
            .by_name(&info.entry)
            .map_err(|e| err(format!("{}: {e}", info.entry)))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(err(format!(
                "{} is compressed; torch.save stores tensor data uncompressed",
                info.entry
            )));
        }
        let size = info.dtype.size_in_bytes();
        let numel = info.shape.iter().product::<usize>();
        // Checked when the pickle was read: offset + numel <= storage_len, and the storage fits
        // in its entry.
        let (skip, len) = (info.offset * size, numel * size);
        if (info.storage_len * size) as u64 > entry.size() {
            return Err(err(format!(
                "its storage declares {} elements but {} holds {} bytes",
                info.storage_len,
                info.entry,
                entry.size()
            )));
        }
        let mut entry = entry;
        std::io::copy(&mut (&mut entry).take(skip as u64), &mut std::io::sink())
            .map_err(|e| Error::io(&self.path, e))?;
        let mut data = vec![0u8; len];
        entry
            .read_exact(&mut data)
            .map_err(|e| err(format!("{}: {e}", info.entry)))?;
        Tensor::from_raw_buffer(&data, info.dtype, &info.shape, &Device::Cpu)
            .map_err(|e| err(e.to_string()))
    }
}

/// Every tensor of a `.pth` file, checked, on the CPU.
pub(crate) fn tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Pth::open(path)?.load_all()
}

fn archive(path: &Path) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::checkpoint(path, format!("not a readable PyTorch zip checkpoint: {e}")))
}

// ---------------------------------------------------------------------------------------------
// The pickle machine
// ---------------------------------------------------------------------------------------------

/// A value on the pickle machine's stack or in its memo. Containers are shared (`Rc`), so a
/// memoised value is never copied.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Node(Rc<RefCell<Node>>),
    Mark,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    /// Tuple and list elements; a dict's keys and values, alternating; a reduce's callable and
    /// arguments; a build's object and state; a persistent id's id.
    items: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Tuple,
    List,
    Dict,
    Global { module: String, name: String },
    Reduce,
    PersistentId,
    Build,
}

/// Frees a node's descendants one by one from a stack of its own: dropping a deep chain of
/// nested values recursively would overflow the thread's stack.
impl Drop for Node {
    fn drop(&mut self) {
        let mut pending = std::mem::take(&mut self.items);
        while let Some(v) = pending.pop() {
            if let Value::Node(rc) = v {
                // The last owner takes the children; any other just drops a reference.
                if let Ok(node) = Rc::try_unwrap(rc) {
                    pending.append(&mut node.into_inner().items);
                }
            }
        }
    }
}

impl Value {
    fn node(kind: Kind, items: Vec<Value>) -> Value {
        Value::Node(Rc::new(RefCell::new(Node { kind, items })))
    }

    fn kind(&self) -> Option<Kind> {
        match self {
            Value::Node(n) => Some(n.borrow().kind.clone()),
            _ => None,
        }
    }

    fn items(&self) -> Vec<Value> {
        match self {
            Value::Node(n) => n.borrow().items.clone(),
            _ => Vec::new(),
        }
    }

    fn is_global(&self, module: &str, name: &str) -> bool {
        self.kind()
            == Some(Kind::Global {
                module: module.into(),
                name: name.into(),
            })
    }

    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::Mark => "a mark".into(),
            Value::Node(n) => match &n.borrow().kind {
                Kind::Global { module, name } => format!("{module}.{name}"),
                kind => format!("a {kind:?}"),
            },
        }
    }
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Bytes of objects still allowed.
    budget: usize,
}

impl<'a> Machine<'a> {
    /// Runs a pickle to its `STOP` and returns the value it leaves.
    fn run(bytes: &'a [u8]) -> std::result::Result<Value, String> {
        let budget = bytes
            .len()
            .saturating_mul(BUDGET_PER_BYTE)
            .saturating_add(1 << 16);
        Self::run_within(bytes, budget)
    }

    /// [`Machine::run`] building at most `budget` bytes of objects.
    fn run_within(bytes: &'a [u8], budget: usize) -> std::result::Result<Value, String> {
        let mut m = Machine {
            bytes,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
            budget,
        };
        loop {
            let at = m.pos;
            let op = m.u8()?;
            if m.step(op)
                .map_err(|e| format!("at byte {at} (opcode 0x{op:02x}): {e}"))?
            {
                break;
            }
        }
        let top = m.pop()?;
        Ok(top)
    }

    /// Spends `bytes` of the budget.
    fn spend(&mut self, bytes: usize) -> std::result::Result<(), String> {
        self.budget = self.budget.checked_sub(bytes).ok_or_else(|| {
            "the pickle builds far more objects than its size allows (a crafted file?)".to_string()
        })?;
        Ok(())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("the pickle ends in the middle of an instruction")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL name without its end of line")?;
        let s = std::str::from_utf8(self.take(n + 1)?.strip_suffix(b"\n").expect("newline"))
            .map_err(|_| "a GLOBAL name that is not text")?;
        Ok(s.to_string())
    }

    fn push(&mut self, v: Value) -> std::result::Result<(), String> {
        self.spend(std::mem::size_of::<Value>())?;
        self.stack.push(v);
        Ok(())
    }

    fn push_node(&mut self, kind: Kind, items: Vec<Value>) -> std::result::Result<(), String> {
        self.spend(64 + items.len() * std::mem::size_of::<Value>())?;
        self.push(Value::node(kind, items))
    }

    fn pop(&mut self) -> std::result::Result<Value, String> {
        match self.stack.pop() {
            Some(Value::Mark) => Err("a mark where a value was expected".into()),
            Some(v) => Ok(v),
            None => Err("the stack is empty".into()),
        }
    }

    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no mark on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&self) -> std::result::Result<&Value, String> {
        match self.stack.last() {
            Some(Value::Mark) | None => Err("no value on the stack".into()),
            Some(v) => Ok(v),
        }
    }

    /// Adds `items` to the container at the top of the stack, if it is of `kind`.
    fn extend_top(&mut self, kind: Kind, items: Vec<Value>) -> std::result::Result<(), String> {
        self.spend(items.len() * std::mem::size_of::<Value>())?;
        match self.top()? {
            Value::Node(n) if n.borrow().kind == kind => {
                n.borrow_mut().items.extend(items);
                Ok(())
            }
            other => Err(format!("cannot add items to {}", other.describe())),
        }
    }

    /// One instruction; `true` at `STOP`.
    fn step(&mut self, op: u8) -> std::result::Result<bool, String> {
        match op {
            0x80 => {
                // PROTO
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v}"));
                }
            }
            b'.' => return Ok(true), // STOP
            b'(' => self.push(Value::Mark)?,
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))?
            }
            b'M' => {
                let b = self.take(2)?;
                self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?
            }
            b'J' => {
                let b = self.take(4)?;
                self.push(Value::Int(
                    i32::from_le_bytes(b.try_into().expect("4")) as i64
                ))?
            }
            0x8a => {
                // LONG1: a little-endian two's-complement integer of n bytes.
                let n = self.u8()? as usize;
                if n > 8 {
                    return Err(format!("a {n}-byte integer"));
                }
                let b = self.take(n)?;
                let mut v = 0i64;
                for (i, &byte) in b.iter().enumerate() {
                    v |= (byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                self.push(Value::Int(v))?
            }
            b'G' => {
                let b = self.take(8)?;
                self.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8"))))?
            }
            b'X' => {
                // BINUNICODE
                let n = self.u32()? as usize;
                let s =
                    std::str::from_utf8(self.take(n)?).map_err(|_| "a string that is not UTF-8")?;
                self.spend(n)?;
                self.push(Value::Str(s.into()))?
            }
            0x8c => {
                // SHORT_BINUNICODE
                let n = self.u8()? as usize;
                let s =
                    std::str::from_utf8(self.take(n)?).map_err(|_| "a string that is not UTF-8")?;
                self.spend(n)?;
                self.push(Value::Str(s.into()))?
            }
            b'c' => {
                // GLOBAL: only named, never looked up.
                let module = self.line()?;
                let name = self.line()?;
                self.push_node(Kind::Global { module, name }, Vec::new())?
            }
            b')' => self.push_node(Kind::Tuple, Vec::new())?,
            b']' => self.push_node(Kind::List, Vec::new())?,
            b'}' => self.push_node(Kind::Dict, Vec::new())?,
            b't' => {
                let items = self.pop_mark()?;
                self.push_node(Kind::Tuple, items)?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push_node(Kind::Tuple, items)?
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_top(Kind::List, vec![v])?
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_top(Kind::List, items)?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.extend_top(Kind::Dict, vec![k, v])?
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with a key but no value".into());
                }
                self.extend_top(Kind::Dict, items)?
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                // An OrderedDict is rebuilt as `OrderedDict()`, then filled by SETITEMS.
                if callable.is_global("collections", "OrderedDict") {
                    if args.kind() != Some(Kind::Tuple) || !args.items().is_empty() {
                        return Err("OrderedDict called with arguments".into());
                    }
                    self.push_node(Kind::Dict, Vec::new())?
                } else {
                    self.push_node(Kind::Reduce, vec![callable, args])?
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push_node(Kind::PersistentId, vec![pid])?
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.pop()?;
                self.push_node(Kind::Build, vec![obj, state])?
            }
            b'q' => {
                let i = self.u8()? as u32;
                self.memoize(i)?
            }
            b'r' => {
                let i = self.u32()?;
                self.memoize(i)?
            }
            0x94 => {
                // MEMOIZE
                let i = self.memo.len() as u32;
                self.memoize(i)?
            }
            b'h' => {
                let i = self.u8()? as u32;
                self.recall(i)?
            }
            b'j' => {
                let i = self.u32()?;
                self.recall(i)?
            }
            0x95 => {
                // FRAME: a length prefix with no meaning here.
                self.take(8)?;
            }
            other => return Err(format!("opcode 0x{other:02x} is not one torch.save writes")),
        }
        Ok(false)
    }

    fn memoize(&mut self, i: u32) -> std::result::Result<(), String> {
        let v = self.top()?.clone();
        self.spend(std::mem::size_of::<Value>() + 8)?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn recall(&mut self, i: u32) -> std::result::Result<(), String> {
        let v = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} was never stored"))?;
        self.push(v)
    }
}

// ---------------------------------------------------------------------------------------------
// What the values mean
// ---------------------------------------------------------------------------------------------

/// The `(name, value)` pairs of the pickled state dict (a dict, possibly with a `BUILD` of its
/// `_metadata` attribute).
fn state_dict(root: &Value) -> std::result::Result<Vec<(String, Value)>, String> {
    let dict = match root.kind() {
        Some(Kind::Build) => root.items()[0].clone(),
        _ => root.clone(),
    };
    if dict.kind() != Some(Kind::Dict) {
        return Err(format!(
            "the file holds {}, not a state dict (a mapping of names to tensors)",
            dict.describe()
        ));
    }
    let items = dict.items();
    items
        .chunks_exact(2)
        .map(|kv| match &kv[0] {
            Value::Str(s) => Ok((s.to_string(), kv[1].clone())),
            other => Err(format!("a state dict key that is {}", other.describe())),
        })
        .collect()
}

fn int(v: &Value, what: &str) -> std::result::Result<usize, String> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("{what} is {}", other.describe())),
    }
}

fn ints(v: &Value, what: &str) -> std::result::Result<Vec<usize>, String> {
    if v.kind() != Some(Kind::Tuple) {
        return Err(format!("{what} is {}", v.describe()));
    }
    v.items().iter().map(|x| int(x, what)).collect()
}

/// A state dict entry's tensor, or `None` for an entry that is no tensor (skipped, as PyTorch's
/// `load_state_dict` would not use it either).
fn tensor_info(v: &Value, prefix: &str) -> std::result::Result<Option<TensorInfo>, String> {
    let mut v = v.clone();
    // `_rebuild_parameter(tensor, requires_grad, hooks)` and `_rebuild_from_type_v2(func, type,
    // args, state)` wrap `_rebuild_tensor_v2(...)`; a `BUILD` adds state to it.
    for _ in 0..4 {
        match v.kind() {
            Some(Kind::Build) => v = v.items()[0].clone(),
            Some(Kind::Reduce) => {
                let [callable, args] = <[Value; 2]>::try_from(v.items()).expect("two items");
                let a = args.items();
                if callable.is_global("torch._utils", "_rebuild_parameter") && !a.is_empty() {
                    v = a[0].clone();
                } else if callable.is_global("torch._tensor", "_rebuild_from_type_v2")
                    && a.len() >= 3
                {
                    let inner = a[2].items();
                    if a[0].kind().is_none() || inner.is_empty() {
                        return Err("a malformed _rebuild_from_type_v2".into());
                    }
                    v = Value::node(Kind::Reduce, vec![a[0].clone(), a[2].clone()]);
                } else if callable.is_global("torch._utils", "_rebuild_tensor_v2") {
                    return rebuild_tensor_v2(&a, prefix).map(Some);
                } else {
                    return Ok(None);
                }
            }
            _ => return Ok(None),
        }
    }
    Err("nested too deeply".into())
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`, checked.
fn rebuild_tensor_v2(args: &[Value], prefix: &str) -> std::result::Result<TensorInfo, String> {
    if args.len() < 4 {
        return Err(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
    }
    if args[0].kind() != Some(Kind::PersistentId) {
        return Err(format!("its storage is {}", args[0].describe()));
    }
    let pid = args[0].items()[0].items();
    // ('storage', torch.FloatStorage, key, location, numel)
    let (class, key, storage_len) = match pid.as_slice() {
        [Value::Str(tag), class, Value::Str(key), _, numel] if &**tag == "storage" => (
            class.clone(),
            key.clone(),
            int(numel, "the storage's size")?,
        ),
        _ => return Err("a malformed storage id".into()),
    };
    let dtype = match class.kind() {
        Some(Kind::Global { module, name }) if module == "torch" => match name.as_str() {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "ByteStorage" => DType::U8,
            "LongStorage" => DType::I64,
            other => return Err(format!("storage type {other} is not supported")),
        },
        _ => return Err(format!("storage type {}", class.describe())),
    };
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("storage key {key:?}"));
    }
    let offset = int(&args[1], "the storage offset")?;
    let shape = ints(&args[2], "the size")?;
    let stride = ints(&args[3], "the stride")?;
    if shape.len() > MAX_RANK || stride.len() != shape.len() {
        return Err(format!("size {shape:?} with stride {stride:?}"));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("size {shape:?} has more elements than fit in memory"))?;
    // Row-major, as state dicts are saved; the strides of dimensions of size 1 do not matter.
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(&stride).rev() {
        if d > 1 && s != expected {
            return Err(format!(
                "size {shape:?} with stride {stride:?} is not contiguous (save it with \
                 .contiguous())"
            ));
        }
        expected = expected.saturating_mul(d);
    }
    offset
        .checked_add(numel)
        .filter(|&e| e <= storage_len)
        .ok_or_else(|| {
            format!("offset {offset} and size {shape:?} reach past its storage of {storage_len} elements")
        })?;
    storage_len
        .checked_mul(dtype.size_in_bytes())
        .ok_or("its storage's size overflows")?;
    Ok(TensorInfo {
        dtype,
        shape,
        offset,
        entry: format!("{prefix}data/{key}"),
        storage_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> std::result::Result<Value, String> {
        Machine::run(bytes)
    }

    #[test]
    fn doubling_a_memoised_list_costs_references_not_copies() {
        // ] q0 ( h0 h0 e q0 ... : each round appends the list to a list of two references of
        // the previous one; 60 rounds of copies would be 2^60 elements.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..60 {
            p.extend_from_slice(&[b']', b'(', b'h', 0, b'h', 0, b'e', b'q', 0]);
        }
        p.push(b'.');
        assert!(run(&p).is_ok());
    }

    #[test]
    fn deeply_nested_tuples_are_built_and_freed_without_recursion() {
        // 256 Ki levels: a recursive drop would need tens of megabytes of stack.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85u8, 1 << 18));
        p.push(b'.');
        // Built within its budget, and freed without recursion.
        let v = run(&p).unwrap();
        drop(v);
    }

    #[test]
    fn objects_beyond_the_budget_are_an_error() {
        // Each `)` builds a node of about 90 bytes.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b')', 1000));
        p.push(b'.');
        let err = Machine::run_within(&p, 10_000).unwrap_err();
        assert!(err.contains("more objects than its size allows"), "{err}");
        assert!(run(&p).is_ok(), "within the budget of its size");
    }

    #[test]
    fn malformed_programs_are_errors() {
        for (p, want) in [
            (&b"\x80\x02R."[..], "empty"),
            (b"\x80\x02(\x85.", "a mark where a value"),
            (b"\x80\x02h\x07.", "never stored"),
            (b"\x80\x02X\xff\xff\xff\x7fab.", "ends in the middle"),
            (b"\x80\x02}Ns.", "no value on the stack"),
            (b"\x80\x02K\x05K\x06a.", "cannot add items to 5"),
            (b"\x80\x02\x93.", "not one torch.save writes"),
            (b"\x80\x02N", "ends in the middle"),
        ] {
            let err = run(p).unwrap_err();
            assert!(err.contains(want), "{p:?}: {err}");
        }
    }

    #[test]
    fn a_huge_declared_tensor_is_refused_before_any_allocation() {
        let storage = Value::node(
            Kind::PersistentId,
            vec![Value::node(
                Kind::Tuple,
                vec![
                    Value::Str("storage".into()),
                    Value::node(
                        Kind::Global {
                            module: "torch".into(),
                            name: "FloatStorage".into(),
                        },
                        vec![],
                    ),
                    Value::Str("0".into()),
                    Value::Str("cpu".into()),
                    Value::Int(4),
                ],
            )],
        );
        let tuple =
            |v: &[i64]| Value::node(Kind::Tuple, v.iter().map(|&i| Value::Int(i)).collect());
        let args = [
            storage,
            Value::Int(0),
            tuple(&[1 << 30, 1 << 30]),
            tuple(&[1 << 30, 1]),
        ];
        let err = rebuild_tensor_v2(&args, "a/").unwrap_err();
        assert!(err.contains("past its storage of 4 elements"), "{err}");
    }
}
