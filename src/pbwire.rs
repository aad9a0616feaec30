//! Editing protobuf messages field by field on the wire, so that a request the
//! shim changes keeps every field it does not touch byte for byte, including
//! fields of newer CRI versions that `proto/cri.proto` does not declare.

use bytes::Buf;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a field runs past the end of the message")]
    Truncated,
    #[error("groups (deprecated wire types 3 and 4) are not supported")]
    Group,
}

/// A message as its list of fields, each kept as it was encoded.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    fields: Vec<(u32, Vec<u8>)>,
}

impl Fields {
    pub fn parse(mut b: &[u8]) -> Result<Fields, WireError> {
        let mut fields = Vec::new();
        while b.has_remaining() {
            let start = b;
            let (number, wire) = decode_key(&mut b)?;
            match wire {
                WireType::Varint => drop(decode_varint(&mut b)?),
                WireType::SixtyFourBit => skip(&mut b, 8)?,
                WireType::ThirtyTwoBit => skip(&mut b, 4)?,
                WireType::LengthDelimited => {
                    let n = decode_varint(&mut b)? as usize;
                    skip(&mut b, n)?;
                }
                WireType::StartGroup | WireType::EndGroup => return Err(WireError::Group),
            }
            let len = start.len() - b.len();
            fields.push((number, start[..len].to_vec()));
        }
        Ok(Fields { fields })
    }

    /// The payloads of every length-delimited field `number` (a repeated
    /// field's values), in order.
    pub fn all(&self, number: u32) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| *n == number)
            .filter_map(|(_, raw)| {
                let mut b = raw.as_slice();
                match decode_key(&mut b).ok()? {
                    (_, WireType::LengthDelimited) => {
                        let n = decode_varint(&mut b).ok()? as usize;
                        b.get(..n)
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// The payload of the last length-delimited field `number` (the one a
    /// decoder keeps for a singular field).
    pub fn get(&self, number: u32) -> Option<&[u8]> {
        self.all(number).pop()
    }

    /// The field numbers, in the order they were encoded.
    pub fn numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.fields.iter().map(|(n, _)| *n)
    }

    /// Replaces every field `number` with one varint.
    pub fn set_varint(&mut self, number: u32, value: u64) {
        self.remove(number);
        let mut raw = Vec::with_capacity(11);
        encode_key(number, WireType::Varint, &mut raw);
        encode_varint(value, &mut raw);
        self.fields.push((number, raw));
    }

    pub fn remove(&mut self, number: u32) {
        self.fields.retain(|(n, _)| *n != number);
    }

    /// Appends a length-delimited field (a string, bytes or a message).
    pub fn push(&mut self, number: u32, payload: &[u8]) {
        let mut raw = Vec::with_capacity(payload.len() + 6);
        encode_key(number, WireType::LengthDelimited, &mut raw);
        encode_varint(payload.len() as u64, &mut raw);
        raw.extend_from_slice(payload);
        self.fields.push((number, raw));
    }

    pub fn push_message(&mut self, number: u32, m: &impl prost::Message) {
        self.push(number, &m.encode_to_vec());
    }

    /// Replaces every field `number` with these length-delimited values.
    pub fn set(&mut self, number: u32, payloads: &[&[u8]]) {
        self.remove(number);
        for p in payloads {
            self.push(number, p);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        self.fields
            .iter()
            .flat_map(|(_, raw)| raw.iter().copied())
            .collect()
    }
}

fn skip(b: &mut &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        return Err(WireError::Truncated);
    }
    b.advance(n);
    Ok(())
}

/// A gRPC length-prefixed message (RFC: gRPC over HTTP/2): its body, if `frame`
/// is exactly one uncompressed message.
pub fn grpc_message(frame: &[u8]) -> Option<&[u8]> {
    let (head, body) = (frame.get(..5)?, frame.get(5..)?);
    let len = u32::from_be_bytes(head[1..5].try_into().ok()?) as usize;
    (head[0] == 0 && body.len() == len).then_some(body)
}

/// `msg` as one uncompressed gRPC length-prefixed message.
pub fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn untouched_fields_survive_and_replaced_ones_decode() {
        let cfg = crate::cri::ContainerConfig {
            command: vec!["/bin/a".into()],
            args: vec!["x".into()],
            working_dir: "/w".into(),
            log_path: "c.log".into(),
            ..Default::default()
        };
        let mut wire = cfg.encode_to_vec();
        // A field no CRI version defines (99), and a varint and fixed fields.
        wire.extend([
            0x9a, 0x06, 0x02, b'h', b'i', 0xa0, 0x06, 0x2a, 0xad, 0x06, 1, 2, 3, 4,
        ]);
        let mut f = Fields::parse(&wire).unwrap();
        f.set(3, &[b"/bin/b", b"-v"]);
        f.remove(4);
        let out = f.encode();
        let back = crate::cri::ContainerConfig::decode(out.as_slice()).unwrap();
        assert_eq!(back.command, ["/bin/b", "-v"]);
        assert!(back.args.is_empty());
        assert_eq!(
            (back.working_dir.as_str(), back.log_path.as_str()),
            ("/w", "c.log")
        );
        let tail = [
            0x9a, 0x06, 0x02, b'h', b'i', 0xa0, 0x06, 0x2a, 0xad, 0x06, 1, 2, 3, 4,
        ];
        assert!(
            out.windows(tail.len()).any(|w| w == tail),
            "unknown fields lost"
        );
        assert_eq!(Fields::parse(&out).unwrap().get(5), Some(&b"/w"[..]));
        assert!(Fields::parse(&[0x0a, 0x05, b'a']).is_err());
    }

    #[test]
    fn grpc_framing_round_trips() {
        let f = grpc_frame(b"abc");
        assert_eq!(grpc_message(&f), Some(&b"abc"[..]));
        assert_eq!(grpc_message(&f[..6]), None);
        let mut compressed = f.clone();
        compressed[0] = 1;
        assert_eq!(grpc_message(&compressed), None);
    }
}
