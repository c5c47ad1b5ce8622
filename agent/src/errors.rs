//! Printing an error with its causes, each once.

use std::error::Error;

/// Formats `error` and its causes as `error: cause: cause`, leaving out a cause whose text the
/// text before it already ends with.
///
/// Some wrappers print their cause and also return it as their source: tonic's `ConnectError`
/// displays the error it wraps, and many `thiserror` variants end with `: {0}`. Printing the chain
/// with anyhow's `{:#}` then repeats the cause, as in "tcp connect error: tcp connect error".
pub fn chain_text(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !last.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        last = cause_text;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::io;

    use super::*;

    /// An error that prints its cause and also returns it as its source, as tonic's
    /// `ConnectError` does.
    #[derive(Debug)]
    struct Transparent(io::Error);

    impl fmt::Display for Transparent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(&self.0, f)
        }
    }

    impl Error for Transparent {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("failed to read the model: {0}")]
    struct ReadFailed(#[source] io::Error);

    #[test]
    fn chain_text_prints_a_transparent_cause_once() {
        let cause = io::Error::new(io::ErrorKind::ConnectionRefused, "tcp connect error");
        let error = anyhow::Error::new(Transparent(cause)).context("failed to connect to 127.0.0.1:1");

        assert_eq!(chain_text(error.as_ref()), "failed to connect to 127.0.0.1:1: tcp connect error");
    }

    #[test]
    fn chain_text_skips_repeated_suffix() {
        let error = ReadFailed(io::Error::from(io::ErrorKind::NotFound));

        assert_eq!(chain_text(&error), format!("failed to read the model: {}", io::Error::from(io::ErrorKind::NotFound)));
    }

    #[test]
    fn chain_text_keeps_distinct_causes() {
        let error = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound))
            .context("failed to open m.yaml")
            .context("failed to load the model");

        assert_eq!(
            chain_text(error.as_ref()),
            format!("failed to load the model: failed to open m.yaml: {}", io::Error::from(io::ErrorKind::NotFound))
        );
    }
}
