//! Byte layouts of what raftkv keeps in RocksDB: the order-preserving encoding of user keys in the
//! history column family, revision keys, and the stored record of one key at one revision.

use crate::model::KeyValue;

/// Errors decoding bytes read from disk; they mean corruption or a foreign database.
#[derive(Debug, thiserror::Error)]
#[error("corrupt record on disk: {0}")]
pub struct CorruptRecord(pub &'static str);

/// Encodes a user key so that encoded keys sort like the raw keys and no encoded key is a prefix
/// of another: 0x00 becomes 0x00 0xff, and the key ends with 0x00 0x01. A revision suffix after
/// it then groups all revisions of one key together, in revision order.
pub fn encode_key(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 2 + 8);
    for &b in key {
        if b == 0 {
            out.extend_from_slice(&[0, 0xff]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Decodes `encode_key` output; returns the key and the number of bytes consumed.
pub fn decode_key(enc: &[u8]) -> Result<(Vec<u8>, usize), CorruptRecord> {
    let mut key = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b == 0 {
            match enc.get(i + 1) {
                Some(0xff) => key.push(0),
                Some(1) => return Ok((key, i + 2)),
                _ => return Err(CorruptRecord("bad key escape")),
            }
            i += 2;
        } else {
            key.push(b);
            i += 1;
        }
    }
    Err(CorruptRecord("unterminated key"))
}

/// History key: encoded user key followed by the big-endian revision.
pub fn history_key(key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 10);
    encode_key(key, &mut out);
    out.extend_from_slice(&(revision as u64).to_be_bytes());
    out
}

/// Splits a history key into the user key and the revision.
pub fn split_history_key(hk: &[u8]) -> Result<(Vec<u8>, i64), CorruptRecord> {
    let (key, used) = decode_key(hk)?;
    let rest = &hk[used..];
    let rev: [u8; 8] = rest
        .try_into()
        .map_err(|_| CorruptRecord("history key revision"))?;
    Ok((key, u64::from_be_bytes(rev) as i64))
}

/// Revision-index key: main revision then sub-revision (the position of a change in its txn).
pub fn revision_key(main: i64, sub: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&(main as u64).to_be_bytes());
    out[8..].copy_from_slice(&sub.to_be_bytes());
    out
}

pub fn split_revision_key(k: &[u8]) -> Result<(i64, u32), CorruptRecord> {
    if k.len() != 12 {
        return Err(CorruptRecord("revision key length"));
    }
    let mut main = [0u8; 8];
    main.copy_from_slice(&k[..8]);
    let mut sub = [0u8; 4];
    sub.copy_from_slice(&k[8..]);
    Ok((u64::from_be_bytes(main) as i64, u32::from_be_bytes(sub)))
}

const TOMBSTONE: u8 = 1;
const HEADER: usize = 1 + 8 * 4;

/// One key at one revision as stored. A tombstone marks the revision at which the key was
/// deleted; it has no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub tombstone: bool,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.value.len());
        out.push(if self.tombstone { TOMBSTONE } else { 0 });
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.lease.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Record, CorruptRecord> {
        if b.len() < HEADER {
            return Err(CorruptRecord("record too short"));
        }
        let num = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[1 + i * 8..1 + (i + 1) * 8]);
            i64::from_be_bytes(a)
        };
        Ok(Record {
            tombstone: b[0] & TOMBSTONE != 0,
            create_revision: num(0),
            mod_revision: num(1),
            version: num(2),
            lease: num(3),
            value: b[HEADER..].to_vec(),
        })
    }

    pub fn into_kv(self, key: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value,
            lease: self.lease,
        }
    }
}

pub fn encode_i64(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_i64(b: &[u8]) -> Result<i64, CorruptRecord> {
    let a: [u8; 8] = b.try_into().map_err(|_| CorruptRecord("integer length"))?;
    Ok(i64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_keys_sort_like_raw_keys_and_are_prefix_free() {
        let keys: Vec<&[u8]> = vec![
            b"", b"\0", b"\0\0", b"\0\x01", b"a", b"a\0", b"a\0b", b"ab", b"b",
        ];
        let mut enc: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| {
                let mut v = Vec::new();
                encode_key(k, &mut v);
                v
            })
            .collect();
        let sorted = enc.clone();
        enc.sort();
        assert_eq!(enc, sorted, "encoding must preserve order");
        for (i, a) in sorted.iter().enumerate() {
            for (j, b) in sorted.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a), "{a:?} is a prefix of {b:?}");
                }
            }
        }
        for k in keys {
            let hk = history_key(k, 42);
            assert_eq!(split_history_key(&hk).unwrap(), (k.to_vec(), 42));
        }
    }

    #[test]
    fn history_keys_order_revisions_within_a_key() {
        assert!(history_key(b"a", 2) < history_key(b"a", 10));
        assert!(history_key(b"a", 999) < history_key(b"a\0", 1));
        assert!(history_key(b"a\0", 999) < history_key(b"aa", 1));
    }

    #[test]
    fn record_roundtrip_and_corruption() {
        let r = Record {
            tombstone: false,
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 0,
            value: b"v".to_vec(),
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        assert!(Record::decode(b"short").is_err());
        assert!(decode_key(b"abc").is_err());
        assert!(decode_key(b"a\0\x07").is_err());
    }
}
