//! The replicated users and roles (etcd's auth store), kept in the state machine so that every
//! replica evaluates permissions against the same definitions at the same log position.
//!
//! Role `root` is built in: it grants every key and the administrative operations. A principal's
//! roles are those named by its token plus those granted to the user of the same name.

use super::mvcc::{Authorizer, ReadView};
use super::{CF_META, Result, Store};
use crate::model::{
    ApplyError, AuthCommand, AuthErrorCode, PermType, Permission, Principal, key_interval,
};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const ROOT: &str = "root";
const ENABLED: &[u8] = b"auth/enabled";
const REVISION: &[u8] = b"auth/rev";
const USER_PREFIX: &[u8] = b"auth/user/";
const ROLE_PREFIX: &[u8] = b"auth/role/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct User {
    pub name: String,
    /// bcrypt hash; None for users created without a password (token-only).
    pub password_hash: Option<String>,
    pub roles: BTreeSet<String>,
    /// The auth revision at which this user was created or last changed password. Tokens a
    /// member issues carry it, and stop working once it changes (or the user is gone).
    pub token_rev: u64,
}

/// A user record as stored before tokens were bound to users.
#[derive(Deserialize)]
struct UserV0 {
    name: String,
    password_hash: Option<String>,
    roles: BTreeSet<String>,
}

fn dec_user(b: &[u8]) -> Result<User> {
    match postcard::from_bytes::<User>(b) {
        Ok(u) => Ok(u),
        Err(_) => {
            let old: UserV0 = dec(b)?;
            Ok(User {
                name: old.name,
                password_hash: old.password_hash,
                roles: old.roles,
                token_rev: 0,
            })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Role {
    pub name: String,
    pub perms: Vec<Permission>,
}

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| super::StorageError::Other(format!("encode: {e}")))
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|_| super::codec::CorruptRecord("auth record").into())
}

fn failed(message: &str) -> ApplyError {
    ApplyError::Auth {
        code: AuthErrorCode::FailedPrecondition,
        message: message.to_string(),
    }
}

fn invalid(message: &str) -> ApplyError {
    ApplyError::Auth {
        code: AuthErrorCode::InvalidArgument,
        message: message.to_string(),
    }
}

/// Read access to the auth state, from a read view or from the live database.
pub trait AuthSource {
    fn auth_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn auth_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    fn enabled(&self) -> Result<bool> {
        Ok(self.auth_meta(ENABLED)?.map(|v| v == [1]).unwrap_or(true))
    }

    fn auth_revision(&self) -> Result<u64> {
        Ok(self
            .auth_meta(REVISION)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1))
    }

    fn user(&self, name: &str) -> Result<Option<User>> {
        self.auth_meta(&user_key(name))?
            .map(|b| dec_user(&b))
            .transpose()
    }

    fn role(&self, name: &str) -> Result<Option<Role>> {
        self.auth_meta(&role_key(name))?
            .map(|b| dec(&b))
            .transpose()
    }

    fn users(&self) -> Result<Vec<String>> {
        Ok(self
            .auth_prefix(USER_PREFIX)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[USER_PREFIX.len()..]).into_owned())
            .collect())
    }

    fn roles(&self) -> Result<Vec<String>> {
        Ok(self
            .auth_prefix(ROLE_PREFIX)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[ROLE_PREFIX.len()..]).into_owned())
            .collect())
    }

    /// What a principal may do now. With role checks disabled (etcd's `auth disable`), every
    /// authenticated principal may do everything.
    fn grants(&self, principal: Option<&Principal>) -> Result<Grants> {
        Ok(AuthSnapshot::load(self)?.grants(principal))
    }

    /// The revision tokens issued to `name` now must carry.
    fn user_token_rev(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.user(name)?.map(|u| u.token_rev))
    }
}

/// The whole auth state in memory: what permission checks consult on every request.
#[derive(Debug, Clone, Default)]
pub struct AuthSnapshot {
    pub enabled: bool,
    /// The auth revision this member has applied.
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

/// Whether a token's user binding still holds on this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStanding {
    Current,
    /// The user was deleted, re-created or given a new password since.
    Revoked,
    /// Issued at an auth revision this member has not applied yet (it is catching up): it can
    /// tell neither way.
    AheadOfThisMember,
}

impl AuthSnapshot {
    pub fn load<S: AuthSource + ?Sized>(src: &S) -> Result<AuthSnapshot> {
        let mut users = BTreeMap::new();
        for (k, v) in src.auth_prefix(USER_PREFIX)? {
            let u: User = dec_user(&v)?;
            users.insert(
                String::from_utf8_lossy(&k[USER_PREFIX.len()..]).into_owned(),
                u,
            );
        }
        let mut roles = BTreeMap::new();
        for (k, v) in src.auth_prefix(ROLE_PREFIX)? {
            let r: Role = dec(&v)?;
            roles.insert(
                String::from_utf8_lossy(&k[ROLE_PREFIX.len()..]).into_owned(),
                r,
            );
        }
        Ok(AuthSnapshot {
            enabled: src.enabled()?,
            revision: src.auth_revision()?,
            users,
            roles,
        })
    }

    /// False for a token issued to a stored user that has since been deleted, re-created or
    /// given a new password: such a token grants nothing.
    pub fn token_current(&self, p: &Principal) -> bool {
        self.token_standing(p) == TokenStanding::Current
    }

    /// As `token_current`, telling a revoked token from one issued at an auth revision this
    /// member has not applied yet.
    pub fn token_standing(&self, p: &Principal) -> TokenStanding {
        match p.user_rev {
            None => TokenStanding::Current,
            Some(rev) if self.users.get(&p.name).is_some_and(|u| u.token_rev == rev) => {
                TokenStanding::Current
            }
            Some(rev) if rev > self.revision => TokenStanding::AheadOfThisMember,
            Some(_) => TokenStanding::Revoked,
        }
    }

    /// The stored user of that name, if any.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn grants(&self, principal: Option<&Principal>) -> Grants {
        let Some(p) = principal else {
            // Internal proposals (no principal) are made by the leader itself; the peer port
            // never accepts a proposal without a caller.
            return Grants::all();
        };
        if !self.token_current(p) {
            return Grants::default();
        }
        if !self.enabled {
            return Grants::all();
        }
        let mut roles: BTreeSet<&str> = p.roles.iter().map(String::as_str).collect();
        if let Some(u) = self.users.get(&p.name) {
            roles.extend(u.roles.iter().map(String::as_str));
        }
        let mut g = Grants::default();
        for r in roles {
            if r == ROOT {
                g.root = true;
                continue;
            }
            if let Some(role) = self.roles.get(r) {
                for perm in &role.perms {
                    let iv = key_interval(&perm.key, &perm.range_end);
                    if matches!(perm.perm_type, PermType::Read | PermType::ReadWrite) {
                        g.read.push(iv.clone());
                    }
                    if matches!(perm.perm_type, PermType::Write | PermType::ReadWrite) {
                        g.write.push(iv);
                    }
                }
            }
        }
        g
    }
}

/// The auth state shared by the state machine (which refreshes it when auth changes) and the
/// API (which checks reads against it).
#[derive(Default)]
pub struct AuthCache {
    current: std::sync::RwLock<std::sync::Arc<AuthSnapshot>>,
}

impl AuthCache {
    pub fn load(store: &Store) -> Result<AuthCache> {
        Ok(AuthCache {
            current: std::sync::RwLock::new(std::sync::Arc::new(AuthSnapshot::load(store)?)),
        })
    }

    pub fn get(&self) -> std::sync::Arc<AuthSnapshot> {
        self.current.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Re-reads the auth state after it changed in the store.
    pub fn reload(&self, store: &Store) -> Result<()> {
        let fresh = std::sync::Arc::new(AuthSnapshot::load(store)?);
        if let Ok(mut g) = self.current.write() {
            *g = fresh;
        }
        Ok(())
    }
}

impl AuthSource for ReadView<'_> {
    fn auth_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.meta(key)
    }
    fn auth_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.meta_prefix(prefix)
    }
}

impl AuthSource for Store {
    fn auth_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get_cf(self.cf(CF_META)?, key)?)
    }
    fn auth_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        super::mvcc::meta_prefix(self, rocksdb::ReadOptions::default(), prefix)
    }
}

type Interval = (Vec<u8>, Option<Vec<u8>>);

/// The key ranges a principal may read and write, and whether it is an administrator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub root: bool,
    read: Vec<Interval>,
    write: Vec<Interval>,
}

impl Grants {
    pub fn all() -> Grants {
        Grants {
            root: true,
            ..Default::default()
        }
    }
}

/// True if the union of `granted` covers `[start, end)` (None = unbounded).
fn covered(granted: &[Interval], start: &[u8], end: Option<&[u8]>) -> bool {
    let mut sorted: Vec<&Interval> = granted.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // Walk the merged intervals looking for one that reaches from `start` to `end`.
    let mut reach: Option<Option<&[u8]>> = None; // Some(None) = unbounded
    let mut reach_start: &[u8] = &[];
    for (s, e) in sorted {
        let e = e.as_deref();
        match reach {
            Some(r) if r.map(|r| s.as_slice() <= r).unwrap_or(true) => {
                // Overlapping or touching: extend.
                let extended = match (r, e) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(if a > b { a } else { b }),
                };
                reach = Some(extended);
            }
            _ => {
                if let Some(r) = reach
                    && reach_start <= start
                    && ends_cover(r, end)
                {
                    return true;
                }
                reach_start = s;
                reach = Some(e);
            }
        }
    }
    match reach {
        Some(r) => reach_start <= start && ends_cover(r, end),
        None => false,
    }
}

fn ends_cover(have: Option<&[u8]>, need: Option<&[u8]>) -> bool {
    match (have, need) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(h), Some(n)) => h >= n,
    }
}

impl Authorizer for Grants {
    fn permits(&self, perm: PermType, key: &[u8], range_end: &[u8]) -> bool {
        if self.root {
            return true;
        }
        let (start, end) = key_interval(key, range_end);
        let granted = match perm {
            PermType::Read => &self.read,
            PermType::Write => &self.write,
            PermType::ReadWrite => {
                return covered(&self.read, &start, end.as_deref())
                    && covered(&self.write, &start, end.as_deref());
            }
        };
        covered(granted, &start, end.as_deref())
    }
}

/// Applies one auth change with etcd's rules, staging it into `batch`.
pub fn apply(
    store: &Store,
    batch: &mut WriteBatch,
    cmd: &AuthCommand,
) -> Result<std::result::Result<(), ApplyError>> {
    let meta = store.cf(CF_META)?;
    let enabled = store.enabled()?;
    let next_rev = store.auth_revision()? + 1;
    let outcome: std::result::Result<(), ApplyError> = match cmd {
        AuthCommand::Enable => match store.user(ROOT)? {
            None => Err(failed("etcdserver: root user does not exist")),
            Some(u) if !u.roles.contains(ROOT) => {
                Err(failed("etcdserver: root user does not have root role"))
            }
            Some(_) => {
                batch.put_cf(meta, ENABLED, [1]);
                Ok(())
            }
        },
        AuthCommand::Disable => {
            batch.put_cf(meta, ENABLED, [0]);
            Ok(())
        }
        AuthCommand::UserAdd {
            name,
            password_hash,
        } => {
            if store.user(name)?.is_some() {
                Err(failed("etcdserver: user name already exists"))
            } else {
                let u = User {
                    name: name.clone(),
                    password_hash: password_hash.clone(),
                    roles: BTreeSet::new(),
                    token_rev: next_rev,
                };
                batch.put_cf(meta, user_key(name), enc(&u)?);
                Ok(())
            }
        }
        AuthCommand::UserDelete { name } => {
            if enabled && name == ROOT {
                Err(invalid("etcdserver: invalid auth management"))
            } else if store.user(name)?.is_none() {
                Err(failed("etcdserver: user name not found"))
            } else {
                batch.delete_cf(meta, user_key(name));
                Ok(())
            }
        }
        AuthCommand::UserChangePassword {
            name,
            password_hash,
        } => match store.user(name)? {
            None => Err(failed("etcdserver: user name not found")),
            Some(mut u) => {
                u.password_hash = Some(password_hash.clone());
                u.token_rev = next_rev;
                batch.put_cf(meta, user_key(name), enc(&u)?);
                Ok(())
            }
        },
        AuthCommand::UserGrantRole { user, role } => match store.user(user)? {
            None => Err(failed("etcdserver: user name not found")),
            Some(mut u) => {
                if role != ROOT && store.role(role)?.is_none() {
                    Err(failed("etcdserver: role name not found"))
                } else {
                    u.roles.insert(role.clone());
                    batch.put_cf(meta, user_key(user), enc(&u)?);
                    Ok(())
                }
            }
        },
        AuthCommand::UserRevokeRole { user, role } => match store.user(user)? {
            None => Err(failed("etcdserver: user name not found")),
            Some(mut u) => {
                if enabled && user == ROOT && role == ROOT {
                    Err(invalid("etcdserver: invalid auth management"))
                } else if !u.roles.remove(role) {
                    Err(failed("etcdserver: role is not granted to the user"))
                } else {
                    batch.put_cf(meta, user_key(user), enc(&u)?);
                    Ok(())
                }
            }
        },
        AuthCommand::RoleAdd { name } => {
            if store.role(name)?.is_some() {
                Err(failed("etcdserver: role name already exists"))
            } else {
                let r = Role {
                    name: name.clone(),
                    perms: vec![],
                };
                batch.put_cf(meta, role_key(name), enc(&r)?);
                Ok(())
            }
        }
        AuthCommand::RoleDelete { name } => {
            if enabled && name == ROOT {
                Err(invalid("etcdserver: invalid auth management"))
            } else if store.role(name)?.is_none() {
                Err(failed("etcdserver: role name not found"))
            } else {
                batch.delete_cf(meta, role_key(name));
                for uname in store.users()? {
                    if let Some(mut u) = store.user(&uname)?
                        && u.roles.remove(name)
                    {
                        batch.put_cf(meta, user_key(&uname), enc(&u)?);
                    }
                }
                Ok(())
            }
        }
        AuthCommand::RoleGrantPermission { name, perm } => match store.role(name)? {
            None => Err(failed("etcdserver: role name not found")),
            Some(mut r) => {
                match r
                    .perms
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(existing) => existing.perm_type = perm.perm_type,
                    None => {
                        r.perms.push(perm.clone());
                        r.perms.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                batch.put_cf(meta, role_key(name), enc(&r)?);
                Ok(())
            }
        },
        AuthCommand::RoleRevokePermission {
            name,
            key,
            range_end,
        } => match store.role(name)? {
            None => Err(failed("etcdserver: role name not found")),
            Some(mut r) => {
                let before = r.perms.len();
                r.perms
                    .retain(|p| !(p.key == *key && p.range_end == *range_end));
                if r.perms.len() == before {
                    Err(failed("etcdserver: permission is not granted to the role"))
                } else {
                    batch.put_cf(meta, role_key(name), enc(&r)?);
                    Ok(())
                }
            }
        },
    };
    if outcome.is_ok() {
        batch.put_cf(meta, REVISION, next_rev.to_be_bytes());
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(k: &str, e: &str) -> Interval {
        key_interval(k.as_bytes(), e.as_bytes())
    }

    #[test]
    fn a_member_behind_the_token_cannot_judge_it_one_ahead_revokes_it() {
        let user = |rev| User {
            name: "alice".into(),
            token_rev: rev,
            ..Default::default()
        };
        let token = |rev| Principal {
            name: "alice".into(),
            roles: Vec::new(),
            user_rev: Some(rev),
        };
        let snapshot = |revision, users: Vec<User>| AuthSnapshot {
            enabled: true,
            revision,
            users: users.into_iter().map(|u| (u.name.clone(), u)).collect(),
            roles: BTreeMap::new(),
        };
        // Issued at auth revision 7 to alice as she then was.
        let current = snapshot(9, vec![user(7)]);
        assert_eq!(current.token_standing(&token(7)), TokenStanding::Current);
        // A later password change (revision 8) or deletion revokes it.
        let changed = snapshot(9, vec![user(8)]);
        assert_eq!(changed.token_standing(&token(7)), TokenStanding::Revoked);
        assert_eq!(
            snapshot(9, vec![]).token_standing(&token(7)),
            TokenStanding::Revoked
        );
        // A member that has applied auth changes only up to revision 5 has not seen alice
        // created, or not in the version the token names: it cannot tell.
        let behind = snapshot(5, vec![]);
        assert_eq!(
            behind.token_standing(&token(7)),
            TokenStanding::AheadOfThisMember
        );
        let older = snapshot(6, vec![user(3)]);
        assert_eq!(
            older.token_standing(&token(7)),
            TokenStanding::AheadOfThisMember
        );
        assert!(!older.token_current(&token(7)));
    }

    #[test]
    fn coverage_merges_adjacent_grants() {
        let g = vec![iv("a", "c"), iv("c", "e")];
        assert!(covered(&g, b"a", Some(b"e")));
        assert!(covered(&g, b"b", Some(b"d")));
        assert!(!covered(&g, b"a", Some(b"f")));
        assert!(!covered(&g, b"0", Some(b"b")));
        let from = vec![iv("m", "\0")];
        assert!(covered(&from, b"x", None));
        assert!(!covered(&from, b"a", None));
        let gap = vec![iv("a", "b"), iv("c", "d")];
        assert!(!covered(&gap, b"a", Some(b"d")));
        assert!(covered(&gap, b"c", Some(b"c\0")));
    }

    #[test]
    fn grants_follow_perm_types() {
        let g = Grants {
            root: false,
            read: vec![iv("app/", "app0")],
            write: vec![iv("app/w/", "app/w0")],
        };
        assert!(g.permits(PermType::Read, b"app/x", b""));
        assert!(!g.permits(PermType::Write, b"app/x", b""));
        assert!(g.permits(PermType::Write, b"app/w/1", b""));
        assert!(!g.permits(PermType::Read, b"other", b""));
        assert!(!g.permits(PermType::Read, b"app/", b"\0"));
        assert!(Grants::all().permits(PermType::Write, b"anything", b"\0"));
    }
}
