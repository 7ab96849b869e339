//! DATA: turning the dot-stuffed byte stream after `354` into one message.
//!
//! smtp-proto's `DataReceiver` does the delicate part: it ends the message
//! only on `<CRLF>.<CRLF>` (never on a bare `\n.\n` or `\r.\r`, which is
//! how SMTP smuggling hides a second message inside the first) and removes
//! the dot-stuffing. This module adds what an MX must bound: the message
//! size and the length of one line. Once either is exceeded it stops
//! keeping bytes (smtp-proto's `DummyDataReceiver` carries on with the same
//! end-of-data state) and reads on to the terminating dot, so that the
//! client and the session stay in step and the refusal is the reply to
//! this DATA, after which the session goes on normally.

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};

/// Longest data line kept, line ending excluded. RFC 5321 says 1,000
/// octets, but real mail (long HTML lines, unwrapped base64) exceeds it;
/// 1 MiB accepts all of that while still refusing a stream with no line
/// structure at all.
pub const MAX_DATA_LINE: usize = 1024 * 1024;

/// Why a message was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    /// More than `max_message_bytes`: `552 5.3.4`.
    TooLarge,
    /// A line longer than [`MAX_DATA_LINE`]: `500 5.5.2`.
    LineTooLong,
}

/// Receives one message; fed with whatever the socket delivers.
pub struct DataReader {
    receiver: DataReceiver,
    /// Set once a limit is exceeded: from then on bytes are only scanned
    /// for the end of data, never kept.
    discard: Option<(DummyDataReceiver, DataProblem)>,
    message: Vec<u8>,
    max_message_bytes: usize,
    /// Length of the line being received so far (without its line ending).
    line_len: usize,
}

/// What [`DataReader::feed`] found.
#[derive(Debug)]
pub enum Fed {
    /// All bytes were consumed and the end of data is not reached yet.
    NeedMore,
    /// The end of data was reached after `consumed` bytes; the rest of the
    /// input belongs to the next command (pipelining).
    Done {
        consumed: usize,
        result: Result<Vec<u8>, DataProblem>,
    },
}

impl DataReader {
    /// `size_hint` is the SIZE the client declared at MAIL: reserving it up
    /// front means a large message is received into one allocation, never
    /// copied as the vector grows.
    pub fn new(max_message_bytes: usize, size_hint: usize) -> Self {
        let mut receiver = DataReceiver::new();
        // smtp-proto looks for `<CRLF>.` only after a CRLF it has seen, so a
        // message that is empty or starts with a dot-stuffed line would not
        // be recognised. Feeding it the CRLF that ended the DATA command
        // (into a scratch buffer) puts it in the right state.
        let mut scratch = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
        Self {
            receiver,
            discard: None,
            message: Vec::with_capacity(size_hint.min(max_message_bytes)),
            max_message_bytes,
            line_len: 0,
        }
    }

    /// Takes bytes from the socket.
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut rest = bytes.iter();
        if let Some((discard, problem)) = &mut self.discard {
            let done = discard.ingest(&mut rest);
            return if done {
                Fed::Done {
                    consumed: bytes.len() - rest.as_slice().len(),
                    result: Err(*problem),
                }
            } else {
                Fed::NeedMore
            };
        }

        let before = self.message.len();
        let done = self.receiver.ingest(&mut rest, &mut self.message);
        let consumed = bytes.len() - rest.as_slice().len();
        let problem = self.check_limits(before, done);

        match (done, problem) {
            (true, None) => Fed::Done {
                consumed,
                result: Ok(std::mem::take(&mut self.message)),
            },
            (true, Some(problem)) => {
                self.message = Vec::new();
                Fed::Done {
                    consumed,
                    result: Err(problem),
                }
            }
            (false, Some(problem)) => {
                // Free the partial message now: a refused 25 MB message
                // must not stay in memory while the client sends the rest.
                self.message = Vec::new();
                self.discard = Some((DummyDataReceiver::new_data(&self.receiver), problem));
                Fed::NeedMore
            }
            (false, None) => Fed::NeedMore,
        }
    }

    /// Checks what was appended since `before` against the limits.
    fn check_limits(&mut self, before: usize, done: bool) -> Option<DataProblem> {
        if self.message.len() > self.max_message_bytes {
            return Some(DataProblem::TooLarge);
        }
        let appended = &self.message[before..];
        let mut segments = appended.split(|&byte| byte == b'\n').peekable();
        while let Some(segment) = segments.next() {
            let is_last = segments.peek().is_none();
            self.line_len += segment.len();
            if is_last && !(done && segment.is_empty()) {
                // The line is still open: allow one byte for the CR that
                // may be its ending.
                if self.line_len > MAX_DATA_LINE + 1 {
                    return Some(DataProblem::LineTooLong);
                }
            } else {
                let content = self.line_len - usize::from(segment.ends_with(b"\r"));
                if content > MAX_DATA_LINE {
                    return Some(DataProblem::LineTooLong);
                }
                self.line_len = 0;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one by one; returns the outcome and the bytes left over.
    fn receive(chunks: &[&[u8]], max: usize) -> (Result<Vec<u8>, DataProblem>, Vec<u8>) {
        let mut reader = DataReader::new(max, 0);
        for (index, chunk) in chunks.iter().enumerate() {
            if let Fed::Done { consumed, result } = reader.feed(chunk) {
                let mut rest = chunk[consumed..].to_vec();
                for later in &chunks[index + 1..] {
                    rest.extend_from_slice(later);
                }
                return (result, rest);
            }
        }
        panic!("end of data not found");
    }

    #[test]
    fn ends_only_on_crlf_dot_crlf_and_unstuffs() {
        let (message, rest) = receive(
            &[
                b"Subject: x\r\n\r\n..dot\r\n",
                b"a\n.\nb\r.\rc\r\n.",
                b"\r\nQUIT\r\n",
            ],
            1000,
        );
        assert_eq!(
            message.as_deref(),
            Ok(&b"Subject: x\r\n\r\n.dot\r\na\n.\nb\r.\rc\r\n"[..])
        );
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn empty_message_and_leading_dot_line() {
        let (message, _) = receive(&[b".\r\n"], 1000);
        assert_eq!(message, Ok(Vec::new()));
        let (message, _) = receive(&[b"..x\r\n.\r\n"], 1000);
        assert_eq!(message.as_deref(), Ok(&b".x\r\n"[..]));
    }

    #[test]
    fn too_large_is_discarded_to_the_end() {
        let (message, rest) = receive(&[b"0123456789\r\n", b"0123456789\r\n.\r\nNOOP\r\n"], 15);
        assert_eq!(message, Err(DataProblem::TooLarge));
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn line_of_one_mib_passes_one_byte_more_does_not() {
        let mut line = vec![b'a'; MAX_DATA_LINE];
        line.extend_from_slice(b"\r\n.\r\n");
        let (message, _) = receive(&[&line], usize::MAX);
        assert_eq!(message.map(|m| m.len()), Ok(MAX_DATA_LINE + 2));

        let mut line = vec![b'a'; MAX_DATA_LINE + 1];
        line.extend_from_slice(b"\r\n.\r\n");
        let (message, _) = receive(&[&line], usize::MAX);
        assert_eq!(message, Err(DataProblem::LineTooLong));
    }

    #[test]
    fn overlong_line_split_across_reads_is_caught_before_its_end() {
        let chunk = vec![b'a'; 64 * 1024];
        let mut reader = DataReader::new(usize::MAX, 0);
        for _ in 0..17 {
            assert!(matches!(reader.feed(&chunk), Fed::NeedMore));
        }
        assert!(reader.discard.is_some());
        assert!(reader.message.capacity() == 0);
        match reader.feed(b"\r\n.\r\n") {
            Fed::Done { result, .. } => assert_eq!(result, Err(DataProblem::LineTooLong)),
            Fed::NeedMore => panic!("end of data not found"),
        }
    }
}
