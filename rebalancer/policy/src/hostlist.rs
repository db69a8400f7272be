//! Slurm-hostlist-like node patterns: `node[1-3,7]`, `rack[1-2]-n[01-16]`, `gpu*`.
//!
//! A bracket holds comma-separated numbers or ranges. A bound written with leading zeros
//! (`[01-16]`) fixes the width, as Slurm does; otherwise numbers carry no leading zeros.
//! `*` matches any run of characters, so `*` alone matches every node.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Numbers(Vec<NumRange>),
    Star,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NumRange {
    lo: u64,
    hi: u64,
    /// Required digit count when zero-padded, else 0.
    width: usize,
}

impl NumRange {
    fn matches(&self, digits: &str) -> bool {
        if self.width > 0 {
            if digits.len() != self.width {
                return false;
            }
        } else if digits.len() > 1 && digits.starts_with('0') {
            return false;
        }
        match digits.parse::<u64>() {
            Ok(v) => v >= self.lo && v <= self.hi,
            Err(_) => false,
        }
    }
}

/// A compiled node pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    text: String,
    segments: Vec<Segment>,
}

/// Why a pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

impl HostPattern {
    /// Compiles `text`; errors name the problem in words suited to a policy diagnostic.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError("empty node pattern".into()));
        }
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '[' => {
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find(']') else {
                        return Err(PatternError(format!(
                            "unclosed `[` in node pattern `{text}`"
                        )));
                    };
                    let body = &rest[..end];
                    if body.contains('[') {
                        return Err(PatternError(format!("nested `[` in node pattern `{text}`")));
                    }
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(Segment::Numbers(parse_ranges(body, text)?));
                    // Skip the bracket body and the closing `]`.
                    for _ in 0..=body.chars().count() {
                        chars.next();
                    }
                }
                ']' => {
                    return Err(PatternError(format!(
                        "unmatched `]` in node pattern `{text}`"
                    )))
                }
                '*' => {
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(Segment::Star);
                }
                c if c.is_whitespace() || c == ',' => {
                    return Err(PatternError(format!(
                        "node pattern `{text}` contains {c:?}; list patterns as separate strings"
                    )))
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(HostPattern {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, name: &str) -> bool {
        match_from(&self.segments, name)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_ranges(body: &str, text: &str) -> Result<Vec<NumRange>, PatternError> {
    let bad = |what: &str| PatternError(format!("{what} in node pattern `{text}`"));
    if body.is_empty() {
        return Err(bad("empty `[]`"));
    }
    let mut out = Vec::new();
    for part in body.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |s: &str| -> Result<u64, PatternError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&format!("`{part}` is not a number or range")));
            }
            s.parse::<u64>()
                .map_err(|_| bad(&format!("`{s}` is too large")))
        };
        let (lo, hi) = (num(a)?, num(b)?);
        if lo > hi {
            return Err(bad(&format!("range `{part}` runs backwards")));
        }
        let width = if a.len() > 1 && a.starts_with('0') {
            a.len()
        } else {
            0
        };
        out.push(NumRange { lo, hi, width });
    }
    Ok(out)
}

fn match_from(segments: &[Segment], name: &str) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return name.is_empty();
    };
    match first {
        Segment::Literal(l) => name
            .strip_prefix(l.as_str())
            .is_some_and(|tail| match_from(rest, tail)),
        Segment::Star => name
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(name.len()))
            .any(|i| match_from(rest, &name[i..])),
        Segment::Numbers(ranges) => {
            let run = name.bytes().take_while(u8::is_ascii_digit).count();
            // Try every digit-run length so a pattern like `n[1-2]0` still works.
            (1..=run).rev().any(|len| {
                let digits = &name[..len];
                ranges.iter().any(|r| r.matches(digits)) && match_from(rest, &name[len..])
            })
        }
    }
}

/// An include/exclude pair of pattern lists. An empty include list admits everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFilter {
    pub include: Vec<HostPattern>,
    pub exclude: Vec<HostPattern>,
}

impl HostFilter {
    pub fn admits(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(name)))
            && !self.exclude.iter().any(|p| p.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        HostPattern::parse(p).map(|p| p.matches(n)).unwrap_or(false)
    }

    #[test]
    fn ranges_lists_and_literals() {
        assert!(m("node[1-3]", "node1"));
        assert!(m("node[1-3]", "node3"));
        assert!(!m("node[1-3]", "node4"));
        assert!(!m("node[1-3]", "node10"));
        assert!(m("node[1-3,7]", "node7"));
        assert!(m("node5", "node5"));
        assert!(!m("node5", "node50"));
        assert!(m("rack[1-2]-n[1-4]", "rack2-n4"));
        assert!(!m("rack[1-2]-n[1-4]", "rack3-n4"));
    }

    #[test]
    fn zero_padding_fixes_width() {
        assert!(m("n[01-10]", "n01"));
        assert!(m("n[01-10]", "n10"));
        assert!(!m("n[01-10]", "n1"));
        assert!(!m("n[1-10]", "n01"));
    }

    #[test]
    fn star_matches_any_run() {
        assert!(m("*", "anything"));
        assert!(m("gpu*", "gpu12"));
        assert!(!m("gpu*", "cpu12"));
        assert!(m("*-[1-2]", "rack-2"));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for p in [
            "",
            "node[1-3",
            "node]",
            "node[3-1]",
            "node[a-b]",
            "node[]",
            "n1,n2",
            "n[[1]]",
        ] {
            assert!(HostPattern::parse(p).is_err(), "{p} should be rejected");
        }
    }

    #[test]
    fn filter_exclude_wins() {
        let f = HostFilter {
            include: vec![HostPattern::parse("node[1-5]").unwrap_or_else(|e| panic!("{e}"))],
            exclude: vec![HostPattern::parse("node3").unwrap_or_else(|e| panic!("{e}"))],
        };
        assert!(f.admits("node2"));
        assert!(!f.admits("node3"));
        assert!(!f.admits("node6"));
        assert!(HostFilter::default().admits("x"));
    }
}
