//! etcd's "simple" auth tokens: random, opaque, held in memory by every
//! member (each member registers a token when it applies the Authenticate
//! entry that created it), valid for `--auth-token-ttl` since last use, and
//! gone on restart, as in etcd.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

/// Length of the random part of a token (etcd's `defaultSimpleTokenLength`).
const PREFIX_LEN: usize = 16;
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

pub struct SimpleTokens {
    ttl: Duration,
    tokens: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    user: String,
    expires: Instant,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> Self {
        SimpleTokens {
            ttl,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The random part of a new token, chosen by the member that serves the
    /// Authenticate request and replicated with it.
    pub fn new_prefix() -> String {
        let mut rng = rand::thread_rng();
        (0..PREFIX_LEN)
            .map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char)
            .collect()
    }

    /// Registers `prefix.index` for `user`; returns the token.
    pub fn assign(&self, user: &str, prefix: &str, index: u64) -> String {
        let token = format!("{prefix}.{index}");
        let mut tokens = self.lock();
        let now = Instant::now();
        tokens.retain(|_, e| e.expires > now);
        tokens.insert(
            token.clone(),
            Entry {
                user: user.to_string(),
                expires: now + self.ttl,
            },
        );
        token
    }

    /// The user a live token belongs to; using a token extends its life.
    pub fn user_of(&self, token: &str) -> Option<String> {
        let mut tokens = self.lock();
        let now = Instant::now();
        let e = tokens.get_mut(token)?;
        if e.expires <= now {
            tokens.remove(token);
            return None;
        }
        e.expires = now + self.ttl;
        Some(e.user.clone())
    }

    /// Drops every token of `user` (deleted, or its password changed).
    pub fn invalidate_user(&self, user: &str) {
        self.lock().retain(|_, e| e.user != user);
    }

    /// Drops every token (auth disabled).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The log index a simple token was made at: etcd's tokens are
    /// `prefix.index`, the index of the Authenticate entry that made them.
    pub fn index_of(token: &str) -> Option<u64> {
        token.rsplit_once('.')?.1.parse().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_unless_used_and_die_with_their_user() {
        let t = SimpleTokens::new(Duration::from_millis(300));
        let prefix = SimpleTokens::new_prefix();
        assert_eq!(prefix.len(), 16);
        let a = t.assign("alice", &prefix, 7);
        assert_eq!(a, format!("{prefix}.7"));
        let b = t.assign("bob", "xyz", 8);
        assert_eq!(t.user_of(&a).as_deref(), Some("alice"));
        std::thread::sleep(Duration::from_millis(200));
        assert!(t.user_of(&a).is_some(), "use extends the ttl");
        std::thread::sleep(Duration::from_millis(200));
        assert!(t.user_of(&a).is_some());
        assert!(t.user_of(&b).is_none(), "unused token expired");
        t.invalidate_user("alice");
        assert!(t.user_of(&a).is_none());
        assert!(t.user_of("nonsense").is_none());
        assert_eq!(SimpleTokens::index_of(&a), Some(7));
        assert_eq!(SimpleTokens::index_of("nonsense"), None);
        assert_eq!(SimpleTokens::index_of("abc.x"), None);
    }
}
