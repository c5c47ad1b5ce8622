use super::*;

/// Builds DNS messages for the tests: a header, one question, then answer records.
struct Builder {
    bytes: Vec<u8>,
    answers: u16,
}

impl Builder {
    fn response(question: &str, record_type: u16) -> Builder {
        let mut bytes = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend(encode_name(question));
        bytes.extend(record_type.to_be_bytes());
        bytes.extend(CLASS_IN.to_be_bytes());
        Builder { bytes, answers: 0 }
    }

    /// Appends a record whose owner is the raw wire name `owner`.
    fn record(mut self, owner: &[u8], record_type: u16, ttl: u32, data: &[u8]) -> Builder {
        self.bytes.extend(owner);
        self.bytes.extend(record_type.to_be_bytes());
        self.bytes.extend(CLASS_IN.to_be_bytes());
        self.bytes.extend(ttl.to_be_bytes());
        self.bytes.extend((data.len() as u16).to_be_bytes());
        self.bytes.extend(data);
        self.answers += 1;
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes[6..8].copy_from_slice(&self.answers.to_be_bytes());
        self.bytes
    }
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|label| !label.is_empty()) {
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

/// Pointer to the question name, which starts right after the header.
const QUESTION_POINTER: [u8; 2] = [0xc0, 12];

fn cname_chain_answer() -> Vec<u8> {
    let question_end = 12 + encode_name("www.Example.test").len() + 4;
    let cname_target_offset = question_end + 2 + 10;
    let target = ((0xc000 | cname_target_offset) as u16).to_be_bytes();
    Builder::response("www.Example.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_CNAME, 300, &encode_name("cdn.example.test"))
        .record(&target, TYPE_A, 60, &[198, 18, 7, 10])
        .record(&target, TYPE_AAAA, 120, &"fd00::7".parse::<Ipv6Addr>().unwrap().octets())
        .finish()
}

#[test]
fn answer_with_cname_chain_resolves_question_name() {
    let message = parse(&cname_chain_answer()).unwrap();
    assert_eq!(message.id, 0x1234);
    assert!(message.response);
    assert_eq!(message.question, Some(("www.example.test".to_string(), TYPE_A)));
    assert_eq!(message.answers.len(), 3);
    assert_eq!(message.answers[0].data, RecordData::Cname("cdn.example.test".to_string()));
    assert_eq!(message.incomplete, None);
    assert_eq!(
        message.resolved_addresses(),
        [
            ("198.18.7.10".parse().unwrap(), 60),
            ("fd00::7".parse().unwrap(), 120),
        ]
    );
}

#[test]
fn answer_for_another_name_is_ignored() {
    let bytes = Builder::response("asked.test", TYPE_A)
        .record(&encode_name("other.test"), TYPE_A, 60, &[10, 0, 0, 1])
        .finish();
    let message = parse(&bytes).unwrap();
    assert_eq!(message.answers.len(), 1);
    assert!(message.resolved_addresses().is_empty());
}

#[test]
fn error_response_resolves_nothing() {
    let mut bytes = Builder::response("asked.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_A, 60, &[10, 0, 0, 1])
        .finish();
    bytes[3] |= 3;
    let message = parse(&bytes).unwrap();
    assert_eq!(message.rcode, 3);
    assert!(message.resolved_addresses().is_empty());
}

#[test]
fn query_resolves_nothing() {
    let mut bytes = Builder::response("asked.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_A, 60, &[10, 0, 0, 1])
        .finish();
    bytes[2] &= 0x7f;
    assert!(parse(&bytes).unwrap().resolved_addresses().is_empty());
}

#[test]
fn cname_loop_ends() {
    let bytes = Builder::response("a.test", TYPE_A)
        .record(&encode_name("a.test"), TYPE_CNAME, 60, &encode_name("b.test"))
        .record(&encode_name("b.test"), TYPE_CNAME, 60, &encode_name("a.test"))
        .finish();
    let message = parse(&bytes).unwrap();
    assert!(message.resolved_addresses().is_empty());
}

#[test]
fn pointer_to_itself_is_rejected() {
    let mut bytes = Builder::response("a.test", TYPE_A).finish();
    bytes.truncate(12);
    bytes[4..6].copy_from_slice(&1u16.to_be_bytes());
    bytes.extend([0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(parse(&bytes), Err(ParseError::ForwardPointer { offset: 12, target: 12 }));
}

#[test]
fn pointer_forward_is_rejected() {
    let mut bytes = Builder::response("a.test", TYPE_A).finish();
    bytes.truncate(12);
    bytes[4..6].copy_from_slice(&1u16.to_be_bytes());
    bytes.extend([0xc0, 20, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse(&bytes), Err(ParseError::ForwardPointer { offset: 12, target: 20 }));
}

#[test]
fn loop_through_labels_ends_at_name_limit() {
    // Offset 12: label "a", then a pointer back to offset 12: a loop that only moves back.
    let mut bytes = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    bytes.extend([1, b'a', 0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(parse(&bytes), Err(ParseError::NameTooLong { offset: 12 }));
}

#[test]
fn reserved_label_type_is_rejected() {
    let mut bytes = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    bytes.extend([0x41, b'a', 0, 0, 1, 0, 1]);
    assert_eq!(parse(&bytes), Err(ParseError::ReservedLabelType { offset: 12, bits: 0x40 }));
}

#[test]
fn short_header_is_rejected() {
    assert_eq!(parse(&[0; 11]), Err(ParseError::ShortHeader { len: 11 }));
}

#[test]
fn several_questions_are_rejected() {
    let mut bytes = Builder::response("a.test", TYPE_A).finish();
    bytes[5] = 2;
    assert_eq!(parse(&bytes), Err(ParseError::QuestionCount { count: 2 }));
}

#[test]
fn cut_answer_keeps_records_before_the_cut() {
    let bytes = cname_chain_answer();
    // The last record (AAAA) loses its last byte.
    let message = parse(&bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(message.answers.len(), 2);
    assert!(matches!(
        message.incomplete,
        Some(ParseError::Truncated { what: "record data", .. })
    ));
    assert_eq!(message.resolved_addresses(), [("198.18.7.10".parse().unwrap(), 60)]);
}

#[test]
fn every_prefix_of_an_answer_parses_or_fails_cleanly() {
    let bytes = cname_chain_answer();
    for end in 0..=bytes.len() {
        let result = parse(&bytes[..end]);
        if end == bytes.len() {
            assert_eq!(result.unwrap().answers.len(), 3);
        } else if let Ok(message) = result {
            assert!(message.answers.len() < 3, "prefix of {end} bytes");
        }
    }
}

#[test]
fn announced_records_beyond_the_message_end_cleanly() {
    let mut bytes = Builder::response("a.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_A, 60, &[10, 0, 0, 1])
        .finish();
    bytes[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
    let message = parse(&bytes).unwrap();
    assert_eq!(message.answers.len(), 1);
    assert!(message.incomplete.is_some());
}

#[test]
fn a_record_with_wrong_length_is_not_an_address() {
    let bytes = Builder::response("a.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_A, 60, &[10, 0, 0])
        .finish();
    let message = parse(&bytes).unwrap();
    assert_eq!(message.answers[0].data, RecordData::Other { record_type: TYPE_A });
    assert!(message.resolved_addresses().is_empty());
}

#[test]
fn cname_target_past_its_record_is_rejected() {
    // The record data length says 2, but the name inside runs on past it.
    let bytes = Builder::response("a.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_CNAME, 60, &[1, b'b'])
        .finish();
    let message = parse(&bytes).unwrap();
    assert!(message.answers.is_empty());
    assert!(message.incomplete.is_some());
}

#[test]
fn odd_bytes_in_labels_are_escaped() {
    let bytes = Builder::response("a.test", TYPE_A).finish();
    let mut bytes = bytes[..12].to_vec();
    bytes.extend([3, b'a', b'.', 0, 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
    let message = parse(&bytes).unwrap();
    assert_eq!(message.question, Some(("a\\046\\000.test".to_string(), TYPE_A)));
}

#[test]
fn negative_ttl_counts_as_zero() {
    let bytes = Builder::response("a.test", TYPE_A)
        .record(&QUESTION_POINTER, TYPE_A, 0x8000_0000, &[10, 0, 0, 1])
        .finish();
    assert_eq!(parse(&bytes).unwrap().answers[0].ttl, 0);
}

/// A small xorshift generator, so the fuzz-style tests are repeatable without a dependency.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = (random.next() % 200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
        if let Ok(message) = parse(&bytes) {
            let _ = message.resolved_addresses();
        }
    }
}

#[test]
fn mutated_answers_never_panic() {
    let original = cname_chain_answer();
    let mut random = Xorshift(42);
    for _ in 0..20_000 {
        let mut bytes = original.clone();
        for _ in 0..(random.next() % 4 + 1) {
            let index = (random.next() as usize) % bytes.len();
            bytes[index] = random.next() as u8;
        }
        let cut = (random.next() as usize) % (bytes.len() + 1);
        if let Ok(message) = parse(&bytes[..cut]) {
            for record in &message.answers {
                assert!(record.name.len() <= 4 * MAX_NAME_BYTES, "{record:?}");
            }
            let _ = message.resolved_addresses();
        }
    }
}
