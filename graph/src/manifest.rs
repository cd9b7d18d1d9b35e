//! What a graph may touch in a model: its module tree (Hugging Face Llama
//! names), the hook points on each module, their order in the forward pass
//! and their shapes.

use serde::{Deserialize, Serialize};

use crate::{
    ir::{DType, Point},
    op::{TensorMeta, shape::fmt_shape},
};

/// The shape-relevant description of a Llama-family model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Manifest {
    /// Model name, e.g. `HuggingFaceTB/SmolLM2-135M`.
    pub model: String,
    /// Number of decoder layers.
    pub num_layers: u32,
    /// Residual stream width.
    pub hidden: u32,
    /// Attention (query) heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// MLP inner width.
    pub intermediate: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Longest sequence (prompt plus generated tokens) the model accepts.
    pub max_positions: u32,
    /// Element type of activations.
    pub dtype: DType,
}

/// A module of the model; layer-scoped variants carry the layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// `model.embed_tokens`.
    Embed,
    /// `model.layers.{i}`.
    Layer(u32),
    /// `model.layers.{i}.input_layernorm`.
    InputNorm(u32),
    /// `model.layers.{i}.self_attn`.
    Attn(u32),
    /// `model.layers.{i}.self_attn.q_proj`.
    QProj(u32),
    /// `model.layers.{i}.self_attn.k_proj`.
    KProj(u32),
    /// `model.layers.{i}.self_attn.v_proj`.
    VProj(u32),
    /// `model.layers.{i}.self_attn.o_proj`.
    OProj(u32),
    /// `model.layers.{i}.post_attention_layernorm`.
    PostNorm(u32),
    /// `model.layers.{i}.mlp`.
    Mlp(u32),
    /// `model.layers.{i}.mlp.gate_proj`.
    Gate(u32),
    /// `model.layers.{i}.mlp.up_proj`.
    Up(u32),
    /// `model.layers.{i}.mlp.down_proj`.
    Down(u32),
    /// `model.norm`.
    Norm,
    /// `lm_head`.
    LmHead,
}

/// Dense id of a hook point within one forward step: its position in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Site(pub u32);

/// Number of hook points in one decoder layer.
pub const POINTS_PER_LAYER: u32 = 29;

/// Hook points before the first layer (`embed_tokens` input and output).
const PRE_SITES: u32 = 2;

/// Hook points after the last layer (`model.norm` and `lm_head`, input and output).
const POST_SITES: u32 = 4;

type LayerSite = (fn(u32) -> Module, Point);

/// The hook points of layer `i` in forward order.
const LAYER_SITES: [LayerSite; POINTS_PER_LAYER as usize] = [
    (Module::Layer, Point::Input),
    (Module::InputNorm, Point::Input),
    (Module::InputNorm, Point::Output),
    (Module::Attn, Point::Input),
    (Module::QProj, Point::Input),
    (Module::QProj, Point::Output),
    (Module::KProj, Point::Input),
    (Module::KProj, Point::Output),
    (Module::VProj, Point::Input),
    (Module::VProj, Point::Output),
    (Module::Attn, Point::Q),
    (Module::Attn, Point::K),
    (Module::Attn, Point::V),
    (Module::Attn, Point::Pattern),
    (Module::Attn, Point::Z),
    (Module::OProj, Point::Input),
    (Module::OProj, Point::Output),
    (Module::Attn, Point::Output),
    (Module::PostNorm, Point::Input),
    (Module::PostNorm, Point::Output),
    (Module::Mlp, Point::Input),
    (Module::Gate, Point::Input),
    (Module::Gate, Point::Output),
    (Module::Up, Point::Input),
    (Module::Up, Point::Output),
    (Module::Down, Point::Input),
    (Module::Down, Point::Output),
    (Module::Mlp, Point::Output),
    (Module::Layer, Point::Output),
];

/// Offset of `(module, point)` within its layer's block of sites.
fn layer_offset(m: Module, p: Point) -> Option<u32> {
    use Point::*;
    let io = |input: u32, output: u32| match p {
        Input => Some(input),
        Output => Some(output),
        _ => None,
    };
    match m {
        Module::Layer(_) => io(0, 28),
        Module::InputNorm(_) => io(1, 2),
        Module::Attn(_) => match p {
            Input => Some(3),
            Q => Some(10),
            K => Some(11),
            V => Some(12),
            Pattern => Some(13),
            Z => Some(14),
            Output => Some(17),
        },
        Module::QProj(_) => io(4, 5),
        Module::KProj(_) => io(6, 7),
        Module::VProj(_) => io(8, 9),
        Module::OProj(_) => io(15, 16),
        Module::PostNorm(_) => io(18, 19),
        Module::Mlp(_) => io(20, 27),
        Module::Gate(_) => io(21, 22),
        Module::Up(_) => io(23, 24),
        Module::Down(_) => io(25, 26),
        Module::Embed | Module::Norm | Module::LmHead => None,
    }
}

impl Module {
    /// The Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self) -> String {
        let layer = |i: u32, suffix: &str| format!("model.layers.{i}{suffix}");
        match self {
            Module::Embed => "model.embed_tokens".into(),
            Module::Norm => "model.norm".into(),
            Module::LmHead => "lm_head".into(),
            Module::Layer(i) => layer(i, ""),
            Module::InputNorm(i) => layer(i, ".input_layernorm"),
            Module::Attn(i) => layer(i, ".self_attn"),
            Module::QProj(i) => layer(i, ".self_attn.q_proj"),
            Module::KProj(i) => layer(i, ".self_attn.k_proj"),
            Module::VProj(i) => layer(i, ".self_attn.v_proj"),
            Module::OProj(i) => layer(i, ".self_attn.o_proj"),
            Module::PostNorm(i) => layer(i, ".post_attention_layernorm"),
            Module::Mlp(i) => layer(i, ".mlp"),
            Module::Gate(i) => layer(i, ".mlp.gate_proj"),
            Module::Up(i) => layer(i, ".mlp.up_proj"),
            Module::Down(i) => layer(i, ".mlp.down_proj"),
        }
    }

    /// The decoder layer the module belongs to, if any.
    pub fn layer(self) -> Option<u32> {
        match self {
            Module::Embed | Module::Norm | Module::LmHead => None,
            Module::Layer(i)
            | Module::InputNorm(i)
            | Module::Attn(i)
            | Module::QProj(i)
            | Module::KProj(i)
            | Module::VProj(i)
            | Module::OProj(i)
            | Module::PostNorm(i)
            | Module::Mlp(i)
            | Module::Gate(i)
            | Module::Up(i)
            | Module::Down(i) => Some(i),
        }
    }

    /// The hook points the module has: input and output, plus q/k/v/pattern/z on `self_attn`.
    pub fn points(self) -> &'static [Point] {
        match self {
            Module::Attn(_) => &[
                Point::Input,
                Point::Output,
                Point::Q,
                Point::K,
                Point::V,
                Point::Pattern,
                Point::Z,
            ],
            _ => &[Point::Input, Point::Output],
        }
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path())
    }
}

/// Why a module cannot be applied to the given values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A module takes exactly one argument.
    #[error("{module} takes exactly 1 argument, got {found}")]
    Args {
        /// The module path.
        module: String,
        /// Arguments given.
        found: usize,
    },
    /// The argument's shape does not fit the module.
    #[error("{module}: {detail}")]
    Shape {
        /// The module path.
        module: String,
        /// What is wrong, naming the shape.
        detail: String,
    },
    /// The argument's dtype does not fit the module.
    #[error("{module}: {detail}")]
    Dtype {
        /// The module path.
        module: String,
        /// What is wrong, naming the dtype.
        detail: String,
    },
}

impl Module {
    /// The modules of decoder layer `i` in forward order, the layer itself first.
    pub fn of_layer(i: u32) -> [Module; 12] {
        [
            Module::Layer(i),
            Module::InputNorm(i),
            Module::Attn(i),
            Module::QProj(i),
            Module::KProj(i),
            Module::VProj(i),
            Module::OProj(i),
            Module::PostNorm(i),
            Module::Mlp(i),
            Module::Gate(i),
            Module::Up(i),
            Module::Down(i),
        ]
    }
}

impl Manifest {
    /// Every module of the model, embedding first, `lm_head` last.
    pub fn modules(&self) -> Vec<Module> {
        let mut out = vec![Module::Embed];
        for i in 0..self.num_layers {
            out.extend(Module::of_layer(i));
        }
        out.extend([Module::Norm, Module::LmHead]);
        out
    }

    /// Parses a Hugging Face module path, checking the layer index against `num_layers`.
    pub fn parse_module(&self, path: &str) -> Option<Module> {
        match path {
            "model.embed_tokens" => return Some(Module::Embed),
            "model.norm" => return Some(Module::Norm),
            "lm_head" => return Some(Module::LmHead),
            _ => {}
        }
        let rest = path.strip_prefix("model.layers.")?;
        let (digits, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        let i: u32 = digits.parse().ok()?;
        // Reject "+3" and "03": one canonical spelling per module keeps hashes stable.
        if i.to_string() != digits || i >= self.num_layers {
            return None;
        }
        Some(match suffix {
            "" => Module::Layer(i),
            "input_layernorm" => Module::InputNorm(i),
            "self_attn" => Module::Attn(i),
            "self_attn.q_proj" => Module::QProj(i),
            "self_attn.k_proj" => Module::KProj(i),
            "self_attn.v_proj" => Module::VProj(i),
            "self_attn.o_proj" => Module::OProj(i),
            "post_attention_layernorm" => Module::PostNorm(i),
            "mlp" => Module::Mlp(i),
            "mlp.gate_proj" => Module::Gate(i),
            "mlp.up_proj" => Module::Up(i),
            "mlp.down_proj" => Module::Down(i),
            _ => return None,
        })
    }

    /// The hook points `m` has.
    pub fn points(&self, m: Module) -> &'static [Point] {
        m.points()
    }

    /// Number of hook sites in one forward step.
    pub fn num_sites(&self) -> u32 {
        PRE_SITES + POINTS_PER_LAYER * self.num_layers + POST_SITES
    }

    /// The dense site id of a hook (its position in forward order), or `None`
    /// if the module has no such point or its layer does not exist; O(1).
    pub fn site(&self, m: Module, p: Point) -> Option<Site> {
        let post = PRE_SITES + POINTS_PER_LAYER * self.num_layers;
        let pos = match (m, p) {
            (Module::Embed, Point::Input) => 0,
            (Module::Embed, Point::Output) => 1,
            (Module::Norm, Point::Input) => post,
            (Module::Norm, Point::Output) => post + 1,
            (Module::LmHead, Point::Input) => post + 2,
            (Module::LmHead, Point::Output) => post + 3,
            _ => {
                let layer = m.layer().filter(|&i| i < self.num_layers)?;
                PRE_SITES + POINTS_PER_LAYER * layer + layer_offset(m, p)?
            }
        };
        Some(Site(pos))
    }

    /// The position of a hook in the order the forward visits hooks within
    /// one step (the same number as [`Manifest::site`]).
    pub fn position(&self, m: Module, p: Point) -> Option<u32> {
        self.site(m, p).map(|s| s.0)
    }

    /// The hook at a site.
    ///
    /// # Panics
    /// If `site` is not below [`Manifest::num_sites`].
    pub fn site_of(&self, site: Site) -> (Module, Point) {
        assert!(
            site.0 < self.num_sites(),
            "site {} out of range for {} sites",
            site.0,
            self.num_sites()
        );
        let post = PRE_SITES + POINTS_PER_LAYER * self.num_layers;
        match site.0 {
            0 => (Module::Embed, Point::Input),
            1 => (Module::Embed, Point::Output),
            s if s >= post => match s - post {
                0 => (Module::Norm, Point::Input),
                1 => (Module::Norm, Point::Output),
                2 => (Module::LmHead, Point::Input),
                _ => (Module::LmHead, Point::Output),
            },
            s => {
                let layer = (s - PRE_SITES) / POINTS_PER_LAYER;
                let (module, point) = LAYER_SITES[((s - PRE_SITES) % POINTS_PER_LAYER) as usize];
                (module(layer), point)
            }
        }
    }

    /// The shape and dtype of a hook's value for batch `b`, `t` tokens this
    /// step and `t_kv` keys (past plus this step), or `None` if `m` has no point `p`.
    pub fn try_hook_meta(
        &self,
        m: Module,
        p: Point,
        b: u64,
        t: u64,
        t_kv: u64,
    ) -> Option<TensorMeta> {
        if !m.points().contains(&p) {
            return None;
        }
        let (hidden, heads, kv_heads, head_dim) = (
            u64::from(self.hidden),
            u64::from(self.heads),
            u64::from(self.kv_heads),
            u64::from(self.head_dim),
        );
        let inter = u64::from(self.intermediate);
        let d = self.dtype;
        let btd = |width: u64| TensorMeta::new([b, t, width], d);
        Some(match (m, p) {
            (Module::Embed, Point::Input) => TensorMeta::new([b, t], DType::I64),
            (Module::Attn(_), Point::Q) => TensorMeta::new([b, heads, t, head_dim], d),
            (Module::Attn(_), Point::K | Point::V) => {
                TensorMeta::new([b, kv_heads, t, head_dim], d)
            }
            (Module::Attn(_), Point::Pattern) => TensorMeta::new([b, heads, t, t_kv], d),
            (Module::Attn(_), Point::Z) => TensorMeta::new([b, t, heads, head_dim], d),
            (Module::QProj(_), Point::Output) | (Module::OProj(_), Point::Input) => {
                btd(heads * head_dim)
            }
            (Module::KProj(_) | Module::VProj(_), Point::Output) => btd(kv_heads * head_dim),
            (Module::Gate(_) | Module::Up(_), Point::Output) | (Module::Down(_), Point::Input) => {
                btd(inter)
            }
            (Module::LmHead, Point::Output) => btd(u64::from(self.vocab)),
            _ => btd(hidden),
        })
    }

    /// The shape and dtype of a hook's value (see [`Manifest::try_hook_meta`]).
    ///
    /// # Panics
    /// If `m` has no point `p` (validated graphs never ask for one).
    pub fn hook_meta(&self, m: Module, p: Point, b: u64, t: u64, t_kv: u64) -> TensorMeta {
        self.try_hook_meta(m, p, b, t, t_kv)
            .unwrap_or_else(|| panic!("{m} has no point {p}"))
    }

    /// The shape and dtype of calling module `m` on one value.
    ///
    /// Norms, `mlp`, layers and `self_attn` map `[..., hidden]` to the same
    /// shape (layers and `self_attn` need `[b, t, hidden]` and run causally
    /// from position 0 without a cache); projections and `lm_head` map the
    /// last dimension; `embed_tokens` maps i64 ids `[...]` to `[..., hidden]`.
    /// The result has the model's dtype; float inputs are converted to it.
    ///
    /// # Errors
    /// [`ApplyError`] when there is not exactly one argument or its shape or
    /// dtype does not fit.
    pub fn apply_meta(&self, m: Module, args: &[TensorMeta]) -> Result<TensorMeta, ApplyError> {
        let [x] = args else {
            return Err(ApplyError::Args {
                module: m.path(),
                found: args.len(),
            });
        };
        let shape_err = |detail: String| ApplyError::Shape {
            module: m.path(),
            detail,
        };
        if m == Module::Embed {
            if x.dtype != DType::I64 {
                return Err(ApplyError::Dtype {
                    module: m.path(),
                    detail: format!("token ids must be i64, got {}", x.dtype),
                });
            }
            let mut shape = x.shape.clone();
            shape.push(u64::from(self.hidden));
            return Ok(TensorMeta::new(shape, self.dtype));
        }
        if !x.dtype.is_float() {
            return Err(ApplyError::Dtype {
                module: m.path(),
                detail: format!("expects a float tensor, got {}", x.dtype),
            });
        }
        let (hidden, q_width, kv_width) = (
            u64::from(self.hidden),
            u64::from(self.heads) * u64::from(self.head_dim),
            u64::from(self.kv_heads) * u64::from(self.head_dim),
        );
        let inter = u64::from(self.intermediate);
        let (expect_in, out) = match m {
            Module::QProj(_) => (hidden, q_width),
            Module::KProj(_) | Module::VProj(_) => (hidden, kv_width),
            Module::OProj(_) => (q_width, hidden),
            Module::Gate(_) | Module::Up(_) => (hidden, inter),
            Module::Down(_) => (inter, hidden),
            Module::LmHead => (hidden, u64::from(self.vocab)),
            _ => (hidden, hidden),
        };
        if matches!(m, Module::Layer(_) | Module::Attn(_)) && x.shape.len() != 3 {
            return Err(shape_err(format!(
                "expects [batch, tokens, {hidden}], got {}",
                fmt_shape(&x.shape)
            )));
        }
        match x.shape.last() {
            Some(&last) if last == expect_in => {
                let mut shape = x.shape.clone();
                if let Some(l) = shape.last_mut() {
                    *l = out;
                }
                Ok(TensorMeta::new(shape, self.dtype))
            }
            _ => Err(shape_err(format!(
                "expects [..., {expect_in}], got {}",
                fmt_shape(&x.shape)
            ))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny manifest for tests: 4 layers, hidden 8.
    pub(crate) fn tiny() -> Manifest {
        Manifest {
            model: "tiny".into(),
            num_layers: 4,
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            intermediate: 16,
            vocab: 32,
            max_positions: 64,
            dtype: DType::Bf16,
        }
    }

    #[test]
    fn paths_round_trip() {
        let m = tiny();
        for module in m.modules() {
            assert_eq!(m.parse_module(&module.path()), Some(module), "{module}");
        }
        for bad in [
            "model.layers.4",
            "model.layers.03",
            "model.layers.+3",
            "model.layers.x",
            "model.layers.1.attn",
            "model.layers.",
            "lm_head.weight",
        ] {
            assert_eq!(m.parse_module(bad), None, "{bad}");
        }
    }

    #[test]
    fn sites_are_dense_and_invertible() {
        let m = tiny();
        let mut seen = vec![false; m.num_sites() as usize];
        for module in m.modules() {
            for &p in m.points(module) {
                let site = m.site(module, p).expect("valid hook has a site");
                assert!(!std::mem::replace(&mut seen[site.0 as usize], true));
                assert_eq!(m.site_of(site), (module, p));
            }
            assert_eq!(
                m.site(module, Point::Q).is_some(),
                matches!(module, Module::Attn(_))
            );
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(m.num_sites(), 2 + 4 * POINTS_PER_LAYER + 4);
        for (k, (module, p)) in LAYER_SITES.iter().enumerate() {
            assert_eq!(layer_offset(module(0), *p), Some(k as u32));
        }
    }

    #[test]
    fn forward_order_matches_the_model() {
        let m = tiny();
        let pos = |module, p| m.position(module, p).expect("valid");
        assert_eq!(pos(Module::Embed, Point::Output), 1);
        assert_eq!(pos(Module::Layer(0), Point::Input), 2);
        assert!(pos(Module::QProj(1), Point::Output) < pos(Module::Attn(1), Point::Q));
        assert!(pos(Module::Attn(1), Point::Z) < pos(Module::OProj(1), Point::Input));
        assert!(pos(Module::Down(1), Point::Output) < pos(Module::Mlp(1), Point::Output));
        assert!(pos(Module::Layer(1), Point::Output) < pos(Module::Layer(2), Point::Input));
        assert_eq!(pos(Module::LmHead, Point::Output), m.num_sites() - 1);
        assert_eq!(m.position(Module::Layer(4), Point::Output), None);
    }

    #[test]
    fn hook_shapes() {
        let m = tiny();
        let meta = |module, p| m.hook_meta(module, p, 2, 5, 7).shape;
        assert_eq!(
            m.hook_meta(Module::Embed, Point::Input, 2, 5, 5).dtype,
            DType::I64
        );
        assert_eq!(meta(Module::Layer(0), Point::Output), [2, 5, 8]);
        assert_eq!(meta(Module::QProj(0), Point::Output), [2, 5, 8]);
        assert_eq!(meta(Module::KProj(0), Point::Output), [2, 5, 4]);
        assert_eq!(meta(Module::Attn(0), Point::Q), [2, 2, 5, 4]);
        assert_eq!(meta(Module::Attn(0), Point::K), [2, 1, 5, 4]);
        assert_eq!(meta(Module::Attn(0), Point::Pattern), [2, 2, 5, 7]);
        assert_eq!(meta(Module::Attn(0), Point::Z), [2, 5, 2, 4]);
        assert_eq!(meta(Module::Down(0), Point::Input), [2, 5, 16]);
        assert_eq!(meta(Module::LmHead, Point::Output), [2, 5, 32]);
        assert_eq!(m.try_hook_meta(Module::Mlp(0), Point::Z, 1, 1, 1), None);
    }

    #[test]
    fn apply_signatures() {
        let m = tiny();
        let h = TensorMeta::new([1, 5, 8], DType::F32);
        let ok = |module, x: &TensorMeta| m.apply_meta(module, std::slice::from_ref(x));
        assert_eq!(
            ok(Module::LmHead, &h),
            Ok(TensorMeta::new([1, 5, 32], DType::Bf16))
        );
        assert_eq!(ok(Module::Norm, &h).map(|x| x.shape), Ok(vec![1, 5, 8]));
        assert_eq!(ok(Module::Up(1), &h).map(|x| x.shape), Ok(vec![1, 5, 16]));
        let v = TensorMeta::new([8], DType::F32);
        assert!(ok(Module::Norm, &v).is_ok());
        let err = ok(Module::Layer(1), &v).expect_err("needs 3-d");
        assert!(err.to_string().contains("model.layers.1"), "{err}");
        assert!(ok(Module::Down(1), &h).is_err());
        let ids = TensorMeta::new([3], DType::I64);
        assert_eq!(ok(Module::Embed, &ids).map(|x| x.shape), Ok(vec![3, 8]));
        assert!(ok(Module::Embed, &h).is_err());
        assert!(ok(Module::Norm, &ids).is_err());
        assert!(matches!(
            m.apply_meta(Module::Norm, &[h.clone(), h]),
            Err(ApplyError::Args { found: 2, .. })
        ));
    }
}
