//! Entry points for fuzzers: each takes arbitrary bytes from a hostile party and must refuse
//! them cleanly, never panic, hang or allocate without bound. `fuzz/` wraps them for
//! cargo-fuzz; the test suite runs them for a bounded time over mutated inputs.

use crate::api::{convert, validate};
use crate::consensus::MembershipChange;
use crate::consensus::types::{decode, encode};
use crate::crypto::envelope::Envelope;
use crate::crypto::{DEFAULT_KEY_USAGE_LIMIT, Keyring, Sealer};
use crate::model::{Credential, Proposal};
use std::sync::LazyLock;

fn jwt_config() -> Option<crate::auth::jwt::JwtConfig> {
    let path = std::env::temp_dir().join(format!("raftkv-fuzz-secret-{}", std::process::id()));
    std::fs::write(&path, "fuzz-secret-0123456789abcdef0123456789").ok()?;
    Some(crate::auth::jwt::JwtConfig {
        hs256_secret_file: Some(path),
        leeway_seconds: 5,
        token_ttl: std::time::Duration::from_secs(600),
        ..Default::default()
    })
}

static VERIFIER: LazyLock<Option<crate::auth::jwt::TokenVerifier>> =
    LazyLock::new(|| crate::auth::jwt::TokenVerifier::new(&jwt_config()?).ok());

static SEALER: LazyLock<Sealer> =
    LazyLock::new(|| Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT));

/// Token parsing and verification.
pub fn token(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::auth::jwt::header_alg(s);
        if let Some(v) = VERIFIER.as_ref() {
            let _ = v.verify(s);
        }
    }
}

/// Stored-value envelopes: opening a value that does not authenticate must fail.
pub fn envelope(data: &[u8]) {
    let _ = Envelope::parse(data);
    if SEALER.open(b"key", data).is_ok() || SEALER.open_operand(b"key", data).is_ok() {
        assert!(
            matches!(Envelope::parse(data), Ok(Envelope::Plain(_))),
            "a forged sealed value opened"
        );
    }
}

/// Every message the peer port decodes from a member, and what the leader then checks.
pub fn peer_frame(data: &[u8]) {
    if let Ok((_, credential, proposal)) = decode::<(u64, Option<Credential>, Proposal)>(data) {
        let _ = crate::apply::carries_plaintext(&proposal.command);
        let _ = credential;
    }
    let _ = decode::<(Option<Credential>, MembershipChange)>(data);
    crate::consensus::decode_raft_messages(data);
}

/// A client's transaction through decoding, conversion and the admission checks.
pub fn txn_validator(data: &[u8]) {
    use prost::Message;
    let Ok(pb) = raftkv_proto::etcdserverpb::TxnRequest::decode(data) else {
        return;
    };
    if let Ok(t) = convert::txn_in(pb) {
        let _ = validate::check_txn(&t, 128, 1024);
        let _ = crate::storage::mvcc::txn_total_ops(&t);
    }
}

/// Valid inputs for each target, for a mutating fuzzer to start from.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    use crate::model::*;
    match target {
        "token" => jwt_config()
            .and_then(|c| crate::auth::jwt::TokenIssuer::new(&c).ok().flatten())
            .and_then(|i| i.issue("alice", &["reader".into()], None).ok())
            .map(|t| vec![t.into_bytes()])
            .unwrap_or_default(),
        "envelope" => {
            // Well-formed envelopes under another key with the same id: everything but the
            // key is right, so only authentication stands between them and being opened.
            let other = Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT);
            vec![
                other.seal(b"key", b"value").unwrap_or_default(),
                other.seal_operand(b"key", b"operand").unwrap_or_default(),
                crate::crypto::envelope::plain(b"plain"),
            ]
        }
        "peer_frame" => {
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal,
                    target: CompareTarget::Value(crate::crypto::envelope::plain(b"v")),
                    key: b"k".to_vec(),
                    range_end: Vec::new(),
                }],
                success: vec![RequestOp::Txn(TxnRequest {
                    success: vec![RequestOp::Put(PutRequest {
                        key: b"k".to_vec(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    })],
                    ..Default::default()
                })],
                failure: vec![RequestOp::Range(RangeRequest {
                    key: b"a".to_vec(),
                    range_end: vec![0],
                    ..Default::default()
                })],
            };
            let proposal = Proposal {
                principal: Some(Principal {
                    name: "root".into(),
                    roles: vec!["root".into()],
                    user_rev: Some(3),
                }),
                key: None,
                command: Command::Txn(txn),
            };
            let change = MembershipChange::Remove { id: 3 };
            [
                encode(&(1u64, Some(Credential::Token("t".into())), &proposal)),
                encode(&(Some(Credential::Certificate("cn".into())), &change)),
            ]
            .into_iter()
            .filter_map(Result::ok)
            .collect()
        }
        "txn_validator" => {
            use prost::Message;
            use raftkv_proto::etcdserverpb as pb;
            let put = |k: &str| pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: k.into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })),
            };
            let t = pb::TxnRequest {
                compare: vec![pb::Compare {
                    key: b"k".to_vec(),
                    target: pb::compare::CompareTarget::Value as i32,
                    target_union: Some(pb::compare::TargetUnion::Value(b"v".to_vec())),
                    ..Default::default()
                }],
                success: vec![
                    put("a"),
                    pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                            success: vec![put("b")],
                            failure: vec![put("b")],
                            ..Default::default()
                        })),
                    },
                ],
                failure: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(
                        pb::DeleteRangeRequest {
                            key: b"a".to_vec(),
                            range_end: b"z".to_vec(),
                            ..Default::default()
                        },
                    )),
                }],
            };
            vec![t.encode_to_vec()]
        }
        _ => Vec::new(),
    }
}

/// A fuzz target: takes any bytes.
pub type Target = fn(&[u8]);

/// The targets by name, for the bounded runs in the test suite.
pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("envelope", envelope),
    ("peer_frame", peer_frame),
    ("txn_validator", txn_validator),
];
