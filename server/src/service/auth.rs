//! The etcd Auth service: enable/disable, authenticate, users and roles.
//!
//! Changes go through Raft and are checked (admin rights included) when they
//! are applied, as in etcd. Reads (get, list, status) are answered from this
//! member's state after a read index, so they are as current as etcd's,
//! which sends them through Raft. Passwords are bcrypt-hashed here, off the
//! async runtime, so only hashes reach the log.

use std::sync::Arc;

use tessera_proto::etcdserverpb::auth_server::Auth as AuthRpc;
use tessera_proto::etcdserverpb::*;
use tessera_proto::tessera::{
    raft_command::Request as Cmd, raft_result::Response as Res, AuthenticateCommand,
};
use tonic::{Request, Response, Status};

use crate::auth::AuthInfo;
use crate::errors::EtcdError;
use crate::node::Node;

#[derive(Clone)]
pub struct AuthService {
    node: Arc<Node>,
}

fn unexpected() -> Status {
    Status::internal("apply returned a response of the wrong kind")
}

impl AuthService {
    pub fn new(node: Arc<Node>) -> Self {
        AuthService { node }
    }

    /// Proposes an auth management command as `who` and waits for it.
    async fn change(
        &self,
        who: Option<&AuthInfo>,
        cmd: Cmd,
    ) -> Result<Option<ResponseHeader>, Status> {
        match self.node.propose_as(who, cmd).await? {
            Res::AuthDone(_) => Ok(self.node.header(0)),
            _ => Err(unexpected()),
        }
    }

    async fn hash(&self, password: String) -> Result<String, Status> {
        let cost = self.node.auth.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot hash the password: {e}")))
    }

    /// etcd's `CheckPassword`: the auth revision the password was right at.
    async fn check_password(&self, name: &str, password: &str) -> Result<u64, Status> {
        let view = self.node.auth.store.view();
        if !view.enabled() {
            return Err(EtcdError::AuthNotEnabled.into());
        }
        let user = view.state.users.get(name).ok_or(EtcdError::AuthFailed)?;
        if user.options.is_some_and(|o| o.no_password) {
            return Err(EtcdError::NoPasswordUser.into());
        }
        let hash = String::from_utf8_lossy(&user.password).into_owned();
        let password = password.to_string();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        if !ok {
            tracing::info!(user = %name, "authentication failed: invalid password");
            return Err(EtcdError::AuthFailed.into());
        }
        Ok(view.state.revision)
    }

    pub async fn do_authenticate(
        &self,
        r: AuthenticateRequest,
    ) -> Result<AuthenticateResponse, Status> {
        self.node.read_barrier().await?;
        loop {
            let checked = self.check_password(&r.name, &r.password).await?;
            let cmd = Cmd::Authenticate(AuthenticateCommand {
                name: r.name.clone(),
                simple_token: self.node.auth.new_token_prefix(),
            });
            let resp = match self.node.propose_as(None, cmd).await? {
                Res::Authenticate(resp) => resp,
                _ => return Err(unexpected()),
            };
            // A password change between the check and the apply: check again.
            if checked == self.node.auth.store.view().state.revision {
                return Ok(AuthenticateResponse {
                    header: self.node.header(0),
                    ..resp
                });
            }
            tracing::info!("auth revision changed while authenticating; retrying");
        }
    }

    /// Answers `read` from the current state after a read index; non-admins
    /// may read only what `allowed` permits them (etcd's UserGet/RoleGet).
    async fn read<T>(
        &self,
        who: Option<&AuthInfo>,
        allowed: impl Fn(&crate::auth::store::AuthView, Option<&AuthInfo>) -> bool,
        read: impl FnOnce(&crate::auth::store::AuthView) -> Result<T, EtcdError>,
    ) -> Result<T, Status> {
        self.node.read_barrier().await?;
        let view = self.node.auth.store.view();
        if let Err(e) = view.check_admin(who) {
            if !allowed(&view, who) {
                return Err(e.into());
            }
        }
        Ok(read(&view)?)
    }
}

fn header_only<T>(
    r: Result<Option<ResponseHeader>, Status>,
    f: impl FnOnce(Option<ResponseHeader>) -> T,
) -> Result<Response<T>, Status> {
    r.map(|h| Response::new(f(h)))
}

#[tonic::async_trait]
impl AuthRpc for AuthService {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::AuthEnable(req.into_inner()))
                .await,
            |header| AuthEnableResponse { header },
        )
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::AuthDisable(req.into_inner()))
                .await,
            |header| AuthDisableResponse { header },
        )
    }

    async fn auth_status(
        &self,
        _req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.node.read_barrier().await?;
        let view = self.node.auth.store.view();
        Ok(Response::new(AuthStatusResponse {
            header: self.node.header(0),
            enabled: view.enabled(),
            auth_revision: view.state.revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        self.do_authenticate(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let who = self.node.caller(&req)?;
        let mut r = req.into_inner();
        let no_password = r.options.is_some_and(|o| o.no_password);
        if !no_password && r.hashed_password.is_empty() {
            r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        header_only(self.change(who.as_ref(), Cmd::UserAdd(r)).await, |header| {
            AuthUserAddResponse { header }
        })
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let who = self.node.caller(&req)?;
        let r = req.into_inner();
        let roles = self
            .read(
                who.as_ref(),
                |_, who| who.is_some_and(|w| w.username == r.name),
                |v| {
                    v.state
                        .users
                        .get(&r.name)
                        .map(|u| u.roles.clone())
                        .ok_or(EtcdError::UserNotFound)
                },
            )
            .await?;
        Ok(Response::new(AuthUserGetResponse {
            header: self.node.header(0),
            roles,
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let who = self.node.caller(&req)?;
        let users = self
            .read(
                who.as_ref(),
                |_, _| false,
                |v| Ok(v.state.users.keys().cloned().collect()),
            )
            .await?;
        Ok(Response::new(AuthUserListResponse {
            header: self.node.header(0),
            users,
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::UserDelete(req.into_inner()))
                .await,
            |header| AuthUserDeleteResponse { header },
        )
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let who = self.node.caller(&req)?;
        let mut r = req.into_inner();
        if r.hashed_password.is_empty() {
            r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        header_only(
            self.change(who.as_ref(), Cmd::UserChangePassword(r)).await,
            |header| AuthUserChangePasswordResponse { header },
        )
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::UserGrantRole(req.into_inner()))
                .await,
            |header| AuthUserGrantRoleResponse { header },
        )
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::UserRevokeRole(req.into_inner()))
                .await,
            |header| AuthUserRevokeRoleResponse { header },
        )
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::RoleAdd(req.into_inner()))
                .await,
            |header| AuthRoleAddResponse { header },
        )
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let who = self.node.caller(&req)?;
        let r = req.into_inner();
        let perm = self
            .read(
                who.as_ref(),
                |v, who| who.is_some_and(|w| v.has_role(&w.username, &r.role)),
                |v| {
                    v.state
                        .roles
                        .get(&r.role)
                        .map(|role| role.key_permission.clone())
                        .ok_or(EtcdError::RoleNotFound)
                },
            )
            .await?;
        Ok(Response::new(AuthRoleGetResponse {
            header: self.node.header(0),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let who = self.node.caller(&req)?;
        let roles = self
            .read(
                who.as_ref(),
                |_, _| false,
                |v| Ok(v.state.roles.keys().cloned().collect()),
            )
            .await?;
        Ok(Response::new(AuthRoleListResponse {
            header: self.node.header(0),
            roles,
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::RoleDelete(req.into_inner()))
                .await,
            |header| AuthRoleDeleteResponse { header },
        )
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let who = self.node.caller(&req)?;
        let r = req.into_inner();
        if r.perm.is_none() {
            return Err(EtcdError::PermissionNotGiven.into());
        }
        header_only(
            self.change(who.as_ref(), Cmd::RoleGrantPermission(r)).await,
            |header| AuthRoleGrantPermissionResponse { header },
        )
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let who = self.node.caller(&req)?;
        header_only(
            self.change(who.as_ref(), Cmd::RoleRevokePermission(req.into_inner()))
                .await,
            |header| AuthRoleRevokePermissionResponse { header },
        )
    }
}
