//! Text for an operator's terminal.

/// Escapes control characters, so that an executable path or argv chosen by the observed process
/// cannot forge lines or send escape sequences to the operator's terminal.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        match character {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            control if control.is_control() => escaped.push_str(&format!("\\u{{{:x}}}", control as u32)),
            other => escaped.push(other),
        }
    }
    std::borrow::Cow::Owned(escaped)
}

#[cfg(test)]
mod escape_tests {
    use super::escape_controls;

    #[test]
    fn escape_controls_neutralises_terminal_input() {
        assert_eq!(escape_controls("/usr/bin/bash"), "/usr/bin/bash");
        assert_eq!(escape_controls("evil\n    id  FORGED"), "evil\\n    id  FORGED");
        assert_eq!(escape_controls("\u{1b}[2Jred\r"), "\\u{1b}[2Jred\\r");
    }
}
