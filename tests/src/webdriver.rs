//! A minimal WebDriver client for a driver on loopback (chromedriver): a session, navigation,
//! scripts and screenshots, over blocking HTTP/1.1 with one connection per command.
//!
//! The W3C WebDriver protocol is JSON over HTTP, so std's TcpStream and serde_json cover what the
//! tests need without an async HTTP stack.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::Result;

/// How long one command may take; starting the browser is the slowest.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One WebDriver session; [`WebDriver::close`] ends it and the browser with it.
#[derive(Debug)]
pub struct WebDriver {
    driver: SocketAddr,
    session: String,
}

impl WebDriver {
    /// Starts a browser session with `capabilities` (the `alwaysMatch` object).
    pub fn start(driver: SocketAddr, capabilities: Value) -> Result<WebDriver> {
        let body = json!({ "capabilities": { "alwaysMatch": capabilities } });
        let value = request(driver, "POST", "/session", Some(&body))?;
        let session = value["sessionId"]
            .as_str()
            .with_context(|| format!("the new session response has no sessionId: {value}"))?
            .to_string();
        Ok(WebDriver { driver, session })
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.command("POST", "url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// Runs `script` as the body of a function in the page and returns what it returns.
    pub fn execute(&self, script: &str) -> Result<Value> {
        self.command("POST", "execute/sync", Some(&json!({ "script": script, "args": [] })))
    }

    /// Returns a PNG of the browser's viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self.command("GET", "screenshot", None)?;
        let encoded = value.as_str().context("the screenshot response is not a string")?;
        decode_base64(encoded)
    }

    /// Ends the session, which closes the browser.
    pub fn close(self) -> Result<()> {
        request(self.driver, "DELETE", &format!("/session/{}", self.session), None)?;
        Ok(())
    }

    fn command(&self, method: &str, command: &str, body: Option<&Value>) -> Result<Value> {
        request(
            self.driver,
            method,
            &format!("/session/{}/{command}", self.session),
            body,
        )
    }
}

/// Sends one request and returns the response's `value`, or fails with the WebDriver error.
fn request(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream =
        TcpStream::connect(driver).with_context(|| format!("failed to connect to the WebDriver server on {driver}"))?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {driver}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let (head, payload) = read_response(&mut stream)
        .with_context(|| format!("WebDriver {method} {path}: failed to read the response (timeout {COMMAND_TIMEOUT:?})"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("WebDriver {method} {path}: malformed status line in {head:?}"))?;
    let json: Value = serde_json::from_str(&payload)
        .with_context(|| format!("WebDriver {method} {path}: the body is not JSON: {payload:?}"))?;
    if status != 200 {
        bail!(
            "WebDriver {method} {path} failed with HTTP {status}: {}: {}",
            json["value"]["error"].as_str().unwrap_or("unknown error"),
            json["value"]["message"].as_str().unwrap_or("")
        );
    }
    Ok(json["value"].clone())
}

/// Reads one response: the head, then a body of `Content-Length` bytes or in chunks. The driver
/// may keep the connection open despite `Connection: close`, so the body's end is never taken
/// from the end of the stream.
fn read_response(stream: &mut TcpStream) -> Result<(String, String)> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(end) = find(&received, b"\r\n\r\n") {
            break end;
        }
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            bail!("the connection closed before the response head ended");
        }
        received.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8(received[..head_end].to_vec()).context("the response head is not UTF-8")?;
    let mut body = received[head_end + 4..].to_vec();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
        })
    };

    let chunked = header("transfer-encoding").is_some_and(|value| value.eq_ignore_ascii_case("chunked"));
    if chunked {
        while !(body.starts_with(b"0\r\n\r\n") || find(&body, b"\r\n0\r\n\r\n").is_some()) {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            body.extend_from_slice(&buffer[..read]);
        }
        let body = String::from_utf8(body).context("the response body is not UTF-8")?;
        return Ok((head, dechunk(&body)?));
    }
    let length: usize = match header("content-length") {
        Some(value) => value.parse().with_context(|| format!("invalid Content-Length {value:?}"))?,
        None => {
            stream.read_to_end(&mut body)?;
            body.len()
        }
    };
    while body.len() < length {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            bail!("the connection closed after {} of {length} body bytes", body.len());
        }
        body.extend_from_slice(&buffer[..read]);
    }
    body.truncate(length);
    Ok((head, String::from_utf8(body).context("the response body is not UTF-8")?))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Joins the chunks of a chunked transfer encoding.
fn dechunk(mut body: &str) -> Result<String> {
    let mut joined = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("a chunk has no size line")?;
        let size = usize::from_str_radix(size.trim(), 16).with_context(|| format!("invalid chunk size {size:?}"))?;
        if size == 0 {
            return Ok(joined);
        }
        let chunk = rest.get(..size).context("a chunk is shorter than its size")?;
        joined.push_str(chunk);
        body = rest[size..]
            .strip_prefix("\r\n")
            .context("a chunk does not end with CRLF")?;
    }
}

/// Decodes standard base64 with padding, as WebDriver sends screenshots.
fn decode_base64(text: &str) -> Result<Vec<u8>> {
    fn digit(byte: u8) -> Option<u32> {
        match byte {
            b'A'..=b'Z' => Some(u32::from(byte - b'A')),
            b'a'..=b'z' => Some(u32::from(byte - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(byte - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes: Vec<u8> = text.bytes().filter(|byte| !byte.is_ascii_whitespace()).collect();
    if bytes.len() % 4 != 0 {
        bail!("invalid base64: length {} is not a multiple of 4", bytes.len());
    }
    let mut decoded = Vec::with_capacity(bytes.len() / 4 * 3);
    for group in bytes.chunks(4) {
        let padding = group.iter().rev().take_while(|byte| **byte == b'=').count();
        let mut value = 0u32;
        for (index, byte) in group.iter().enumerate() {
            let bits = if index >= 4 - padding {
                0
            } else {
                digit(*byte).with_context(|| format!("invalid base64 byte {byte:#x}"))?
            };
            value = (value << 6) | bits;
        }
        let full = [(value >> 16) as u8, (value >> 8) as u8, value as u8];
        decoded.extend_from_slice(&full[..3 - padding.min(2)]);
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(decode_base64("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
        assert_eq!(decode_base64("YWJj").unwrap(), b"abc");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert!(decode_base64("YQ=").is_err());
    }

    #[test]
    fn chunked_body_is_joined() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap(), "{\"a\":1}");
    }
}
