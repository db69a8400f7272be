//! Positions in configuration and policy files, as every `file:line:column` message gives them
//! (the controller's and the agent's configuration, and the policy-check reports sent to
//! `rebalctl`).

/// 1-based line and column (in characters) of a byte offset; an offset past the end is the end.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn counts_characters_and_clamps() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("a\nb", 99), (2, 2));
        // Inside a multi-byte character: the character's start.
        assert_eq!(line_col("é", 1), (1, 1));
    }
}
