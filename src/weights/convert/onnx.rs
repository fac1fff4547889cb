//! Reads an ONNX AlexNet (`ModelProto`): the ONNX model zoo's `bvlcalexnet-*.onnx` or a
//! `torch.onnx.export` of a two-tower AlexNet.
//!
//! Only the messages and fields needed are declared, with onnx.proto's field numbers. Weights are
//! the initializers (or `Constant` nodes) feeding `Conv` and `Gemm` (or `MatMul` + `Add`) nodes,
//! taken in the graph's order, which ONNX requires to be topological.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use super::{Op, Param, SourceNet};
use crate::error::{Error, Result};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(string, optional, tag = "2")]
    producer_name: Option<String>,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, optional, tag = "2")]
    name: Option<String>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    op_type: Option<String>,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(float, optional, tag = "2")]
    f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    i: Option<i64>,
    #[prost(message, optional, tag = "5")]
    t: Option<TensorProto>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    /// `TensorProto.DataType`: 1 = FLOAT, 11 = DOUBLE.
    #[prost(int32, optional, tag = "2")]
    data_type: Option<i32>,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, optional, tag = "8")]
    name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    raw_data: Option<Vec<u8>>,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
    /// 1 = EXTERNAL: the data lives in another file.
    #[prost(int32, optional, tag = "14")]
    data_location: Option<i32>,
}

const FLOAT: i32 = 1;
const DOUBLE: i32 = 11;

impl NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }
    fn int(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    fn float(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    fn ints(&self, name: &str) -> Vec<i64> {
        self.attr(name).map(|a| a.ints.clone()).unwrap_or_default()
    }
    fn label(&self) -> String {
        match self.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!(
                "{} -> {}",
                self.op_type.as_deref().unwrap_or("?"),
                self.output.first().map_or("?", |s| s.as_str())
            ),
        }
    }
}

fn tensor_param(t: &TensorProto) -> std::result::Result<Param, String> {
    if t.data_location == Some(1) {
        return Err(
            "its data is stored in an external file; re-save the model with \
                    `onnx.save(model, path, save_as_external_data=False)`"
                .into(),
        );
    }
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<std::result::Result<_, _>>()?;
    let dtype = t.data_type.unwrap_or(0);
    let data: Vec<f32> = match (dtype, &t.raw_data) {
        (FLOAT, Some(raw)) => {
            if raw.len() % 4 != 0 {
                return Err(format!("{} bytes of raw data is not whole f32s", raw.len()));
            }
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        (FLOAT, None) => t.float_data.clone(),
        (DOUBLE, Some(raw)) if raw.len() % 8 == 0 => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        (DOUBLE, None) => t.double_data.iter().map(|&v| v as f32).collect(),
        (other, _) => {
            return Err(format!(
                "data type {other} is not supported (expected FLOAT = 1 or DOUBLE = 11)"
            ))
        }
    };
    let numel = super::checked_numel(&shape)?;
    if numel != data.len() {
        return Err(format!(
            "dims {shape:?} hold {numel} values but the tensor has {}",
            data.len()
        ));
    }
    Ok(Param { shape, data })
}

/// Parses an `.onnx` model into the converter's list of operations.
pub(crate) fn read_onnx(path: &Path, bytes: &[u8]) -> Result<SourceNet> {
    let model = ModelProto::decode(bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a readable ONNX model (ModelProto protobuf): {e}"),
        )
    })?;
    let graph = model
        .graph
        .ok_or_else(|| Error::checkpoint(path, "the ONNX model has no graph"))?;
    // Constant tensors by name: initializers and the outputs of `Constant` nodes.
    let mut constants: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.as_deref()?, t)))
        .collect();
    for node in &graph.node {
        if node.op_type.as_deref() == Some("Constant") {
            if let (Some(out), Some(t)) = (
                node.output.first(),
                node.attr("value").and_then(|a| a.t.as_ref()),
            ) {
                constants.insert(out.as_str(), t);
            }
        }
    }
    let weight = |node: &NodeProto, index: usize, what: &str| -> Result<Param> {
        let label = node.label();
        let name = node
            .input
            .get(index)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!(
                        "node `{label}` ({}) has no {what} input",
                        node.op_type.as_deref().unwrap_or("?")
                    ),
                )
            })?;
        let t = constants.get(name.as_str()).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("node `{label}`: its {what} `{name}` is not an initializer or constant"),
            )
        })?;
        tensor_param(t).map_err(|reason| {
            Error::checkpoint(path, format!("node `{label}`, {what} `{name}`: {reason}"))
        })
    };

    let mut ops = Vec::new();
    // A `MatMul` by a constant waits for the `Add` of its bias: (output name, op index).
    let mut pending_matmul: Option<(String, usize)> = None;
    for node in &graph.node {
        let label = node.label();
        let op_type = node.op_type.as_deref().unwrap_or("");
        let op = match op_type {
            "Conv" => Op::Conv {
                weight: weight(node, 1, "weight")?,
                bias: weight(node, 2, "bias")?,
                groups: Some(node.int("group").unwrap_or(1) as usize),
                stride: node
                    .ints("strides")
                    .first()
                    .map(|&s| s as usize)
                    .or(Some(1)),
                pad: node.ints("pads").first().map(|&s| s as usize).or(Some(0)),
                name: label,
            },
            "Gemm" => {
                for attr in ["alpha", "beta"] {
                    if let Some(v) = node.float(attr).filter(|&v| v != 1.0) {
                        return Err(Error::checkpoint(
                            path,
                            format!("node `{label}` (Gemm) has {attr} = {v}; only 1 is supported"),
                        ));
                    }
                }
                if node.int("transA").unwrap_or(0) != 0 {
                    return Err(Error::checkpoint(
                        path,
                        format!("node `{label}` (Gemm) transposes its input (transA = 1)"),
                    ));
                }
                Op::Fc {
                    weight: weight(node, 1, "weight")?,
                    bias: weight(node, 2, "bias")?,
                    // Gemm's B is (in, out) unless transB = 1, as torch and Caffe store it.
                    transposed: node.int("transB").unwrap_or(0) == 0,
                    name: label,
                }
            }
            "MatMul"
                if node
                    .input
                    .get(1)
                    .is_some_and(|i| constants.contains_key(i.as_str())) =>
            {
                let w = weight(node, 1, "weight")?;
                pending_matmul =
                    Some((node.output.first().cloned().unwrap_or_default(), ops.len()));
                ops.push(Op::Fc {
                    weight: w,
                    bias: Param::default(),
                    transposed: true,
                    name: label,
                });
                continue;
            }
            "Add"
                if pending_matmul
                    .as_ref()
                    .is_some_and(|(out, _)| node.input.iter().any(|i| i == out)) =>
            {
                let (out, at) = pending_matmul.take().expect("checked above");
                let bias_input = node.input.iter().position(|i| *i != out).unwrap_or(1);
                let b = weight(node, bias_input, "bias")?;
                if let Op::Fc { bias, .. } = &mut ops[at] {
                    *bias = b;
                }
                continue;
            }
            "LRN" => Op::Lrn {
                size: node.int("size").unwrap_or(0) as usize,
                alpha: node.float("alpha").unwrap_or(1e-4),
                beta: node.float("beta").unwrap_or(0.75),
                k: node.float("bias").unwrap_or(1.0),
                name: label,
            },
            "MaxPool" => Op::MaxPool {
                max: true,
                kernel: node.ints("kernel_shape").first().map(|&k| k as usize),
                stride: node
                    .ints("strides")
                    .first()
                    .map(|&s| s as usize)
                    .or(Some(1)),
                pad: node.ints("pads").first().map_or(0, |&p| p as usize),
                name: label,
            },
            _ => continue,
        };
        ops.push(op);
    }
    if let Some(Op::Fc { bias, name, .. }) = pending_matmul.and_then(|(_, at)| ops.get(at)) {
        if bias.data.is_empty() {
            return Err(Error::checkpoint(
                path,
                format!("node `{name}` (MatMul) has no bias Add after it"),
            ));
        }
    }
    Ok(SourceNet {
        name: graph.name.or(model.producer_name).unwrap_or_default(),
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_whose_dims_overflow_is_refused() {
        let t = TensorProto {
            dims: vec![3, 7, 0x6DB6_DB6D_B6DB_6DB7],
            data_type: Some(FLOAT),
            float_data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        };
        let err = tensor_param(&t).unwrap_err();
        assert!(err.contains("more values than fit"), "{err}");
    }
}
