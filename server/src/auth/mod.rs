//! etcd's authentication and role-based access control: who a request comes
//! from (a token, or with `--client-cert-auth` the client certificate's
//! common name), the replicated users and roles, and tokens.

pub mod jwt;
pub mod perms;
pub mod store;
pub mod tokens;

use std::time::Duration;

use tessera_proto::tessera::RequestAuth;

use crate::errors::EtcdError;
use store::AuthStore;

pub use tessera_proto::authpb::permission::Type as PermType;

/// The user a request runs as, and the auth revision its credentials were
/// checked at (etcd's `AuthInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

impl AuthInfo {
    /// The identity carried in a replicated command, if any.
    pub fn from_command(auth: Option<&RequestAuth>) -> Option<AuthInfo> {
        auth.filter(|a| !a.username.is_empty() || a.revision != 0)
            .map(|a| AuthInfo {
                username: a.username.clone(),
                revision: a.revision,
            })
    }

    pub fn to_command(who: Option<&AuthInfo>) -> Option<RequestAuth> {
        who.map(|w| RequestAuth {
            username: w.username.clone(),
            revision: w.revision,
        })
    }
}

/// How tokens are made and checked (`--auth-token`).
pub enum TokenProvider {
    Simple(tokens::SimpleTokens),
    Jwt(jwt::JwtTokens),
}

/// etcd's bcrypt cost bounds (`golang.org/x/crypto/bcrypt`).
pub const MIN_BCRYPT_COST: u32 = 4;
pub const MAX_BCRYPT_COST: u32 = 31;

/// Everything auth on one member: the replicated state and the tokens.
pub struct Auth {
    pub store: AuthStore,
    pub tokens: TokenProvider,
    pub bcrypt_cost: u32,
    /// `--client-cert-auth`: a verified client certificate's CN names the user.
    pub client_cert_auth: bool,
}

/// A request's credentials, before they are checked.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The `token` (gRPC) or `authorization` (gateway) metadata.
    pub token: Option<String>,
    /// The common name of the verified client certificate, if any.
    pub common_name: Option<String>,
}

impl Credentials {
    /// The credentials a gRPC request carries.
    pub fn of<T>(req: &tonic::Request<T>) -> Credentials {
        let conn = req
            .extensions()
            .get::<axum::extract::ConnectInfo<crate::tls::ClientConn>>();
        Credentials::of_http(req.metadata().as_ref(), conn.map(|c| &c.0))
    }

    /// The credentials of a request with `headers` on connection `conn`
    /// (which the server puts in each request's extensions).
    pub fn of_http(
        headers: &axum::http::HeaderMap,
        conn: Option<&crate::tls::ClientConn>,
    ) -> Credentials {
        let token = headers
            .get("token")
            .or_else(|| headers.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let common_name = conn.and_then(|c| c.common_name.clone());
        Credentials { token, common_name }
    }
}

impl Auth {
    /// etcd's `AuthInfoFromCtx`, then `AuthInfoFromTLS`: a token wins; a
    /// token that is not valid is an error even when auth is off; without a
    /// token, the certificate's CN when `--client-cert-auth` is on.
    pub fn identify(&self, creds: &Credentials) -> Result<Option<AuthInfo>, EtcdError> {
        if let Some(token) = &creds.token {
            return self
                .token_info(token)
                .map(Some)
                .ok_or(EtcdError::InvalidAuthToken);
        }
        if self.client_cert_auth {
            if let Some(cn) = &creds.common_name {
                return Ok(Some(AuthInfo {
                    username: cn.clone(),
                    revision: self.store.view().state.revision,
                }));
            }
        }
        Ok(None)
    }

    fn token_info(&self, token: &str) -> Option<AuthInfo> {
        match &self.tokens {
            // A simple token carries no revision: it is checked at the
            // current one, as in etcd.
            TokenProvider::Simple(t) => t.user_of(token).map(|username| AuthInfo {
                username,
                revision: self.store.view().state.revision,
            }),
            TokenProvider::Jwt(j) => j.info(token),
        }
    }

    /// The token for `user` once its Authenticate entry is applied at log
    /// `index` with auth revision `revision`.
    pub fn assign_token(
        &self,
        user: &str,
        prefix: &str,
        index: u64,
        revision: u64,
    ) -> Result<String, EtcdError> {
        match &self.tokens {
            TokenProvider::Simple(t) => Ok(t.assign(user, prefix, index)),
            TokenProvider::Jwt(j) => j.assign(user, revision),
        }
    }

    /// Tokens of `user` stop working (deleted, or a new password).
    pub fn invalidate_user(&self, user: &str) {
        if let TokenProvider::Simple(t) = &self.tokens {
            t.invalidate_user(user);
        }
    }

    /// Auth was disabled: simple tokens are dropped, as in etcd.
    pub fn disabled(&self) {
        if let TokenProvider::Simple(t) = &self.tokens {
            t.clear();
        }
    }

    /// The log index of the Authenticate entry that made `token`, when
    /// tokens are simple ones.
    pub fn simple_token_index(&self, token: &str) -> Option<u64> {
        match &self.tokens {
            TokenProvider::Simple(_) => tokens::SimpleTokens::index_of(token),
            TokenProvider::Jwt(_) => None,
        }
    }

    /// A token prefix for a new Authenticate proposal (empty for JWT).
    pub fn new_token_prefix(&self) -> String {
        match &self.tokens {
            TokenProvider::Simple(_) => tokens::SimpleTokens::new_prefix(),
            TokenProvider::Jwt(_) => String::new(),
        }
    }
}

/// Parses `--auth-token` (`simple`, or `jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`).
pub fn token_provider(spec: &str, simple_ttl: Duration) -> Result<TokenProvider, String> {
    let mut parts = spec.split(',');
    match parts.next().unwrap_or_default() {
        "simple" | "" => Ok(TokenProvider::Simple(tokens::SimpleTokens::new(simple_ttl))),
        "jwt" => {
            let mut opts = std::collections::HashMap::new();
            for p in parts {
                let (k, v) = p.split_once('=').ok_or_else(|| {
                    format!("--auth-token: invalid option {p:?}, expected key=value")
                })?;
                opts.insert(k.to_string(), v.to_string());
            }
            jwt::JwtTokens::from_options(&opts).map(TokenProvider::Jwt)
        }
        other => Err(format!(
            "--auth-token: unknown token type {other:?} (simple or jwt)"
        )),
    }
}
