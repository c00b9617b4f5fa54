//! Rebuilding a shard of a stripe from the volume's other shards on their
//! nodes, for the repairer (a lost node's shards onto another node) and
//! the scrubber (a rotten shard in place); and the throttle both run under.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tessera_proto::store::store_client::StoreClient;
use tessera_proto::store::{Layout, ReadRequest, StripesRequest};
use tonic::transport::Channel;

use crate::codec::{block_crcs, Codec, BLOCK};
use crate::meta::{Meta, MetaError, VolumeRecord};
use crate::shardlog::{stripe_id, stripe_of, Stripe};
use crate::volume::{connect, VolumeOptions};

/// A node reached by name (`None`: no address known).
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub client: Option<StoreClient<Channel>>,
}

/// Connections to nodes by name, made once.
#[derive(Default)]
pub struct Peers {
    clients: HashMap<String, (String, Option<StoreClient<Channel>>)>,
}

impl Peers {
    /// Learns the nodes' addresses now (a node may have moved).
    pub async fn refresh(&mut self, meta: &Meta) -> Result<(), MetaError> {
        let options = VolumeOptions {
            request_timeout: Duration::from_secs(30),
            ..VolumeOptions::default()
        };
        for n in meta.nodes().await? {
            let address = n.record.address;
            let stale = self
                .clients
                .get(&n.record.name)
                .is_none_or(|(known, _)| *known != address);
            if stale {
                let client = connect(&address, &options);
                self.clients.insert(n.record.name, (address, client));
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Peer {
        Peer {
            name: name.to_string(),
            client: self.clients.get(name).and_then(|(_, c)| c.clone()),
        }
    }

    /// The nodes of segment `s` of `record`, shard by shard.
    pub fn segment(&self, record: &VolumeRecord, s: usize) -> Vec<Peer> {
        record
            .placement(s)
            .into_iter()
            .map(|name| self.get(name))
            .collect()
    }
}

/// What the nodes of a segment hold: for each stripe, its layout and the
/// shards present (a bitmask); and which nodes answered.
pub async fn list_segment(
    nodes: &[Peer],
    volume: u64,
    segment: u32,
) -> (HashMap<Stripe, (Layout, u64)>, Vec<bool>) {
    let mut asks: FuturesUnordered<_> = nodes
        .iter()
        .enumerate()
        .map(|(shard, node)| {
            let client = node.client.clone();
            async move {
                let Some(mut client) = client else {
                    return (shard, None);
                };
                let listed = client
                    .stripes(StripesRequest { volume, segment })
                    .await
                    .ok()
                    .map(|r| r.into_inner().stripes);
                (shard, listed)
            }
        })
        .collect();
    let mut held: HashMap<Stripe, (Layout, u64)> = HashMap::new();
    let mut answered = vec![false; nodes.len()];
    while let Some((shard, listed)) = asks.next().await {
        let Some(listed) = listed else { continue };
        answered[shard] = true;
        for info in listed.into_iter().filter(|i| i.shard as usize == shard) {
            let Some(layout) = info.layout else { continue };
            let entry = held
                .entry(stripe_of(info.stripe.as_ref()))
                .or_insert((layout, 0));
            entry.1 |= 1 << shard;
        }
    }
    (held, answered)
}

/// Shard `want` of a stripe, rebuilt from any k of the other shards
/// (every block's checksum checked on the way). Whole shards first; when
/// fewer than k of them read cleanly (other shards have rotten blocks of
/// their own, in other rows), row by row, each row from any k shards
/// whose block in that row is sound.
pub async fn rebuild_shard(
    nodes: &[Peer],
    volume: u64,
    segment: u32,
    stripe: Stripe,
    layout: &Layout,
    want: usize,
) -> Result<Vec<u8>, String> {
    let k = layout.data_shards as usize;
    let n = k + layout.parity_shards as usize;
    let rows = layout.rows as usize;
    if nodes.len() != n || want >= n {
        return Err(format!("a {k}+{} stripe on {} nodes", n - k, nodes.len()));
    }
    let codec = Codec::new(k, n - k).map_err(|e| e.to_string())?;
    let ask = Ask {
        nodes,
        codec: &codec,
        volume,
        segment,
        stripe,
        k,
        want,
    };
    let whole = match ask.rows(0, rows).await {
        Ok(data) => return Ok(data),
        Err(e) => e,
    };
    if rows <= 1 {
        return Err(whole);
    }
    let mut out = Vec::with_capacity(rows * BLOCK);
    for row in 0..rows {
        let data = ask
            .rows(row, 1)
            .await
            .map_err(|e| format!("row {row}: {e} (whole shards: {whole})"))?;
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// One rebuild's reads: rows of the other shards of a stripe.
struct Ask<'a> {
    nodes: &'a [Peer],
    codec: &'a Codec,
    volume: u64,
    segment: u32,
    stripe: Stripe,
    k: usize,
    want: usize,
}

impl Ask<'_> {
    /// Rows `first..first + rows` of shard `want`, from any k others.
    async fn rows(&self, first: usize, rows: usize) -> Result<Vec<u8>, String> {
        let n = self.nodes.len();
        let mut asks: FuturesUnordered<_> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.want)
            .map(|(i, node)| {
                let client = node.client.clone();
                let name = node.name.clone();
                let request = ReadRequest {
                    volume: self.volume,
                    segment: self.segment,
                    shard: i as u32,
                    stripe: Some(stripe_id(self.stripe)),
                    first_row: first as u32,
                    rows: rows as u32,
                };
                async move {
                    let Some(mut client) = client else {
                        return (i, Err(format!("{name}: no address known")));
                    };
                    let answer = match client.read(request).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.data.len() == rows * BLOCK && block_crcs(&r.data) == r.crcs {
                                Ok(r.data)
                            } else {
                                Err(format!("{name}: checksum mismatch on the wire"))
                            }
                        }
                        Err(e) => Err(format!("{name}: {}", e.message())),
                    };
                    (i, answer)
                }
            })
            .collect();
        let mut pieces: Vec<Option<Vec<u8>>> = vec![None; n];
        let mut got = 0;
        let mut errors = Vec::new();
        while let Some((i, answer)) = asks.next().await {
            match answer {
                Ok(data) => {
                    pieces[i] = Some(data);
                    got += 1;
                    if got == self.k {
                        break;
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if got < self.k {
            return Err(format!(
                "only {got} of the {} shards needed could be read: {}",
                self.k,
                errors.join("; ")
            ));
        }
        self.codec
            .reconstruct(&mut pieces)
            .map_err(|e| e.to_string())?;
        pieces[self.want]
            .take()
            .ok_or_else(|| "reconstruction gave nothing".to_string())
    }
}

/// Paces work to `rate` bytes a second (0: unpaced).
pub struct Throttle {
    rate: u64,
    next: tokio::time::Instant,
}

impl Throttle {
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits until `bytes` more fit the rate.
    pub async fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        // No credit builds up while idle: the rate holds over any second.
        self.next = self.next.max(now);
        self.next += Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
    }
}
