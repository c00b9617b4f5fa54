//! etcd's JWT auth tokens (`--auth-token jwt,...`): claims `username`,
//! `revision` and `exp`, signed with the configured key. Any member with the
//! key verifies any member's token; the revision in the token is the auth
//! revision at sign time, so tokens from before an auth change are refused
//! with etcd's "revision of auth store is old" until the client
//! authenticates again.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthInfo;
use crate::errors::EtcdError;

/// etcd's default JWT lifetime.
const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub struct JwtTokens {
    algorithm: Algorithm,
    /// None when only a public key was given: this member verifies, never signs.
    signing: Option<EncodingKey>,
    verifying: DecodingKey,
    ttl: Duration,
}

fn read(opts: &HashMap<String, String>, name: &str) -> Result<Option<Vec<u8>>, String> {
    match opts.get(name).filter(|p| !p.is_empty()) {
        None => Ok(None),
        Some(path) => std::fs::read(path)
            .map(Some)
            .map_err(|e| format!("--auth-token: cannot read {name} {path}: {e}")),
    }
}

impl JwtTokens {
    pub fn from_options(opts: &HashMap<String, String>) -> Result<JwtTokens, String> {
        for k in opts.keys() {
            if !["sign-method", "pub-key", "priv-key", "ttl"].contains(&k.as_str()) {
                tracing::warn!(option = %k, "unknown JWT option");
            }
        }
        let method = opts.get("sign-method").map(String::as_str).unwrap_or("");
        let algorithm: Algorithm = method
            .parse()
            .map_err(|_| "auth: invalid auth signature method".to_string())?;
        let ttl = match opts.get("ttl").filter(|t| !t.is_empty()) {
            None => DEFAULT_TTL,
            Some(t) => crate::config::parse_duration(t)
                .ok_or_else(|| format!("--auth-token: invalid ttl {t:?}"))?,
        };
        let key_err = |e: jsonwebtoken::errors::Error| format!("--auth-token: bad key: {e}");
        let private = read(opts, "priv-key")?;
        let public = read(opts, "pub-key")?;
        use Algorithm::*;
        let (signing, verifying) = match algorithm {
            HS256 | HS384 | HS512 => {
                let secret = private.ok_or("auth: missing key data")?;
                (
                    Some(EncodingKey::from_secret(&secret)),
                    DecodingKey::from_secret(&secret),
                )
            }
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                let public =
                    public.ok_or("--auth-token: pub-key is required to verify RSA tokens")?;
                let signing = private
                    .map(|k| EncodingKey::from_rsa_pem(&k))
                    .transpose()
                    .map_err(key_err)?;
                (
                    signing,
                    DecodingKey::from_rsa_pem(&public).map_err(key_err)?,
                )
            }
            ES256 | ES384 => {
                let public =
                    public.ok_or("--auth-token: pub-key is required to verify ECDSA tokens")?;
                let signing = private
                    .map(|k| EncodingKey::from_ec_pem(&k))
                    .transpose()
                    .map_err(key_err)?;
                (signing, DecodingKey::from_ec_pem(&public).map_err(key_err)?)
            }
            EdDSA => return Err("auth: invalid auth signature method".into()),
        };
        Ok(JwtTokens {
            algorithm,
            signing,
            verifying,
            ttl,
        })
    }

    pub fn assign(&self, username: &str, revision: u64) -> Result<String, EtcdError> {
        let Some(key) = &self.signing else {
            return Err(EtcdError::VerifyOnly);
        };
        let exp = (SystemTime::now() + self.ttl)
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key).map_err(|e| {
            tracing::warn!(error = %e, "failed to sign a JWT token");
            EtcdError::VerifyOnly
        })
    }

    pub fn info(&self, token: &str) -> Option<AuthInfo> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.required_spec_claims = ["exp".to_string()].into();
        match jsonwebtoken::decode::<Claims>(token, &self.verifying, &validation) {
            Ok(t) => Some(AuthInfo {
                username: t.claims.username,
                revision: t.claims.revision,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "invalid JWT token");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_tokens_sign_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, b"0123456789abcdef").unwrap();
        let opts: HashMap<String, String> = [
            ("sign-method".to_string(), "HS256".to_string()),
            ("priv-key".to_string(), key.display().to_string()),
            ("ttl".to_string(), "1m".to_string()),
        ]
        .into();
        let jwt = JwtTokens::from_options(&opts).unwrap();
        let token = jwt.assign("alice", 7).unwrap();
        assert_eq!(
            jwt.info(&token),
            Some(AuthInfo {
                username: "alice".into(),
                revision: 7
            })
        );
        let mut forged = token.clone();
        forged.pop();
        assert_eq!(jwt.info(&forged), None);
        assert_eq!(jwt.info("not.a.token"), None);

        let mut bad = opts.clone();
        bad.insert("sign-method".into(), "XX999".into());
        assert_eq!(
            JwtTokens::from_options(&bad).err().as_deref(),
            Some("auth: invalid auth signature method")
        );
    }
}
