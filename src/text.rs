//! Cutting text to a size: error messages, Event notes, trace metadata and log lines all have
//! limits, and a cut must land on a character boundary. Limits are in bytes, the strictest unit
//! any of those sinks counts in (a Kubernetes Event note is at most 1024 bytes; MLflow counts
//! characters, never more than bytes).

/// The longest prefix of `s` of at most `max_bytes` bytes that ends on a character boundary.
pub fn clip(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const ELLIPSIS: &str = "…";

/// `s` in at most `max_bytes` bytes, ending in "…" when it was cut.
pub fn truncate(s: &str, max_bytes: usize) -> String {
    if s.len() <= max_bytes {
        return s.to_string();
    }
    let kept = clip(s, max_bytes.saturating_sub(ELLIPSIS.len()));
    format!("{kept}{ELLIPSIS}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_as_is() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn a_cut_fits_the_limit_with_its_marker() {
        let t = truncate(&"x".repeat(2000), 500);
        assert_eq!(t.len(), 500);
        assert!(t.ends_with('…'));
        assert_eq!(clip(&"x".repeat(20), 7), "xxxxxxx");
    }

    #[test]
    fn a_cut_lands_on_a_character_boundary() {
        let s = "é".repeat(600); // 2 bytes each
        assert_eq!(clip(&s, 5), "éé");
        let t = truncate(&s, 1000);
        assert!(t.len() <= 1000);
        assert!(t.ends_with('…'));
        assert!(t.trim_end_matches('…').chars().all(|c| c == 'é'));
    }
}
