//! The auth side of applying a command, as etcd's `authApplierV3`: the
//! permission checks made for the requester named in the command, and the
//! auth management commands themselves.

use tessera_proto::etcdserverpb::{AuthenticateResponse, PutRequest};
use tessera_proto::tessera::{raft_command::Request, raft_result::Response, AuthDone};

use super::{store_err, Position, StateMachine};
use crate::auth::store::{self, AuthState, AuthView, Changed};
use crate::auth::{AuthInfo, PermType};
use crate::errors::EtcdError;
use crate::raft::types::StorageError;

/// Whether applying `r` needs the root role (etcd's `needAdminPermission`;
/// the list requests are answered outside the log, with the same check).
fn needs_admin(r: &Request) -> bool {
    use Request::*;
    matches!(
        r,
        AuthEnable(_)
            | AuthDisable(_)
            | UserAdd(_)
            | UserDelete(_)
            | UserChangePassword(_)
            | UserGrantRole(_)
            | UserRevokeRole(_)
            | RoleAdd(_)
            | RoleDelete(_)
            | RoleGrantPermission(_)
            | RoleRevokePermission(_)
    )
}

impl StateMachine {
    /// The permission check etcd makes when applying `r` for `who`.
    pub(super) fn authorize(
        &self,
        view: &AuthView,
        who: Option<&AuthInfo>,
        r: &Request,
    ) -> Result<Result<(), EtcdError>, StorageError> {
        if !view.enabled() {
            return Ok(Ok(()));
        }
        Ok(match r {
            Request::Put(p) => self.authorize_put(view, who, p)?,
            Request::DeleteRange(d) => view
                .check(who, &d.key, &d.range_end, PermType::Write)
                .and_then(|()| {
                    if d.prev_kv {
                        view.check(who, &d.key, &d.range_end, PermType::Read)
                    } else {
                        Ok(())
                    }
                }),
            Request::Txn(t) => match view.check_txn(who, t) {
                Ok(()) => self.txn_leases_writable(view, who, t)?,
                denied => denied,
            },
            Request::LeaseRevoke(l) => self.lease_keys_writable(view, who, l.id)?,
            other if needs_admin(other) => view.check_admin(who),
            _ => Ok(()),
        })
    }

    /// [`Self::authorize`] for a put.
    pub(super) fn authorize_put(
        &self,
        view: &AuthView,
        who: Option<&AuthInfo>,
        p: &PutRequest,
    ) -> Result<Result<(), EtcdError>, StorageError> {
        if !view.enabled() {
            return Ok(Ok(()));
        }
        if let Err(e) = view.check(who, &p.key, &[], PermType::Write) {
            return Ok(Err(e));
        }
        if let Err(e) = self.lease_keys_writable(view, who, p.lease)? {
            return Ok(Err(e));
        }
        Ok(if p.prev_kv {
            view.check(who, &p.key, &[], PermType::Read)
        } else {
            Ok(())
        })
    }

    /// Whether `who` may write every key attached to the leases the puts of
    /// txn `t` attach (both branches, nested txns included), as for a put
    /// on its own: attaching a lease to a key lets its holder revoke the
    /// lease's other keys.
    fn txn_leases_writable(
        &self,
        view: &AuthView,
        who: Option<&AuthInfo>,
        t: &tessera_proto::etcdserverpb::TxnRequest,
    ) -> Result<Result<(), EtcdError>, StorageError> {
        use tessera_proto::etcdserverpb::request_op::Request as Op;
        for op in t.success.iter().chain(&t.failure) {
            let outcome = match &op.request {
                Some(Op::RequestPut(p)) => self.lease_keys_writable(view, who, p.lease)?,
                Some(Op::RequestTxn(inner)) => self.txn_leases_writable(view, who, inner)?,
                _ => Ok(()),
            };
            if outcome.is_err() {
                return Ok(outcome);
            }
        }
        Ok(Ok(()))
    }

    /// Whether `who` may write every key attached to `lease` (as stored).
    fn lease_keys_writable(
        &self,
        view: &AuthView,
        who: Option<&AuthInfo>,
        lease: i64,
    ) -> Result<Result<(), EtcdError>, StorageError> {
        if lease == 0 {
            return Ok(Ok(()));
        }
        let keys = self
            .store
            .read_view()
            .lease_keys(lease)
            .map_err(store_err)?;
        Ok(keys
            .iter()
            .try_for_each(|k| view.check(who, k, &[], PermType::Write)))
    }

    /// Applies an auth management command (or Authenticate) with etcd's
    /// rules; `None` when `r` is not one.
    pub(super) fn apply_auth(
        &self,
        at: Position,
        view: &AuthView,
        r: &Request,
    ) -> Option<Result<Result<Response, EtcdError>, StorageError>> {
        let mut next: AuthState = view.state.clone();
        let changed = match r {
            Request::AuthEnable(_) => next.enable(),
            Request::AuthDisable(_) => Ok(next.disable()),
            Request::UserAdd(u) => next.user_add(u),
            Request::UserDelete(u) => next.user_delete(u),
            Request::UserChangePassword(u) => next.user_change_password(u),
            Request::UserGrantRole(u) => next.user_grant_role(u),
            Request::UserRevokeRole(u) => next.user_revoke_role(u),
            Request::RoleAdd(x) => next.role_add(x),
            Request::RoleDelete(x) => next.role_delete(x),
            Request::RoleGrantPermission(x) => next.role_grant_permission(x),
            Request::RoleRevokePermission(x) => next.role_revoke_permission(x),
            Request::Authenticate(a) => {
                return Some(self.apply_authenticate(at, view, &a.name, &a.simple_token))
            }
            _ => return None,
        };
        Some(self.commit_auth(at, view, next, changed))
    }

    fn commit_auth(
        &self,
        at: Position,
        view: &AuthView,
        next: AuthState,
        changed: Result<Changed, EtcdError>,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        let changed = match changed {
            Err(e) => {
                self.apply_noop(at, None)?;
                return Ok(Err(e));
            }
            Ok(Changed::Nothing) => {
                self.apply_noop(at, None)?;
                return Ok(Ok(Response::AuthDone(AuthDone {})));
            }
            Ok(c) => c,
        };
        let txn = self.store.write_txn();
        let db = self.store.db().clone();
        self.store
            .commit(txn, |b| {
                store::stage(&db, b, &view.state, &next)?;
                self.stage_applied(b, at, None)
            })
            .map_err(store_err)?;
        let was_enabled = view.state.enabled;
        let enabled = next.enabled;
        let revision = next.revision;
        self.auth.store.publish(next);
        if let Changed::UserCredentials(user) = &changed {
            self.auth.invalidate_user(user);
        }
        if was_enabled && !enabled {
            self.auth.disabled();
        }
        tracing::info!(revision, enabled, "auth store changed");
        Ok(Ok(Response::AuthDone(AuthDone {})))
    }

    fn apply_authenticate(
        &self,
        at: Position,
        view: &AuthView,
        name: &str,
        prefix: &str,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        self.apply_noop(at, None)?;
        let token = view.state.check_authenticate(name).and_then(|()| {
            self.auth
                .assign_token(name, prefix, at.log_id.index, view.state.revision)
        });
        Ok(token.map(|token| {
            Response::Authenticate(AuthenticateResponse {
                header: None,
                token,
            })
        }))
    }
}
