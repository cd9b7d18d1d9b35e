//! [`Span`]: a contiguous range of decoder layers, the unit a node serves
//! and a route is made of.

use std::{fmt, ops::Range, str::FromStr};

use serde::{Deserialize, Serialize};

/// Decoder layers `start..end` (end exclusive). The span starting at layer 0
/// also holds the embedding; the one ending at the model's last layer also
/// holds the final norm and `lm_head`.
///
/// Displays and parses as `start..end`:
/// ```
/// use nnmesh_protocol::Span;
/// let s: Span = "10..20".parse()?;
/// assert_eq!(s, Span::new(10, 20));
/// assert_eq!((s.len(), s.to_string()), (10, "10..20".to_string()));
/// assert!(s.contains(19) && !s.contains(20));
/// assert!("20..10".parse::<Span>().is_err());
/// # Ok::<(), nnmesh_protocol::span::ParseSpanError>(())
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct Span {
    /// First layer.
    pub start: u32,
    /// One past the last layer.
    pub end: u32,
}

impl Span {
    /// The layers `start..end`.
    pub const fn new(start: u32, end: u32) -> Span {
        Span { start, end }
    }

    /// Number of layers.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the span has no layers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `layer` is in the span.
    pub fn contains(&self, layer: u32) -> bool {
        (self.start..self.end).contains(&layer)
    }

    /// The span as a `usize` range, for indexing.
    pub fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Why a string is not a [`Span`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseSpanError {
    /// Not two integers separated by `..`.
    #[error("{0:?} is not a layer range: expected A..B, e.g. 0..10")]
    Syntax(String),
    /// `start >= end`.
    #[error("the layer range {0} is empty")]
    Empty(Span),
}

impl FromStr for Span {
    type Err = ParseSpanError;

    fn from_str(s: &str) -> Result<Span, ParseSpanError> {
        let syntax = || ParseSpanError::Syntax(s.to_string());
        let (a, b) = s.split_once("..").ok_or_else(syntax)?;
        let span = Span::new(
            a.trim().parse().map_err(|_| syntax())?,
            b.trim().parse().map_err(|_| syntax())?,
        );
        if span.is_empty() {
            return Err(ParseSpanError::Empty(span));
        }
        Ok(span)
    }
}
