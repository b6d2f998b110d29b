//! What the state machine does with one committed proposal: permission checks against the
//! replicated roles, then the etcd operation itself, staged into one atomic write batch.
//!
//! Everything here is deterministic: the same proposal on the same state gives the same batch
//! and the same response on every replica.

use crate::crypto::envelope::Envelope;
use crate::model::{
    ApplyError, ApplyOutput, ApplyResponse, Command, CompareTarget, MAX_LEASE_TTL, PermType,
    Proposal, RequestOp, TxnRequest,
};
use crate::storage::auth_state::{self, AuthSource};
use crate::storage::mvcc::{
    self, Authorizer, Counters, Event, ReadError, Staging, ValueOpener, WriteTxn,
};
use crate::storage::{CF_META, StorageError, Store};
use rocksdb::WriteBatch;
use std::sync::Arc;

const KEY_USAGE_PREFIX: &[u8] = b"enc/usage/";
const KEY_FINGERPRINT_PREFIX: &[u8] = b"enc/fingerprint/";

/// The result of applying one proposal, staged into a batch but not yet written.
pub struct Staged {
    pub counters: Counters,
    pub response: ApplyResponse,
    pub events: Vec<Event>,
    /// Users or roles changed: the auth cache must be reloaded once this is written.
    pub auth_changed: bool,
}

/// Per encryption key: values sealed so far, and whether its fingerprint is recorded.
type KeyUsage = std::collections::HashMap<u32, (u64, Option<[u8; 16]>)>;

/// Applies proposals. Holds what the state machine needs besides the database, including the
/// in-memory copies of state every apply consults (auth, key usage), so applying reads nothing
/// but the keys it changes.
#[derive(Clone)]
pub struct Executor {
    opener: Arc<dyn ValueOpener + Send + Sync>,
    auth: Arc<auth_state::AuthCache>,
    usage: Arc<std::sync::Mutex<KeyUsage>>,
    /// Keys whose usage changed since it was last staged.
    dirty: Arc<std::sync::Mutex<Vec<u32>>>,
    meta: Arc<std::sync::Mutex<mvcc::MetaCache>>,
    /// Whether the cluster has ever sealed a value (0 unknown, 1 no, 2 yes): from then on it
    /// refuses plaintext values.
    encrypted: Arc<std::sync::atomic::AtomicU8>,
}

/// Live keys whose metadata the executor keeps in memory.
const META_CACHE_KEYS: usize = 1 << 20;

impl Executor {
    pub fn new(
        store: &Store,
        opener: Arc<dyn ValueOpener + Send + Sync>,
    ) -> Result<Executor, StorageError> {
        Ok(Executor {
            opener,
            auth: Arc::new(auth_state::AuthCache::load(store)?),
            usage: Arc::default(),
            dirty: Arc::default(),
            meta: Arc::new(std::sync::Mutex::new(mvcc::MetaCache::new(META_CACHE_KEYS))),
            encrypted: Arc::default(),
        })
    }

    pub fn opener(&self) -> &(dyn ValueOpener + Send + Sync) {
        self.opener.as_ref()
    }

    /// The replicated auth state, as of the last applied entry.
    pub fn auth(&self) -> &Arc<auth_state::AuthCache> {
        &self.auth
    }

    /// Re-reads the cached state from the store (after a snapshot replaced it, or auth changed).
    pub fn reload(&self, store: &Store) -> Result<(), StorageError> {
        self.auth.reload(store)?;
        if let Ok(mut u) = self.usage.lock() {
            u.clear();
        }
        if let Ok(mut d) = self.dirty.lock() {
            d.clear();
        }
        if let Ok(mut m) = self.meta.lock() {
            m.clear();
        }
        self.encrypted
            .store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// True once the cluster has recorded an encryption key (it sealed a value).
    fn cluster_encrypted(&self, store: &Store) -> Result<bool, StorageError> {
        use std::sync::atomic::Ordering;
        match self.encrypted.load(Ordering::Relaxed) {
            1 => Ok(false),
            2 => Ok(true),
            _ => {
                let yes = !keys_in_use(store)?.is_empty();
                self.encrypted
                    .store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                Ok(yes)
            }
        }
    }

    /// Refuses a proposal whose values are not what encryption at rest requires: with a key
    /// named, every value and compare operand must be sealed with that key; without one, none
    /// may be sealed, and none may be plaintext once the cluster encrypts. A member enforces
    /// this for what it seals itself, but entries also arrive from other members, so the state
    /// machine decides, identically everywhere.
    fn check_envelopes(
        &self,
        store: &Store,
        proposal: &Proposal,
    ) -> Result<Option<ApplyError>, StorageError> {
        let mut blobs: Vec<&[u8]> = Vec::new();
        sealed_blobs(&proposal.command, &mut blobs);
        if blobs.is_empty() {
            return Ok(None);
        }
        let bad = |m: &str| Ok(Some(ApplyError::Encryption(m.to_string())));
        match &proposal.key {
            Some(k) => {
                for b in blobs {
                    match Envelope::parse(b) {
                        Ok(Envelope::Sealed { key_id, .. }) if key_id == k.id => {}
                        _ => {
                            return bad(&format!(
                                "a value of this request is not sealed with key {} that the                                  request names; refused",
                                k.id
                            ));
                        }
                    }
                }
            }
            None => {
                for b in blobs {
                    match Envelope::parse(b) {
                        Ok(Envelope::Plain(_)) => {}
                        Ok(Envelope::Sealed { .. }) => {
                            return bad("a sealed value must name its key; refused");
                        }
                        Err(_) => return bad("a value of this request is not an envelope"),
                    }
                }
                if self.cluster_encrypted(store)? {
                    return bad(
                        "plaintext values are refused: this cluster encrypts values at rest                          (the member that proposed this has no keyring)",
                    );
                }
            }
        }
        Ok(None)
    }

    /// Values sealed with key `id` and its recorded fingerprint, cached after the first read.
    fn usage_of(&self, store: &Store, id: u32) -> Result<(u64, Option<[u8; 16]>), StorageError> {
        if let Ok(u) = self.usage.lock()
            && let Some(v) = u.get(&id)
        {
            return Ok(*v);
        }
        let v = (key_usage(store, id)?, key_fingerprint(store, id)?);
        if let Ok(mut u) = self.usage.lock() {
            u.insert(id, v);
        }
        Ok(v)
    }

    /// How many values key `id` has sealed (for the usage limit on the write path).
    pub fn sealed_count(&self, store: &Store, id: u32) -> Result<u64, StorageError> {
        Ok(self.usage_of(store, id)?.0)
    }

    /// Whether `cmd` must be staged in a batch of its own: it reads state that entries staged
    /// before it in the same batch would change (leases, history, auth), or changes state that
    /// entries after it must see in the database or the auth cache.
    pub fn needs_own_batch(cmd: &Command) -> bool {
        fn txn(t: &crate::model::TxnRequest) -> bool {
            t.success.iter().chain(t.failure.iter()).any(|op| match op {
                crate::model::RequestOp::Range(r) => r.revision > 0,
                crate::model::RequestOp::Put(p) => p.lease != 0 || p.ignore_lease,
                crate::model::RequestOp::Delete(_) => false,
                crate::model::RequestOp::Txn(inner) => txn(inner),
            })
        }
        match cmd {
            Command::Put(p) => p.lease != 0 || p.ignore_lease,
            Command::Delete(_) => false,
            Command::Txn(t) => txn(t),
            _ => true,
        }
    }

    /// Stages the key-usage counters that changed since the last call.
    pub fn stage_usage(&self, store: &Store, batch: &mut WriteBatch) -> Result<(), StorageError> {
        let ids: Vec<u32> = match self.dirty.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => Vec::new(),
        };
        if ids.is_empty() {
            return Ok(());
        }
        let usage = self
            .usage
            .lock()
            .map_err(|_| StorageError::Other("key usage cache poisoned".into()))?;
        let meta = store.cf(CF_META)?;
        for id in ids {
            if let Some((used, fp)) = usage.get(&id) {
                batch.put_cf(meta, usage_key(id), used.to_be_bytes());
                if let Some(fp) = fp {
                    batch.put_cf(meta, fingerprint_key(id), fp);
                }
            }
        }
        Ok(())
    }

    /// Stages `proposal` on top of `counters` into `staging`. A refusal stages nothing and
    /// carries an error response; only storage failures are errors.
    pub fn stage(
        &self,
        store: &Store,
        counters: Counters,
        staging: &mut Staging,
        proposal: &Proposal,
    ) -> Result<Staged, StorageError> {
        if let Some(k) = &proposal.key
            && let (_, Some(known)) = self.usage_of(store, k.id)?
            && known != k.fingerprint
        {
            return Ok(refused(
                counters,
                ApplyError::Encryption(format!(
                    "the proposing node's encryption key {} differs from the key {} the cluster \
                     recorded; fix that node's keyring",
                    k.id, k.id
                )),
            ));
        }
        if let Some(e) = self.check_envelopes(store, proposal)? {
            return Ok(refused(counters, e));
        }
        let grants = self.auth.get().grants(proposal.principal.as_ref());
        let mut meta = self
            .meta
            .lock()
            .map_err(|_| StorageError::Other("key metadata cache poisoned".into()))?;
        let mut txn =
            WriteTxn::new(store, counters, self.opener.as_ref(), staging).with_meta_cache(&meta);
        let outcome = self.run(store, &mut txn, &grants, proposal);
        let outcome = match outcome {
            Ok(out) => Ok(out),
            Err(ReadError::Refused(e)) => Err(e),
            Err(ReadError::Storage(e)) => return Err(e),
        };
        match outcome {
            Ok(output) => {
                if let Some(k) = &proposal.key {
                    let sealed = sealed_values(&proposal.command);
                    if sealed > 0 {
                        self.encrypted
                            .store(2, std::sync::atomic::Ordering::Relaxed);
                        let (used, _) = self.usage_of(store, k.id)?;
                        if let Ok(mut u) = self.usage.lock() {
                            u.insert(k.id, (used + sealed, Some(k.fingerprint)));
                        }
                        if let Ok(mut d) = self.dirty.lock()
                            && !d.contains(&k.id)
                        {
                            d.push(k.id);
                        }
                    }
                }
                let changes = std::mem::take(&mut txn.meta_changes);
                let (counters, events, overlay) = txn.finish();
                staging.overlay.extend(overlay);
                meta.update(changes);
                Ok(Staged {
                    auth_changed: matches!(proposal.command, Command::Auth(_)),
                    counters,
                    response: ApplyResponse {
                        revision: counters.revision,
                        result: Ok(output),
                    },
                    events,
                })
            }
            Err(e) => Ok(refused(counters, e)),
        }
    }

    fn run(
        &self,
        store: &Store,
        txn: &mut WriteTxn<'_>,
        grants: &auth_state::Grants,
        proposal: &Proposal,
    ) -> Result<ApplyOutput, ReadError> {
        let admin = || -> Result<(), ReadError> {
            if grants.root {
                Ok(())
            } else {
                Err(ApplyError::PermissionDenied.into())
            }
        };
        match &proposal.command {
            cmd @ (Command::Put(_) | Command::Delete(_) | Command::Txn(_)) => {
                if !mvcc::authorize_command(grants, cmd) {
                    return Err(ApplyError::PermissionDenied.into());
                }
                Ok(match cmd {
                    Command::Put(p) => ApplyOutput::Put(txn.put(p)?),
                    Command::Delete(d) => ApplyOutput::Delete(txn.delete(d)?),
                    Command::Txn(t) => ApplyOutput::Txn(txn.txn(t)?),
                    _ => ApplyOutput::None,
                })
            }
            Command::Compact { revision } => {
                admin()?;
                txn.compact(*revision)?;
                Ok(ApplyOutput::Compacted)
            }
            Command::Auth(cmd) => {
                admin()?;
                match auth_state::apply(store, txn.batch, cmd)? {
                    Ok(()) => Ok(ApplyOutput::Auth),
                    Err(e) => Err(e.into()),
                }
            }
            Command::Reencrypt(items) => {
                admin()?;
                let replaced = txn.reencrypt(items)?;
                Ok(ApplyOutput::Reencrypted { replaced })
            }
            Command::LeaseGrant { id, ttl } => {
                if *ttl > MAX_LEASE_TTL || *ttl < 0 {
                    return Err(ApplyError::LeaseTtlTooLarge.into());
                }
                if txn.lease_grant(*id, *ttl)? {
                    Ok(ApplyOutput::LeaseGranted { id: *id, ttl: *ttl })
                } else {
                    Err(ApplyError::LeaseExists.into())
                }
            }
            Command::LeaseRevoke { id } => {
                // Revoking deletes the attached keys: the requester must be allowed to.
                let view = store.read_view()?;
                for key in view.lease_keys(*id)? {
                    if !grants.permits(PermType::Write, &key, b"") {
                        return Err(ApplyError::PermissionDenied.into());
                    }
                }
                drop(view);
                if txn.lease_revoke(*id)? {
                    Ok(ApplyOutput::LeaseRevoked)
                } else {
                    Err(ApplyError::LeaseNotFound.into())
                }
            }
        }
    }
}

/// A refusal: nothing written but the applied marker the caller adds.
fn refused(counters: Counters, e: ApplyError) -> Staged {
    Staged {
        counters,
        response: ApplyResponse {
            revision: counters.revision,
            result: Err(e),
        },
        events: Vec::new(),
        auth_changed: false,
    }
}

/// Every value a command carries that must be an envelope: put values, VALUE compare operands,
/// re-encrypted values (their old form was read from storage and is not checked).
fn sealed_blobs<'a>(cmd: &'a Command, out: &mut Vec<&'a [u8]>) {
    fn txn<'a>(t: &'a TxnRequest, out: &mut Vec<&'a [u8]>) {
        for c in &t.compare {
            if let CompareTarget::Value(v) = &c.target {
                out.push(v);
            }
        }
        for op in t.success.iter().chain(t.failure.iter()) {
            match op {
                RequestOp::Put(p) if !p.ignore_value => out.push(&p.value),
                RequestOp::Txn(inner) => txn(inner, out),
                _ => {}
            }
        }
    }
    match cmd {
        Command::Put(p) if !p.ignore_value => out.push(&p.value),
        Command::Txn(t) => txn(t, out),
        Command::Reencrypt(items) => out.extend(items.iter().map(|i| i.new_value.as_slice())),
        _ => {}
    }
}

/// True if a command carries a value or compare operand that is not sealed.
pub fn carries_plaintext(cmd: &Command) -> bool {
    let mut blobs = Vec::new();
    sealed_blobs(cmd, &mut blobs);
    blobs
        .iter()
        .any(|b| !matches!(Envelope::parse(b), Ok(Envelope::Sealed { .. })))
}

/// How many values a command sealed with the proposal's key (for the per-key usage limit):
/// each one used a nonce.
fn sealed_values(cmd: &Command) -> u64 {
    let mut blobs = Vec::new();
    sealed_blobs(cmd, &mut blobs);
    blobs.len() as u64
}

fn usage_key(id: u32) -> Vec<u8> {
    [KEY_USAGE_PREFIX, &id.to_be_bytes()].concat()
}

fn fingerprint_key(id: u32) -> Vec<u8> {
    [KEY_FINGERPRINT_PREFIX, &id.to_be_bytes()].concat()
}

/// The fingerprint of encryption key `id` as the cluster recorded it when first used.
pub fn key_fingerprint(store: &impl AuthSource, id: u32) -> Result<Option<[u8; 16]>, StorageError> {
    Ok(store
        .auth_meta(&fingerprint_key(id))?
        .and_then(|v| v.try_into().ok()))
}

/// Every key id the cluster has sealed values with, with its recorded fingerprint.
pub fn keys_in_use(store: &impl AuthSource) -> Result<Vec<(u32, [u8; 16])>, StorageError> {
    let mut out = Vec::new();
    for (k, v) in store.auth_prefix(KEY_FINGERPRINT_PREFIX)? {
        let id: [u8; 4] = k[KEY_FINGERPRINT_PREFIX.len()..]
            .try_into()
            .map_err(|_| crate::storage::codec::CorruptRecord("key fingerprint id"))?;
        let fp: [u8; 16] = v
            .as_slice()
            .try_into()
            .map_err(|_| crate::storage::codec::CorruptRecord("key fingerprint"))?;
        out.push((u32::from_be_bytes(id), fp));
    }
    Ok(out)
}

/// How many values have been sealed with encryption key `id`, cluster-wide.
pub fn key_usage(store: &impl AuthSource, id: u32) -> Result<u64, StorageError> {
    Ok(store
        .auth_meta(&usage_key(id))?
        .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keyring, Sealer};
    use crate::model::{PutRequest, SealKey};
    use crate::storage::mvcc::Staging;

    fn stage(
        exec: &Executor,
        store: &Store,
        counters: &mut Counters,
        p: &Proposal,
    ) -> ApplyResponse {
        let mut staging = Staging::default();
        let staged = exec.stage(store, *counters, &mut staging, p).unwrap();
        let mut batch = std::mem::take(&mut staging.batch);
        exec.stage_usage(store, &mut batch).unwrap();
        mvcc::stage_counters(store, &mut batch, *counters, staged.counters).unwrap();
        store.db().write(batch).unwrap();
        *counters = staged.counters;
        staged.response
    }

    fn put(key: &str, value: Vec<u8>) -> Command {
        Command::Put(PutRequest {
            key: key.into(),
            value,
            ..Default::default()
        })
    }

    #[test]
    fn once_a_value_is_sealed_every_replica_refuses_plaintext_and_mislabelled_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ring = Keyring::generate();
        let key = SealKey {
            id: ring.active().id,
            fingerprint: ring.active().fingerprint,
        };
        let sealer = Arc::new(Sealer::new(ring, None, u64::MAX));
        let exec = Executor::new(&store, sealer.clone()).unwrap();
        let mut counters = Counters::load(&store).unwrap();
        let plain = |k: &str| Proposal {
            principal: None,
            key: None,
            command: put(k, crate::crypto::envelope::plain(b"v")),
        };
        // A cluster that never encrypted takes plaintext (encryption can be turned on later).
        assert!(
            stage(&exec, &store, &mut counters, &plain("a"))
                .result
                .is_ok()
        );
        let sealed = Proposal {
            principal: None,
            key: Some(key),
            command: put("b", sealer.seal(b"b", b"v").unwrap()),
        };
        assert!(stage(&exec, &store, &mut counters, &sealed).result.is_ok());
        // From then on, plaintext is refused...
        let r = stage(&exec, &store, &mut counters, &plain("c"));
        assert!(matches!(r.result, Err(ApplyError::Encryption(_))), "{r:?}");
        // ...as is a proposal whose values do not match the key it names...
        let lying = Proposal {
            principal: None,
            key: Some(key),
            command: put("d", crate::crypto::envelope::plain(b"v")),
        };
        let r = stage(&exec, &store, &mut counters, &lying);
        assert!(matches!(r.result, Err(ApplyError::Encryption(_))), "{r:?}");
        // ...and a sealed compare operand counts as sealed, a plain one does not.
        let txn = |operand: Vec<u8>| Proposal {
            principal: None,
            key: Some(key),
            command: Command::Txn(TxnRequest {
                compare: vec![crate::model::Compare {
                    result: crate::model::CompareResult::Equal,
                    target: CompareTarget::Value(operand),
                    key: b"b".to_vec(),
                    range_end: Vec::new(),
                }],
                ..Default::default()
            }),
        };
        let ok = txn(sealer.seal_operand(b"b", b"v").unwrap());
        assert!(stage(&exec, &store, &mut counters, &ok).result.is_ok());
        let bad = txn(crate::crypto::envelope::plain(b"v"));
        assert!(stage(&exec, &store, &mut counters, &bad).result.is_err());
        // The verdict survives a restart of the executor (it is read from the store).
        let exec = Executor::new(&store, sealer).unwrap();
        let r = stage(&exec, &store, &mut counters, &plain("e"));
        assert!(matches!(r.result, Err(ApplyError::Encryption(_))), "{r:?}");
    }
}
