//! One call at a time per volume (and per snapshot name): the spec lets
//! a plugin serialize calls for one object, and every step here (attach,
//! format, mount) assumes nobody else is doing it meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default, Clone)]
pub struct Locks {
    held: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Held while a call works on one object; the entry goes when the last
/// holder or waiter is done, so the map holds only objects in use.
pub struct Guard {
    key: String,
    locks: Locks,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Locks {
    pub async fn lock(&self, key: &str) -> Guard {
        let mutex = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.entry(key.to_string()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        Guard {
            key: key.to_string(),
            locks: self.clone(),
            guard: Some(guard),
        }
    }

    fn release(&self, key: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it: nobody waits.
        if held.get(key).is_some_and(|m| Arc::strong_count(m) == 1) {
            held.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The mutex guard first, so its Arc no longer counts.
        self.guard.take();
        self.locks.release(&self.key);
    }
}

/// Runs a call on a task of its own, to the end, even if its caller goes
/// away (a deadline, a cancelled request): dropped halfway, a call would
/// release its volume's lock while a mkfs, mount or attach it started goes
/// on, and a retry could run into it.
pub async fn run_to_completion<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> Result<tonic::Response<T>, tonic::Status> {
    tokio::spawn(call)
        .await
        .map_err(|e| tonic::Status::internal(format!("the call failed: {e}")))?
        .map(tonic::Response::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn calls_for_one_key_wait_and_entries_go_away() {
        let locks = Locks::default();
        let first = locks.lock("a").await;
        let other = locks.lock("b").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a second call on the same key must wait"
        );
        drop(first);
        waiting.await.unwrap();
        drop(other);
        assert_eq!(locks.len(), 0);
    }
}
