//! A DNS message parser (RFC 1035 wire format) for answers captured from the network.
//!
//! The bytes come from any process or host that can send a datagram from port 53, so the parser
//! treats them as hostile: every read is bounds-checked, compression pointers may only point
//! backwards and names are limited to 255 bytes (which together end any loop), records are
//! limited to what the header announces, and a message cut at the capture limit still yields the
//! records before the cut.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record type A (RFC 1035).
pub const TYPE_A: u16 = 1;
/// Record type CNAME (RFC 1035).
pub const TYPE_CNAME: u16 = 5;
/// Record type AAAA (RFC 3596).
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
const CLASS_IN: u16 = 1;

/// Length of the fixed header.
const HEADER_BYTES: usize = 12;
/// Maximum length of a name in wire form (RFC 1035 section 3.1).
const MAX_NAME_BYTES: usize = 255;
/// Maximum number of answer, authority and additional records read from one message. A UDP
/// message of 64 KiB cannot hold more than about 6,000 records of 11 bytes; answers that matter
/// hold a handful.
const MAX_RECORDS: usize = 256;

/// Reason a message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message of {len} bytes is shorter than the 12-byte header")]
    ShortHeader { len: usize },
    #[error("message ends at byte {len} inside {what} starting at offset {offset}")]
    Truncated { what: &'static str, offset: usize, len: usize },
    #[error("compression pointer at offset {offset} points forward to {target}")]
    ForwardPointer { offset: usize, target: usize },
    #[error("name at offset {offset} is longer than 255 bytes")]
    NameTooLong { offset: usize },
    #[error("label at offset {offset} has the reserved type bits {bits:#04x}")]
    ReservedLabelType { offset: usize, bits: u8 },
    #[error("message has {count} questions; only messages with one are parsed")]
    QuestionCount { count: u16 },
}

/// Data of one resource record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The canonical name, lowercase, without the trailing dot.
    Cname(String),
    /// A record of another type (or class), kept only as its type.
    Other { record_type: u16 },
}

/// One resource record of the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercase, without the trailing dot (empty for the root).
    pub name: String,
    pub ttl: u32,
    pub data: RecordData,
}

/// The parts of a DNS message the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// True for a response (the QR bit).
    pub response: bool,
    /// True when the server cut the message (the TC bit).
    pub truncated: bool,
    /// Response code; 0 is NOERROR, 3 is NXDOMAIN.
    pub rcode: u8,
    /// The question's name (lowercase, no trailing dot) and type.
    pub question: Option<(String, u16)>,
    /// The answer section, up to the first record that could not be read.
    pub answers: Vec<Record>,
    /// Reason the answer section ended early, when it did (a cut capture, a malformed record).
    pub incomplete: Option<ParseError>,
}

impl Message {
    /// Returns the addresses the question's name resolves to in this answer, each with the
    /// smallest TTL on its CNAME chain.
    ///
    /// Only records reached from the question's name through CNAME records count, so a server
    /// cannot attach a name the process never asked for to an address. Chains longer than the
    /// answer section (a CNAME loop) end there.
    pub fn resolved_addresses(&self) -> Vec<(IpAddr, u32)> {
        let Some((question, _)) = &self.question else { return Vec::new() };
        if !self.response || self.rcode != 0 {
            return Vec::new();
        }
        let mut owner = question.clone();
        let mut ttl = u32::MAX;
        let mut addresses = Vec::new();
        for _ in 0..=self.answers.len() {
            let mut next = None;
            for record in self.answers.iter().filter(|record| record.name == owner) {
                match &record.data {
                    RecordData::A(address) => {
                        addresses.push((IpAddr::V4(*address), ttl.min(record.ttl)));
                    }
                    RecordData::Aaaa(address) => {
                        addresses.push((IpAddr::V6(*address), ttl.min(record.ttl)));
                    }
                    RecordData::Cname(target) if next.is_none() => {
                        next = Some((target.clone(), record.ttl));
                    }
                    RecordData::Cname(_) | RecordData::Other { .. } => {}
                }
            }
            match next {
                Some((target, cname_ttl)) if addresses.is_empty() => {
                    owner = target;
                    ttl = ttl.min(cname_ttl);
                }
                _ => break,
            }
        }
        addresses
    }
}

/// Parses a DNS message. The header and the question must be complete; the answer section is
/// read as far as it goes, see [`Message::incomplete`].
pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
    if bytes.len() < HEADER_BYTES {
        return Err(ParseError::ShortHeader { len: bytes.len() });
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
    let question_count = u16::from_be_bytes([bytes[4], bytes[5]]);
    let answer_count = u16::from_be_bytes([bytes[6], bytes[7]]);

    let mut reader = Reader { bytes, position: HEADER_BYTES };
    let question = match question_count {
        0 => None,
        1 => {
            let name = reader.name()?;
            let record_type = reader.u16("question type")?;
            let _class = reader.u16("question class")?;
            Some((name, record_type))
        }
        count => return Err(ParseError::QuestionCount { count }),
    };

    let mut answers = Vec::new();
    let mut incomplete = None;
    for _ in 0..usize::from(answer_count).min(MAX_RECORDS) {
        match reader.record() {
            Ok(record) => answers.push(record),
            Err(error) => {
                incomplete = Some(error);
                break;
            }
        }
    }
    Ok(Message {
        id,
        response: flags & 0x8000 != 0,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0x000f) as u8,
        question,
        answers,
        incomplete,
    })
}

/// A cursor over the message; every read checks the bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn take(&mut self, count: usize, what: &'static str) -> Result<&[u8], ParseError> {
        let start = self.position;
        let end = start.checked_add(count).filter(|&end| end <= self.bytes.len()).ok_or(
            ParseError::Truncated { what, offset: start, len: self.bytes.len() },
        )?;
        self.position = end;
        Ok(&self.bytes[start..end])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Reads the name at the cursor and moves past it (past the first pointer, if any).
    fn name(&mut self) -> Result<String, ParseError> {
        let (name, end) = read_name(self.bytes, self.position)?;
        self.position = end;
        Ok(name)
    }

    fn record(&mut self) -> Result<Record, ParseError> {
        let name = self.name()?;
        let record_type = self.u16("record type")?;
        let class = self.u16("record class")?;
        let ttl = self.u32("record TTL")?;
        let length = usize::from(self.u16("record data length")?);
        let data_offset = self.position;
        let data = self.take(length, "record data")?;
        let data = match (record_type, class, length) {
            (TYPE_A, CLASS_IN, 4) => RecordData::A(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (TYPE_AAAA, CLASS_IN, 16) => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(data);
                RecordData::Aaaa(Ipv6Addr::from(octets))
            }
            (TYPE_CNAME, CLASS_IN, _) => {
                // The target may point anywhere before it, but must end inside the record data.
                let (target, end) = read_name(self.bytes, data_offset)?;
                if end > data_offset + length {
                    return Err(ParseError::Truncated {
                        what: "CNAME target",
                        offset: data_offset,
                        len: data_offset + length,
                    });
                }
                RecordData::Cname(target)
            }
            _ => RecordData::Other { record_type },
        };
        // RFC 2181 section 8: a TTL with the top bit set is treated as 0.
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        Ok(Record { name, ttl, data })
    }
}

/// Reads the name starting at `start`. Returns the name (lowercase, labels joined with dots) and
/// the offset just after it in the original position, which is after the first pointer when the
/// name is compressed.
///
/// Every pointer must point strictly before itself, so a run of pointers always moves back and
/// ends. A loop that goes forward again through labels adds their bytes to the name each time,
/// so the 255-byte cap on the name ends it.
fn read_name(bytes: &[u8], start: usize) -> Result<(String, usize), ParseError> {
    let mut name = String::new();
    let mut wire_length = 0usize;
    let mut position = start;
    let mut end = None;
    loop {
        let length = *bytes.get(position).ok_or(ParseError::Truncated {
            what: "name",
            offset: start,
            len: bytes.len(),
        })?;
        match length & 0xc0 {
            0x00 => {}
            0xc0 => {
                let low = *bytes.get(position + 1).ok_or(ParseError::Truncated {
                    what: "compression pointer",
                    offset: position,
                    len: bytes.len(),
                })?;
                let target = usize::from(u16::from_be_bytes([length & 0x3f, low]));
                if target >= position {
                    return Err(ParseError::ForwardPointer { offset: position, target });
                }
                end.get_or_insert(position + 2);
                position = target;
                continue;
            }
            bits => return Err(ParseError::ReservedLabelType { offset: position, bits }),
        }
        let length = usize::from(length);
        wire_length += length + 1;
        if wire_length > MAX_NAME_BYTES {
            return Err(ParseError::NameTooLong { offset: start });
        }
        if length == 0 {
            let end = end.unwrap_or(position + 1);
            return Ok((name, end));
        }
        let label = bytes.get(position + 1..position + 1 + length).ok_or(ParseError::Truncated {
            what: "label",
            offset: position,
            len: bytes.len(),
        })?;
        if !name.is_empty() {
            name.push('.');
        }
        for &byte in label {
            // Bytes outside printable ASCII (and the dot itself) are shown escaped, as
            // `\DDD` in master file format, so a label cannot forge a different name.
            if byte.is_ascii_graphic() && byte != b'.' && byte != b'\\' {
                name.push(char::from(byte.to_ascii_lowercase()));
            } else {
                name.push_str(&format!("\\{byte:03}"));
            }
        }
        position += 1 + length;
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
