//! NNsight's side of the Intervention Graph figures, as
//! `scripts/bench_nnsight.py` reports it: each experiment in several forms,
//! each form's median time (or the error it failed with) and what it
//! computed, checked here against nnmesh's own results.

use anyhow::{Context, Result};
use serde_json::Value;
use tch::Kind;

use nnmesh_runtime::execute::Outcome;

/// NNsight's figures for the plain forwards and each experiment's forms.
pub(super) struct Figures {
    /// A plain transformers forward of the lens prompt, seconds.
    pub plain_lens_s: Option<f64>,
    /// A plain transformers forward of the corrupted IOI prompt, seconds.
    pub plain_ioi_s: Option<f64>,
    /// The logit lens's forms.
    pub lens: Vec<Form>,
    /// Activation patching's forms.
    pub patching: Vec<Form>,
}

impl Figures {
    /// Reads the script's JSON line.
    pub(super) fn from_json(v: &Value) -> Self {
        let forms = |k: &str| {
            v[k].as_array()
                .map(|forms| forms.iter().map(Form::from_json).collect())
                .unwrap_or_default()
        };
        Figures {
            plain_lens_s: v["plain_lens_s"].as_f64(),
            plain_ioi_s: v["plain_ioi_s"].as_f64(),
            lens: forms("lens"),
            patching: forms("patching"),
        }
    }
}

/// One way of writing an experiment in NNsight.
pub(super) struct Form {
    /// What the form does, e.g. "one trace per layer".
    pub name: String,
    /// Its median seconds, or the error it failed with.
    pub secs: Result<f64, String>,
    /// What it computed (`top_ids`/`top_logits` or `patched`).
    json: Value,
}

impl Form {
    fn from_json(json: &Value) -> Self {
        let secs = match json["s"].as_f64() {
            Some(s) => Ok(s),
            None => Err(json["error"]
                .as_str()
                .unwrap_or("no time reported")
                .to_string()),
        };
        Form {
            name: json["form"].as_str().unwrap_or("?").to_string(),
            secs,
            json: json.clone(),
        }
    }

    /// How this lens form's top tokens and logits per layer agree with
    /// nnmesh's `lens.L` saves.
    ///
    /// # Errors
    /// When either side is missing a layer.
    pub(super) fn lens_agreement(&self, ours: &Outcome, layers: u32) -> Result<String> {
        let (mut same_top, mut max_diff, mut k) = (0, 0f64, 0);
        for l in 0..layers {
            let logits = ours
                .get(&format!("lens.{l}"))
                .with_context(|| format!("nnmesh's lens saves lens.{l}"))?
                .to_kind(Kind::Double)
                .flatten(0, -1);
            let ids = self.json["top_ids"][l as usize].as_array();
            let theirs = self.json["top_logits"][l as usize].as_array();
            let (ids, theirs) = ids
                .zip(theirs)
                .with_context(|| format!("NNsight's {} reports no layer {l}", self.name))?;
            k = ids.len();
            let top = logits.argmax(0, false).int64_value(&[]);
            if ids.first().and_then(Value::as_i64) == Some(top) {
                same_top += 1;
            }
            for (id, theirs) in ids.iter().zip(theirs) {
                let (id, theirs) = id
                    .as_i64()
                    .zip(theirs.as_f64())
                    .with_context(|| format!("NNsight's {}: a bad top logit", self.name))?;
                max_diff = max_diff.max((logits.double_value(&[id]) - theirs).abs());
            }
        }
        Ok(format!(
            "top token the same at {same_top}/{layers} layers, top-{k} logits {max_diff:.1e}"
        ))
    }

    /// How this patching form's logit differences per layer agree with
    /// nnmesh's.
    ///
    /// # Errors
    /// When the form reports a different number of layers.
    pub(super) fn patching_agreement(&self, ours: &[f64]) -> Result<String> {
        let theirs: Vec<f64> = self.json["patched"]
            .as_array()
            .map(|ds| ds.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        anyhow::ensure!(
            theirs.len() == ours.len(),
            "NNsight's {} reports {} patched layers, nnmesh {}",
            self.name,
            theirs.len(),
            ours.len()
        );
        let max_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        Ok(format!(
            "{} patched logit differences {max_diff:.1e}",
            ours.len()
        ))
    }
}

/// The form that ran fastest and its seconds, if any ran.
pub(super) fn fastest(forms: &[Form]) -> Option<(&Form, f64)> {
    forms
        .iter()
        .filter_map(|f| Some((f, *f.secs.as_ref().ok()?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}
