//! Readable summaries of what a graph saved: top tokens for logits,
//! statistics for the rest; and saving every value to safetensors.

use anyhow::{Context, Result};
use nnmesh_runtime::{execute::Outcome, interpret::SavedTensor, tokenizer::Tokenizer};
use tch::{Kind, Tensor};

use super::backend::RunArgs;

/// Writes every saved value to `--out` (safetensors), if given.
pub(super) fn write_out(run: &RunArgs, out: &Outcome) -> Result<()> {
    if let Some(path) = &run.out {
        let named: Vec<(String, Tensor)> = out
            .saves
            .iter()
            .map(|s| (s.key(), s.value.contiguous()))
            .collect();
        Tensor::write_safetensors(&named, path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} values to {}", named.len(), path.display());
    }
    Ok(())
}

/// Prints the tokens each invoke generated.
pub(super) fn print_generated(tok: &Tokenizer, out: &Outcome) {
    for (t, rows) in out.generated.iter().enumerate() {
        for (i, ids) in rows.iter().enumerate().filter(|(_, ids)| !ids.is_empty()) {
            println!(
                "trace {t} invoke {i} generated: {:?}",
                tok.decode(ids).unwrap_or_default()
            );
        }
    }
}

/// Prints one saved value: shape and dtype, then the top tokens if it looks
/// like logits, else summary statistics.
pub(super) fn print_saved(tok: &Tokenizer, s: &SavedTensor) {
    let v = &s.value;
    println!("{}  {:?} {:?}", s.key(), v.kind(), v.size());
    let numel = v.numel();
    if numel == 0 {
        return;
    }
    let vocab = tok_vocab(tok);
    let f = v.to_kind(Kind::Float);
    if v.size().last() == Some(&vocab) && v.is_floating_point() {
        let rows = f.reshape([-1, vocab]);
        let last = rows.get(-1);
        println!("    top tokens (last row): {}", top_tokens(tok, &last, 5));
    } else if numel <= 16 {
        let vals = Vec::<f32>::try_from(f.flatten(0, -1)).unwrap_or_default();
        println!("    {vals:?}");
    } else {
        println!(
            "    mean {:.4}  std {:.4}  min {:.4}  max {:.4}",
            f.mean(Kind::Float).double_value(&[]),
            f.std(true).double_value(&[]),
            f.min().double_value(&[]),
            f.max().double_value(&[])
        );
    }
}

fn tok_vocab(tok: &Tokenizer) -> i64 {
    tok.vocab_size() as i64
}

/// `" Paris" 0.62, " Rome" 0.05, …` for a `[vocab]` logits row.
pub(super) fn top_tokens(tok: &Tokenizer, logits: &Tensor, k: i64) -> String {
    let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
    let (p, idx) = probs.topk(k, -1, true, true);
    let p = Vec::<f32>::try_from(&p).unwrap_or_default();
    let idx = Vec::<i64>::try_from(&idx).unwrap_or_default();
    idx.iter()
        .zip(&p)
        .map(|(&i, &p)| format!("{:?} {p:.2}", tok.token_text(i as u32)))
        .collect::<Vec<_>>()
        .join(", ")
}
