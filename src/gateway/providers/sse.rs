//! A small incremental parser for server-sent events (the `text/event-stream` format of the
//! WHATWG HTML standard, "9.2 Server-sent events").
//!
//! Bytes are fed as they arrive and may split an event, a line, a `\r\n` pair or a multi-byte
//! UTF-8 character anywhere. Lines end with `\n`, `\r\n` or a lone `\r`; `data:` lines of one event
//! are joined with `\n`; lines starting with `:` are comments; `id:` and `retry:` are ignored (an
//! upstream LLM stream is never resumed). An event is dispatched at its blank line, or by
//! [`SseParser::finish`] when the stream ends without one.

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if the event had one (Anthropic names every event; OpenAI and Gemini
    /// send `data:` only).
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser: see the module documentation.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes received and not yet consumed as complete lines.
    buf: Vec<u8>,
    /// Where to resume looking for a line terminator in `buf`.
    scan_from: usize,
    /// Whether the start of the stream (and a possible byte-order mark) has been handled.
    started: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// Longest line, and longest data of one event, accepted (0: no limit).
    max_line: usize,
    /// Set when a line or an event went beyond `max_line`: the stream is broken from then on.
    overflowed: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds the lines (and each event's data) to `max` bytes: beyond, [`Self::overflowed`]
    /// turns true and what was held is dropped, so a line that never ends holds no memory.
    pub fn limit_lines(&mut self, max: usize) {
        self.max_line = max;
    }

    /// Whether a line or an event went beyond the limit of [`Self::limit_lines`].
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Feeds the next bytes of the stream; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        if self.overflowed {
            return Vec::new();
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        if !self.started {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return out; // could still become a byte-order mark
            }
            if self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
            }
            self.started = true;
        }
        let mut consumed = 0;
        let mut i = self.scan_from;
        while i < self.buf.len() {
            match self.buf[i] {
                b'\n' => {
                    self.line(consumed, i, &mut out);
                    consumed = i + 1;
                }
                b'\r' => {
                    if i + 1 == self.buf.len() {
                        break; // `\r` at the end: wait to see whether `\n` follows
                    }
                    self.line(consumed, i, &mut out);
                    consumed = if self.buf[i + 1] == b'\n' {
                        i + 2
                    } else {
                        i + 1
                    };
                    i = consumed;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        self.buf.drain(..consumed);
        self.scan_from = i - consumed;
        if self.max_line > 0 && (self.buf.len() > self.max_line || self.data.len() > self.max_line)
        {
            self.overflowed = true;
            self.buf = Vec::new();
            self.data = String::new();
        }
        out
    }

    /// The stream has ended: processes a last unterminated line and dispatches a last event that
    /// had no blank line after it.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let end = if self.buf.last() == Some(&b'\r') {
                self.buf.len() - 1
            } else {
                self.buf.len()
            };
            self.line(0, end, &mut out);
            self.buf.clear();
        }
        self.scan_from = 0;
        self.dispatch(&mut out);
        out
    }

    /// Processes the line `buf[start..end]` (without its terminator).
    fn line(&mut self, start: usize, end: usize, out: &mut Vec<SseEvent>) {
        let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return; // comment (e.g. keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if self.has_data {
            out.push(SseEvent {
                event,
                data: std::mem::take(&mut self.data),
            });
            self.has_data = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            out.extend(p.push(chunk));
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn parses_events_with_lf_crlf_and_cr_line_endings() {
        let expected = vec![ev(Some("a"), "one"), ev(None, "two")];
        for input in [
            &b"event: a\ndata: one\n\ndata: two\n\n"[..],
            &b"event: a\r\ndata: one\r\n\r\ndata: two\r\n\r\n"[..],
            &b"event: a\rdata: one\r\rdata: two\r\r"[..],
        ] {
            for piece in 1..=input.len() {
                assert_eq!(parse_in_pieces(input, piece), expected, "piece {piece}");
            }
        }
    }

    #[test]
    fn joins_multi_line_data_and_skips_comments_and_other_fields() {
        let input = b": keep-alive\nid: 7\nretry: 100\ndata: {\"a\":\ndata:1}\nunknown: x\n\n";
        assert_eq!(parse_in_pieces(input, 3), vec![ev(None, "{\"a\":\n1}")]);
    }

    #[test]
    fn only_one_leading_space_is_stripped_and_a_field_without_colon_is_empty() {
        let input = b"data:  two spaces\n\ndata\n\n";
        assert_eq!(
            parse_in_pieces(input, 1),
            vec![ev(None, " two spaces"), ev(None, "")]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_does_not_leak_its_name() {
        let input = b"event: ping\n\ndata: x\n\n";
        assert_eq!(parse_in_pieces(input, 2), vec![ev(None, "x")]);
    }

    #[test]
    fn finish_flushes_an_unterminated_last_event() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: {\"done\":true}").is_empty());
        assert_eq!(p.finish(), vec![ev(None, "{\"done\":true}")]);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn multi_byte_characters_split_across_pushes_survive() {
        let input = "data: héllo ✓\n\n".as_bytes();
        assert_eq!(parse_in_pieces(input, 1), vec![ev(None, "héllo ✓")]);
    }

    #[test]
    fn a_line_or_an_event_beyond_the_limit_overflows_and_frees_what_it_held() {
        let mut p = SseParser::new();
        p.limit_lines(16);
        assert_eq!(p.push(b"data: short\n\n").len(), 1);
        assert!(p.push(b"data: 0123456789").is_empty());
        assert!(!p.overflowed());
        assert!(p.push(b"0123456789").is_empty());
        assert!(p.overflowed() && p.buf.capacity() == 0);
        let mut p = SseParser::new();
        p.limit_lines(16);
        assert!(p.push(b"data: 0123456789\ndata: 0123456789\n").is_empty());
        assert!(p.overflowed());
    }

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let input = b"\xEF\xBB\xBFdata: x\n\n";
        assert_eq!(parse_in_pieces(input, 1), vec![ev(None, "x")]);
        assert_eq!(parse_in_pieces(input, 100), vec![ev(None, "x")]);
    }
}
