//! After the faults: wait for every member, read the store's own history
//! of the watched keys and the final lists, and run every checker.

use std::time::{Duration, Instant};

use anyhow::bail;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tessera_chaos::lease::check_lease;
use tessera_chaos::linearizability;
use tessera_chaos::list_append::{check_list, ListOp};
use tessera_chaos::watch::{check_acknowledged, check_caught_up, check_watcher, Change};

use crate::workload::{connect, Shared, CATCH_UP, LISTS};
use crate::Verdict;

/// Waits until every member answers a linearizable read.
pub async fn wait_serving(endpoints: &[String], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    for endpoint in endpoints {
        loop {
            let answered = async {
                let mut c = connect(endpoint).await.ok()?;
                c.get("reg/0", None).await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), answered)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{endpoint} does not answer linearizable reads");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

fn verdict<E: std::fmt::Display>(checker: &str, result: Result<(), E>) -> Verdict {
    Verdict {
        checker: checker.to_string(),
        ok: result.is_ok(),
        detail: result.err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

/// A verdict with its detail either way.
fn verdict_with(checker: &str, result: Result<String, String>) -> Verdict {
    let ok = result.is_ok();
    Verdict {
        checker: checker.to_string(),
        ok,
        detail: result.unwrap_or_else(|e| e),
    }
}

/// Retries `attempt` for up to 30 s (a leader election right after the
/// faults healed must not fail the run); its last error otherwise.
async fn retried<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e.context(what.to_string())),
            Err(_) if Instant::now() > deadline => bail!("{what}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Writes the sentinel key; its revision, which the watchers are told to
/// reach.
async fn write_sentinel(endpoint: &str, shared: &Shared) -> anyhow::Result<i64> {
    let end = retried("writing the sentinel", || async {
        let mut client = connect(endpoint).await?;
        let put = client.put("reg/~end", "end", None).await?;
        Ok(put.header().map_or(0, |h| h.revision()))
    })
    .await?;
    shared
        .watch_until
        .store(end, std::sync::atomic::Ordering::Relaxed);
    Ok(end)
}

/// The store's history of `reg/`: a watch from revision 1 until revision
/// `end`.
async fn reference_history(endpoint: &str, end: i64) -> anyhow::Result<Vec<Change>> {
    let mut client = connect(endpoint).await?;
    let mut stream = client
        .watch(
            "reg/",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await?;
    let mut changes = Vec::new();
    while changes.last().is_none_or(|c: &Change| c.revision < end) {
        let Some(resp) = stream.message().await? else {
            bail!("the reference watch ended before revision {end}");
        };
        if resp.canceled() {
            bail!("the reference watch was canceled: {}", resp.cancel_reason());
        }
        for e in resp.events() {
            if let Some(kv) = e.kv() {
                changes.push(Change {
                    revision: kv.mod_revision(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: match e.event_type() {
                        EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                        EventType::Delete => None,
                    },
                });
            }
        }
    }
    Ok(changes)
}

/// The final content of list `list`.
async fn final_list(endpoint: &str, list: usize) -> anyhow::Result<Vec<u64>> {
    let mut client = connect(endpoint).await?;
    let read = client
        .get(format!("list/{list}"), Some(GetOptions::new()))
        .await?;
    Ok(read.kvs().first().map_or(Vec::new(), |kv| {
        String::from_utf8_lossy(kv.value())
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect()
    }))
}

/// Every member's revision, and their HashKV at `at` when given.
async fn revisions_and_hashes(
    endpoints: &[String],
    at: Option<i64>,
) -> anyhow::Result<(Vec<i64>, Vec<u32>)> {
    let (mut revisions, mut hashes) = (Vec::new(), Vec::new());
    for endpoint in endpoints {
        let mut c = connect(endpoint).await?;
        let status = c.status().await?;
        revisions.push(status.header().map_or(0, |h| h.revision()));
        if let Some(at) = at {
            hashes.push(c.hash_kv(at).await?.hash());
        }
    }
    Ok((revisions, hashes))
}

/// Every member reaches the same revision and the same HashKV there
/// (errors, e.g. of a member just restarted, are retried for 30 s).
async fn members_agree(endpoints: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match revisions_and_hashes(endpoints, None).await {
            Ok((revisions, _)) => {
                let top = revisions.iter().copied().max().unwrap_or(0);
                if revisions.iter().all(|&r| r == top) {
                    match revisions_and_hashes(endpoints, Some(top)).await {
                        Ok((_, hashes)) if hashes.windows(2).all(|w| w[0] == w[1]) => return Ok(()),
                        Ok((after, hashes)) if after.iter().all(|&r| r == top) => {
                            bail!("members differ at revision {top}: HashKV {hashes:?}")
                        }
                        Ok(_) => last = "a write arrived while hashing".into(),
                        Err(e) => last = format!("{e:#}"),
                    }
                } else {
                    last = format!("revisions {revisions:?}");
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("members did not agree within 30 s: {last}")
}

/// Runs every checker on what the clients recorded; the cluster must be
/// healed and every client but the `watchers` finished.
pub async fn check_everything(
    endpoints: &[String],
    shared: &Shared,
    watchers: Vec<tokio::task::JoinHandle<()>>,
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    if let Err(e) = wait_serving(endpoints, Duration::from_secs(60)).await {
        verdicts.push(verdict("members serve after healing", Err(e)));
        return verdicts;
    }
    verdicts.push(verdict(
        "members agree (HashKV)",
        members_agree(endpoints).await,
    ));
    // The sentinel first: it tells the watchers where to stop; then the
    // reference history up to it, and the watchers are waited for.
    let sentinel = write_sentinel(&endpoints[0], shared).await;
    let reference = match &sentinel {
        Ok(end) => {
            retried("reading the reference history", || {
                reference_history(&endpoints[0], *end)
            })
            .await
        }
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    if sentinel.is_err() {
        // No sentinel: watchers give up after `CATCH_UP`.
        shared
            .watch_until
            .store(i64::MAX, std::sync::atomic::Ordering::Relaxed);
    }
    let watchers_started = watchers.len();
    for watcher in watchers {
        let _ = tokio::time::timeout(CATCH_UP + Duration::from_secs(15), watcher).await;
    }
    let mut final_lists = Vec::new();
    let lists = crate::lock(&shared.history).lists.len().max(LISTS);
    for list in 0..lists {
        let read = retried("reading a final list", || final_list(&endpoints[0], list)).await;
        final_lists.push(read.map_err(|e| format!("{e:#}")));
    }
    let history = crate::lock(&shared.history);

    for (key, events) in history.registers.iter().enumerate() {
        let completed = events.iter().filter(|e| e.returned.is_some()).count();
        let started = Instant::now();
        let mut v = verdict(
            &format!("linearizable reg/{key}"),
            linearizability::check(events),
        );
        if v.ok {
            v.detail = format!(
                "{} operations ({completed} completed), checked in {:.1} s",
                events.len(),
                started.elapsed().as_secs_f64()
            );
        }
        verdicts.push(v);
    }

    // One verdict for all lists (the clients move to new keys every few
    // seconds): the first list that fails, or how many passed.
    let lists_checked = history
        .lists
        .iter()
        .enumerate()
        .map(|(list, events)| {
            let result = match final_lists.get(list) {
                Some(Ok(items)) => check_list(events, items).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(format!("final read failed: {e}")),
                None => Err("no final read (no client)".to_string()),
            };
            result.map_err(|e| format!("list/{list}: {e}"))
        })
        .collect::<Result<Vec<()>, String>>()
        .map(|checked| {
            let appends = history
                .lists
                .iter()
                .flatten()
                .filter(|e| matches!(e.op, ListOp::Append(_)))
                .count();
            format!("{} lists, {appends} appends", checked.len())
        });
    verdicts.push(verdict_with("list-append", lists_checked));

    match reference {
        Ok(reference) => {
            verdicts.push(verdict(
                "acknowledged writes kept",
                check_acknowledged(&reference, &history.acknowledged),
            ));
            let end = sentinel.as_ref().map_or(i64::MAX, |e| *e);
            let result = history
                .watches
                .iter()
                .enumerate()
                .try_for_each(|(i, log)| {
                    check_watcher(&reference, i, log)?;
                    check_caught_up(end, i, log)
                })
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    // A watcher that never returned left no log to check.
                    if history.watches.len() == watchers_started {
                        Ok(())
                    } else {
                        Err(format!(
                            "{} of {watchers_started} watchers finished",
                            history.watches.len()
                        ))
                    }
                });
            let mut v = verdict("watch guarantees", result);
            if v.ok {
                let events: usize = history
                    .watches
                    .iter()
                    .flatten()
                    .map(|o| match o {
                        tessera_chaos::watch::Observed::Events { events, .. } => events.len(),
                        _ => 0,
                    })
                    .sum();
                v.detail = format!(
                    "{} watchers, {events} events, {} changes in the reference",
                    history.watches.len(),
                    reference.len()
                );
            }
            verdicts.push(v);
        }
        Err(e) => verdicts.push(verdict("reference history", Err(e))),
    }

    let observed = history
        .leases
        .iter()
        .filter(|l| l.seen_gone.is_some())
        .count();
    let mut v = verdict(
        "leases never expire early",
        history.leases.iter().try_for_each(check_lease),
    );
    if v.ok {
        v.detail = format!("{} leases, {observed} seen expiring", history.leases.len());
    }
    verdicts.push(v);
    verdicts
}
