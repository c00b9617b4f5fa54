//! Where a segment's shards go: `k + m` distinct live nodes, spread over
//! zones as evenly as the nodes allow, each segment choosing by rendezvous
//! hashing (so segments spread over all nodes, and a node's arrival moves
//! only the segments it wins).

use std::collections::BTreeMap;

use crate::meta::NodeRecord;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error(
        "a {k}+{m} volume needs {need} live storage nodes with room for it; {have} are: {names}"
    )]
    TooFewNodes {
        k: usize,
        m: usize,
        need: usize,
        have: usize,
        names: String,
    },
}

/// FNV-1a then a mix: a stable hash of (volume, segment, node).
pub fn score(volume: u64, segment: usize, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in volume
        .to_le_bytes()
        .iter()
        .chain(&(segment as u64).to_le_bytes())
        .chain(node.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The nodes (indices into `nodes`) of each of `segments` segments of a
/// volume, `k + m` distinct ones each, with as few shards of one segment
/// in one zone as the zones allow.
pub fn place(
    nodes: &[NodeRecord],
    volume: u64,
    segments: usize,
    k: usize,
    m: usize,
) -> Result<Vec<Vec<u16>>, PlacementError> {
    let need = k + m;
    if nodes.len() < need {
        let mut names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        return Err(PlacementError::TooFewNodes {
            k,
            m,
            need,
            have: nodes.len(),
            names: if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        });
    }
    let mut out = Vec::with_capacity(segments);
    for segment in 0..segments {
        // Per zone, its nodes by preference for this segment.
        let mut zones: BTreeMap<&str, Vec<(u64, usize)>> = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            zones
                .entry(n.zone.as_str())
                .or_default()
                .push((score(volume, segment, &n.name), i));
        }
        for candidates in zones.values_mut() {
            candidates.sort_unstable_by(|a, b| b.cmp(a));
        }
        let mut taken: BTreeMap<&str, usize> = BTreeMap::new();
        let mut chosen = Vec::with_capacity(need);
        while chosen.len() < need {
            // The zone with the fewest shards so far that has a node left;
            // ties go to the zone whose best node scores highest.
            let zone = zones
                .iter()
                .filter(|(_, c)| !c.is_empty())
                .min_by_key(|(z, c)| {
                    (
                        taken.get(*z).copied().unwrap_or(0),
                        std::cmp::Reverse(c[0].0),
                    )
                })
                .map(|(z, _)| *z);
            let Some(zone) = zone else { break };
            if let Some(candidates) = zones.get_mut(zone) {
                let (_, i) = candidates.remove(0);
                chosen.push(i as u16);
                *taken.entry(zone).or_default() += 1;
            }
        }
        out.push(chosen);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, zone: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: "x".into(),
            zone: zone.into(),
            capacity: 0,
            used: 0,
        }
    }

    #[test]
    fn shards_are_distinct_and_spread_over_zones() {
        let nodes: Vec<NodeRecord> = (0..9)
            .map(|i| node(&format!("n{i}"), &format!("z{}", i % 3)))
            .collect();
        let placed = place(&nodes, 42, 50, 4, 2).unwrap();
        let mut per_node = vec![0; 9];
        for seg in &placed {
            let mut seen = seg.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 6, "distinct nodes");
            let mut zones = [0; 3];
            for &i in seg {
                zones[i as usize % 3] += 1;
                per_node[i as usize] += 1;
            }
            assert_eq!(zones, [2, 2, 2], "two shards per zone");
        }
        assert!(
            per_node.iter().all(|&c| c > 20),
            "spread over all nodes: {per_node:?}"
        );
    }

    #[test]
    fn too_few_nodes_are_named_in_the_refusal() {
        let nodes = vec![node("a", "z"), node("b", "z")];
        let err = place(&nodes, 1, 1, 4, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a 4+2 volume needs 6 live storage nodes with room for it; 2 are: a, b"
        );
    }
}
