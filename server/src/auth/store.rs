//! Users, roles and the auth switch: the replicated auth state, its changes
//! with etcd's rules and errors (`auth/store.go`), and its records in the
//! `auth` column family.
//!
//! Changes are applied by the state machine, in the same RocksDB batch as
//! the applied index. Readers share an immutable [`AuthView`] (the state plus
//! each user's merged permissions) that is swapped after every change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use prost::Message;
use rocksdb::{WriteBatch, DB};
use tessera_proto::authpb::{permission::Type as PermType, Permission, Role, User, UserAddOptions};
use tessera_proto::etcdserverpb::{
    request_op, AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGrantPermissionRequest,
    AuthRoleRevokePermissionRequest, AuthUserAddRequest, AuthUserChangePasswordRequest,
    AuthUserDeleteRequest, AuthUserGrantRoleRequest, AuthUserRevokeRoleRequest, TxnRequest,
};

use super::perms::UnifiedPerms;
use super::AuthInfo;
use crate::db::CF_AUTH;
use crate::errors::EtcdError;
use crate::mvcc::store::StoreError;

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

const KEY_ENABLED: &[u8] = b"enabled";
const KEY_REVISION: &[u8] = b"revision";
const USER_PREFIX: &[u8] = b"user/";
const ROLE_PREFIX: &[u8] = b"role/";

/// The replicated auth state.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthState {
    pub enabled: bool,
    /// etcd's auth revision: 1 for a new store, +1 for every change.
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
        }
    }
}

/// What applying a change did.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// Nothing (etcd answers success for, e.g., granting a role twice).
    Nothing,
    /// The state changed.
    State,
    /// The state changed and this user's tokens must go (deleted, new password).
    UserCredentials(String),
}

fn has_root_role(u: &User) -> bool {
    u.roles.iter().any(|r| r == ROOT_ROLE)
}

impl AuthState {
    fn bump(&mut self) -> Changed {
        self.revision += 1;
        Changed::State
    }

    pub fn enable(&mut self) -> Result<Changed, EtcdError> {
        if self.enabled {
            return Ok(Changed::Nothing);
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or(EtcdError::RootUserNotExist)?;
        if !has_root_role(root) {
            return Err(EtcdError::RootRoleNotExist);
        }
        // etcd does not move the revision on enable, only on disable.
        self.enabled = true;
        Ok(Changed::State)
    }

    pub fn disable(&mut self) -> Changed {
        if !self.enabled {
            return Changed::Nothing;
        }
        self.enabled = false;
        self.bump()
    }

    /// `r.hashed_password` holds the bcrypt hash (the API layer hashes, so
    /// no password reaches the log).
    pub fn user_add(&mut self, r: &AuthUserAddRequest) -> Result<Changed, EtcdError> {
        if r.name.is_empty() {
            return Err(EtcdError::UserEmpty);
        }
        if self.users.contains_key(&r.name) {
            return Err(EtcdError::UserAlreadyExist);
        }
        let options = r.options.unwrap_or(UserAddOptions { no_password: false });
        let password = if options.no_password {
            Vec::new()
        } else {
            r.hashed_password.as_bytes().to_vec()
        };
        self.users.insert(
            r.name.clone(),
            User {
                name: r.name.as_bytes().to_vec(),
                password,
                roles: Vec::new(),
                options: Some(options),
            },
        );
        Ok(self.bump())
    }

    pub fn user_delete(&mut self, r: &AuthUserDeleteRequest) -> Result<Changed, EtcdError> {
        if self.enabled && r.name == ROOT_USER {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.users.remove(&r.name).ok_or(EtcdError::UserNotFound)?;
        self.bump();
        Ok(Changed::UserCredentials(r.name.clone()))
    }

    pub fn user_change_password(
        &mut self,
        r: &AuthUserChangePasswordRequest,
    ) -> Result<Changed, EtcdError> {
        let user = self.users.get_mut(&r.name).ok_or(EtcdError::UserNotFound)?;
        user.password = r.hashed_password.as_bytes().to_vec();
        self.bump();
        Ok(Changed::UserCredentials(r.name.clone()))
    }

    pub fn user_grant_role(&mut self, r: &AuthUserGrantRoleRequest) -> Result<Changed, EtcdError> {
        if !self.users.contains_key(&r.user) {
            return Err(EtcdError::UserNotFound);
        }
        // The root role may be granted before anyone created it.
        if r.role != ROOT_ROLE && !self.roles.contains_key(&r.role) {
            return Err(EtcdError::RoleNotFound);
        }
        let user = self.users.get_mut(&r.user).ok_or(EtcdError::UserNotFound)?;
        match user.roles.binary_search(&r.role) {
            Ok(_) => Ok(Changed::Nothing),
            Err(at) => {
                user.roles.insert(at, r.role.clone());
                Ok(self.bump())
            }
        }
    }

    pub fn user_revoke_role(
        &mut self,
        r: &AuthUserRevokeRoleRequest,
    ) -> Result<Changed, EtcdError> {
        if self.enabled && r.name == ROOT_USER && r.role == ROOT_ROLE {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(&r.name).ok_or(EtcdError::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|role| *role != r.role);
        if user.roles.len() == before {
            return Err(EtcdError::RoleNotGranted);
        }
        Ok(self.bump())
    }

    pub fn role_add(&mut self, r: &AuthRoleAddRequest) -> Result<Changed, EtcdError> {
        if r.name.is_empty() {
            return Err(EtcdError::RoleEmpty);
        }
        if self.roles.contains_key(&r.name) {
            return Err(EtcdError::RoleAlreadyExist);
        }
        self.roles.insert(
            r.name.clone(),
            Role {
                name: r.name.as_bytes().to_vec(),
                key_permission: Vec::new(),
            },
        );
        Ok(self.bump())
    }

    pub fn role_delete(&mut self, r: &AuthRoleDeleteRequest) -> Result<Changed, EtcdError> {
        if self.enabled && r.role == ROOT_ROLE {
            return Err(EtcdError::InvalidAuthMgmt);
        }
        self.roles.remove(&r.role).ok_or(EtcdError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|role| *role != r.role);
        }
        Ok(self.bump())
    }

    pub fn role_grant_permission(
        &mut self,
        r: &AuthRoleGrantPermissionRequest,
    ) -> Result<Changed, EtcdError> {
        let perm = r.perm.as_ref().ok_or(EtcdError::PermissionNotGiven)?;
        let role = self.roles.get_mut(&r.name).ok_or(EtcdError::RoleNotFound)?;
        // etcd looks only at the first permission whose key is >= the new one.
        let at = role
            .key_permission
            .partition_point(|p| p.key.as_slice() < perm.key.as_slice());
        match role.key_permission.get_mut(at) {
            Some(p) if p.key == perm.key && p.range_end == perm.range_end => {
                p.perm_type = perm.perm_type;
            }
            _ => {
                role.key_permission.push(Permission {
                    perm_type: perm.perm_type,
                    key: perm.key.clone(),
                    range_end: perm.range_end.clone(),
                });
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        Ok(self.bump())
    }

    pub fn role_revoke_permission(
        &mut self,
        r: &AuthRoleRevokePermissionRequest,
    ) -> Result<Changed, EtcdError> {
        let role = self.roles.get_mut(&r.role).ok_or(EtcdError::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
        if role.key_permission.len() == before {
            return Err(EtcdError::PermissionNotGranted);
        }
        Ok(self.bump())
    }

    /// etcd's `Authenticate` at apply time: the user must still exist and
    /// have a password (the password itself was checked by the API layer).
    pub fn check_authenticate(&self, name: &str) -> Result<(), EtcdError> {
        if !self.enabled {
            return Err(EtcdError::AuthNotEnabled);
        }
        let user = self.users.get(name).ok_or(EtcdError::AuthFailed)?;
        if user.options.is_some_and(|o| o.no_password) {
            return Err(EtcdError::AuthFailed);
        }
        Ok(())
    }
}

/// An immutable snapshot of the auth state for permission checks.
#[derive(Debug, Default)]
pub struct AuthView {
    pub state: AuthState,
    perms: HashMap<String, UnifiedPerms>,
}

impl AuthView {
    fn new(state: AuthState) -> AuthView {
        let perms = state
            .users
            .iter()
            .map(|(name, u)| {
                let roles = u.roles.iter().filter_map(|r| state.roles.get(r));
                (name.clone(), UnifiedPerms::of(roles))
            })
            .collect();
        AuthView { state, perms }
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// etcd's `isOpPermitted`: may `who` access `key`..`range_end` with `want`?
    pub fn check(
        &self,
        who: Option<&AuthInfo>,
        key: &[u8],
        range_end: &[u8],
        want: PermType,
    ) -> Result<(), EtcdError> {
        if !self.state.enabled {
            return Ok(());
        }
        let Some(who) = who.filter(|w| w.revision != 0) else {
            return Err(EtcdError::UserEmpty);
        };
        if who.revision < self.state.revision {
            return Err(EtcdError::AuthOldRevision);
        }
        let Some(user) = self.state.users.get(&who.username) else {
            return Err(EtcdError::PermissionDenied);
        };
        if has_root_role(user) {
            return Ok(());
        }
        match self.perms.get(&who.username) {
            Some(p) if p.allows(key, range_end, want) => Ok(()),
            _ => Err(EtcdError::PermissionDenied),
        }
    }

    /// etcd's `requireAuthInfo`: with auth on, the request must come from a
    /// known user (a valid token, or a client certificate's common name
    /// with `--client-cert-auth`); no permission is checked.
    pub fn check_authenticated(&self, who: Option<&AuthInfo>) -> Result<(), EtcdError> {
        if !self.state.enabled {
            return Ok(());
        }
        let Some(who) = who.filter(|w| !w.username.is_empty()) else {
            return Err(EtcdError::UserEmpty);
        };
        if self.state.users.contains_key(&who.username) {
            Ok(())
        } else {
            Err(EtcdError::UserNotFound)
        }
    }

    /// etcd's `IsAdminPermitted`: `who` has the root role.
    pub fn check_admin(&self, who: Option<&AuthInfo>) -> Result<(), EtcdError> {
        if !self.state.enabled {
            return Ok(());
        }
        let Some(who) = who.filter(|w| !w.username.is_empty()) else {
            return Err(EtcdError::UserEmpty);
        };
        let user = self
            .state
            .users
            .get(&who.username)
            .ok_or(EtcdError::UserNotFound)?;
        if has_root_role(user) {
            Ok(())
        } else {
            Err(EtcdError::PermissionDenied)
        }
    }

    /// etcd's `checkTxnAuth`: compares need read access; the operations of both
    /// branches need what they do. Nested transactions are checked too (etcd
    /// 3.4 skips them, which lets a nested txn bypass permissions).
    pub fn check_txn(&self, who: Option<&AuthInfo>, t: &TxnRequest) -> Result<(), EtcdError> {
        for c in &t.compare {
            self.check(who, &c.key, &c.range_end, PermType::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    self.check(who, &r.key, &r.range_end, PermType::Read)?
                }
                Some(request_op::Request::RequestPut(p)) => {
                    self.check(who, &p.key, &[], PermType::Write)?;
                    // prev_kv reads the key (etcd fixed this for txns in
                    // 3.5.30); a put's lease is checked when applied.
                    if p.prev_kv {
                        self.check(who, &p.key, &[], PermType::Read)?;
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    if d.prev_kv {
                        self.check(who, &d.key, &d.range_end, PermType::Read)?;
                    }
                    self.check(who, &d.key, &d.range_end, PermType::Write)?
                }
                Some(request_op::Request::RequestTxn(inner)) => self.check_txn(who, inner)?,
                None => {}
            }
        }
        Ok(())
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.state
            .users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }
}

/// The auth state shared by the state machine (writer) and the services
/// (readers).
pub struct AuthStore {
    view: RwLock<Arc<AuthView>>,
}

impl AuthStore {
    pub fn load(db: &DB) -> Result<AuthStore, StoreError> {
        Ok(AuthStore {
            view: RwLock::new(Arc::new(AuthView::new(load_state(db)?))),
        })
    }

    /// Reads the state again (after a snapshot replaced the database).
    pub fn reload(&self, db: &DB) -> Result<(), StoreError> {
        self.publish(load_state(db)?);
        Ok(())
    }

    pub fn view(&self) -> Arc<AuthView> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `state` (already committed to RocksDB) what readers see.
    pub fn publish(&self, state: AuthState) {
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(AuthView::new(state));
    }
}

fn cf(db: &DB) -> Result<&rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(CF_AUTH)
        .ok_or(StoreError::MissingColumnFamily(CF_AUTH))
}

fn prefixed(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes()].concat()
}

fn load_state(db: &DB) -> Result<AuthState, StoreError> {
    let cf = cf(db)?;
    let mut state = AuthState::default();
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k == KEY_ENABLED {
            state.enabled = v == [1];
        } else if k == KEY_REVISION {
            let bytes: [u8; 8] = v
                .try_into()
                .map_err(|_| StoreError::Corrupt("auth revision is not 8 bytes".into()))?;
            state.revision = u64::from_be_bytes(bytes);
        } else if let Some(name) = k.strip_prefix(USER_PREFIX) {
            state
                .users
                .insert(String::from_utf8_lossy(name).into_owned(), User::decode(v)?);
        } else if let Some(name) = k.strip_prefix(ROLE_PREFIX) {
            state
                .roles
                .insert(String::from_utf8_lossy(name).into_owned(), Role::decode(v)?);
        }
        it.next();
    }
    it.status()?;
    Ok(state)
}

/// Writes into `batch` what turns `old` into `new` on disk.
pub fn stage(
    db: &DB,
    batch: &mut WriteBatch,
    old: &AuthState,
    new: &AuthState,
) -> Result<(), StoreError> {
    let cf = cf(db)?;
    if old.enabled != new.enabled {
        batch.put_cf(cf, KEY_ENABLED, [u8::from(new.enabled)]);
    }
    if old.revision != new.revision {
        batch.put_cf(cf, KEY_REVISION, new.revision.to_be_bytes());
    }
    for (name, user) in &new.users {
        if old.users.get(name) != Some(user) {
            batch.put_cf(cf, prefixed(USER_PREFIX, name), user.encode_to_vec());
        }
    }
    for name in old.users.keys().filter(|n| !new.users.contains_key(*n)) {
        batch.delete_cf(cf, prefixed(USER_PREFIX, name));
    }
    for (name, role) in &new.roles {
        if old.roles.get(name) != Some(role) {
            batch.put_cf(cf, prefixed(ROLE_PREFIX, name), role.encode_to_vec());
        }
    }
    for name in old.roles.keys().filter(|n| !new.roles.contains_key(*n)) {
        batch.delete_cf(cf, prefixed(ROLE_PREFIX, name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, revision: u64) -> AuthInfo {
        AuthInfo {
            username: name.into(),
            revision,
        }
    }

    fn grant(role: &str, key: &str, end: &str, t: PermType) -> AuthRoleGrantPermissionRequest {
        AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(Permission {
                perm_type: t as i32,
                key: key.into(),
                range_end: end.into(),
            }),
        }
    }

    /// etcd's usual setup: root with the root role, alice with a role on /a/.
    fn setup() -> AuthState {
        let mut s = AuthState::default();
        for name in ["root", "alice"] {
            s.user_add(&AuthUserAddRequest {
                name: name.into(),
                hashed_password: "hash".into(),
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(s.enable(), Err(EtcdError::RootRoleNotExist));
        s.user_grant_role(&AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        })
        .unwrap();
        s.role_add(&AuthRoleAddRequest { name: "a".into() })
            .unwrap();
        s.role_grant_permission(&grant("a", "/a/", "/a0", PermType::Readwrite))
            .unwrap();
        s.user_grant_role(&AuthUserGrantRoleRequest {
            user: "alice".into(),
            role: "a".into(),
        })
        .unwrap();
        assert_eq!(s.enable(), Ok(Changed::State));
        s
    }

    #[test]
    fn permissions_follow_roles_and_revisions() {
        let s = setup();
        let rev = s.revision;
        let v = AuthView::new(s.clone());
        let read = PermType::Read;
        assert_eq!(v.check(Some(&who("root", rev)), b"/x", b"", read), Ok(()));
        assert_eq!(
            v.check(Some(&who("alice", rev)), b"/a/1", b"", read),
            Ok(())
        );
        assert_eq!(
            v.check(Some(&who("alice", rev)), b"/b", b"", read),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(v.check(None, b"/a/1", b"", read), Err(EtcdError::UserEmpty));
        assert_eq!(
            v.check(Some(&who("alice", rev - 1)), b"/a/1", b"", read),
            Err(EtcdError::AuthOldRevision)
        );
        assert_eq!(
            v.check(Some(&who("mallory", rev)), b"/a/1", b"", read),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(v.check_admin(Some(&who("root", 0))), Ok(()));
        assert_eq!(
            v.check_admin(Some(&who("alice", rev))),
            Err(EtcdError::PermissionDenied)
        );
        assert_eq!(
            v.check_admin(Some(&who("bob", rev))),
            Err(EtcdError::UserNotFound)
        );
        assert_eq!(v.check_admin(None), Err(EtcdError::UserEmpty));
        // Everything is allowed while auth is off.
        let mut off = s;
        off.disable();
        let v = AuthView::new(off);
        assert_eq!(v.check(None, b"/b", b"", read), Ok(()));
    }

    #[test]
    fn management_errors_are_etcds() {
        let mut s = setup();
        let rev = s.revision;
        assert_eq!(
            s.user_delete(&AuthUserDeleteRequest {
                name: "root".into()
            }),
            Err(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(
            s.user_revoke_role(&AuthUserRevokeRoleRequest {
                name: "root".into(),
                role: "root".into()
            }),
            Err(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(
            s.role_delete(&AuthRoleDeleteRequest {
                role: "root".into()
            }),
            Err(EtcdError::InvalidAuthMgmt)
        );
        assert_eq!(
            s.user_add(&AuthUserAddRequest {
                name: "alice".into(),
                ..Default::default()
            }),
            Err(EtcdError::UserAlreadyExist)
        );
        assert_eq!(
            s.user_add(&AuthUserAddRequest::default()),
            Err(EtcdError::UserEmpty)
        );
        assert_eq!(
            s.role_add(&AuthRoleAddRequest { name: "a".into() }),
            Err(EtcdError::RoleAlreadyExist)
        );
        assert_eq!(
            s.user_grant_role(&AuthUserGrantRoleRequest {
                user: "alice".into(),
                role: "nope".into()
            }),
            Err(EtcdError::RoleNotFound)
        );
        assert_eq!(
            s.user_grant_role(&AuthUserGrantRoleRequest {
                user: "alice".into(),
                role: "a".into()
            }),
            Ok(Changed::Nothing),
            "granting twice succeeds and changes nothing"
        );
        assert_eq!(
            s.user_revoke_role(&AuthUserRevokeRoleRequest {
                name: "alice".into(),
                role: "nope".into()
            }),
            Err(EtcdError::RoleNotGranted)
        );
        assert_eq!(
            s.role_revoke_permission(&AuthRoleRevokePermissionRequest {
                role: "a".into(),
                key: b"/a/".to_vec(),
                range_end: vec![],
            }),
            Err(EtcdError::PermissionNotGranted)
        );
        assert_eq!(s.revision, rev, "failed changes leave the revision");
        // Deleting a role takes it from its users.
        s.role_delete(&AuthRoleDeleteRequest { role: "a".into() })
            .unwrap();
        assert!(s.users["alice"].roles.is_empty());
        assert_eq!(s.revision, rev + 1);
        assert_eq!(
            s.user_delete(&AuthUserDeleteRequest {
                name: "alice".into()
            }),
            Ok(Changed::UserCredentials("alice".into()))
        );
    }

    #[test]
    fn regranting_a_permission_updates_its_type() {
        let mut s = setup();
        s.role_grant_permission(&grant("a", "/a/", "/a0", PermType::Read))
            .unwrap();
        s.role_grant_permission(&grant("a", "/0", "", PermType::Write))
            .unwrap();
        let perms = &s.roles["a"].key_permission;
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"/0");
        assert_eq!(perms[1].perm_type, PermType::Read as i32);
    }

    #[test]
    fn state_round_trips_through_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        assert_eq!(load_state(&db).unwrap(), AuthState::default());
        let s = setup();
        let mut batch = WriteBatch::default();
        stage(&db, &mut batch, &AuthState::default(), &s).unwrap();
        db.write(batch).unwrap();
        assert_eq!(load_state(&db).unwrap(), s);
        let mut t = s.clone();
        t.role_delete(&AuthRoleDeleteRequest { role: "a".into() })
            .unwrap();
        t.user_delete(&AuthUserDeleteRequest {
            name: "alice".into(),
        })
        .unwrap();
        t.disable();
        let mut batch = WriteBatch::default();
        stage(&db, &mut batch, &s, &t).unwrap();
        db.write(batch).unwrap();
        assert_eq!(load_state(&db).unwrap(), t);
    }
}
