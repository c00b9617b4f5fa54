//! A reader and a writer of bbolt database files, the format of etcd's
//! backend and of the snapshots `etcdctl snapshot save` writes (see bbolt's
//! `page.go`, `node.go`, `bucket.go`, `db.go`).
//!
//! Layout: fixed-size pages (4096 bytes here). Pages 0 and 1 are meta
//! pages (magic, version 2, page size, the root bucket, the freelist page,
//! the high-water page id, the transaction id, an FNV-64a checksum); the
//! valid one with the higher transaction id wins. A bucket is a B+tree of
//! branch pages (`pos, ksize, pgid` elements) and leaf pages (`flags, pos,
//! ksize, vsize` elements); `pos` counts from the element to its key. A
//! page whose content is larger than one page runs on over `overflow` more.
//! The root bucket's leaves name the buckets (flag 1) and hold their
//! header (root page id, sequence), followed, when the root is 0, by the
//! bucket's only page inline.
//!
//! The writer streams each bucket's (sorted) pairs into leaf pages as they
//! come, then the branch levels above them, and writes the root bucket,
//! an empty freelist and both meta pages at the end, so a history of any
//! size goes through it without being held in memory.

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

const PAGE_SIZE: usize = 4096;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;
const BUCKET_LEAF: u32 = 0x01;
const BUCKET_HEADER: usize = 16;
/// Bytes of a meta page covered by its checksum (everything before it).
const META_SUMMED: usize = 56;
/// Deeper than any real tree.
const MAX_DEPTH: usize = 64;
/// The most one page may span with its overflow pages (etcd's values are
/// at most a few MiB).
const MAX_PAGE_SPAN: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BoltError {
    #[error("not a bbolt database: {0}")]
    Invalid(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// What the reader calls with each pair of a bucket.
pub type PairVisitor<'f> = dyn FnMut(&[u8], &[u8]) -> Result<(), BoltError> + 'f;
/// The same, with the element's flags (a bucket or a pair).
type ElementVisitor<'f> = dyn FnMut(u32, &[u8], &[u8]) -> Result<(), BoltError> + 'f;
/// A bucket's pairs, in order.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn invalid(what: impl Into<String>) -> BoltError {
    BoltError::Invalid(what.into())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn fnv64a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------- reading

/// A bucket's root: a page of the file, or the page stored inline.
#[derive(Debug, Clone)]
enum Root {
    Page(u64),
    Inline(Vec<u8>),
}

/// An open bbolt file, read page by page.
pub struct Reader {
    file: std::fs::File,
    page_size: usize,
    pages: u64,
    root: u64,
}

impl Reader {
    /// Opens `file` (its first `len` bytes) and checks its meta pages.
    pub fn open(file: std::fs::File, len: u64) -> Result<Reader, BoltError> {
        let mut first = vec![0u8; PAGE_HEADER + 64];
        if len < first.len() as u64 {
            return Err(invalid("file too short"));
        }
        file.read_exact_at(&mut first, 0)?;
        // The page size is meta 0's; if meta 0 is damaged, bbolt's default.
        let mut page_size = u32_at(&first, PAGE_HEADER + 8).unwrap_or(0) as usize;
        if u32_at(&first, PAGE_HEADER) != Some(MAGIC) {
            page_size = PAGE_SIZE;
        }
        if !(512..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(invalid(format!("page size {page_size}")));
        }
        let mut best: Option<(u64, u64, u64)> = None; // (txid, root, pages)
        for id in 0..2u64 {
            let mut meta = vec![0u8; PAGE_HEADER + 64];
            if (id + 1) * page_size as u64 > len {
                continue;
            }
            file.read_exact_at(&mut meta, id * page_size as u64)?;
            let m = &meta[PAGE_HEADER..];
            let ok = u32_at(m, 0) == Some(MAGIC)
                && u32_at(m, 4) == Some(VERSION)
                && u64_at(m, META_SUMMED) == Some(fnv64a(&m[..META_SUMMED]));
            if !ok {
                continue;
            }
            let (root, pages, txid) = (
                u64_at(m, 16).unwrap_or(0),
                u64_at(m, 40).unwrap_or(0),
                u64_at(m, 48).unwrap_or(0),
            );
            if best.is_none_or(|(t, _, _)| txid > t) {
                best = Some((txid, root, pages));
            }
        }
        let (_, root, pages) = best.ok_or_else(|| invalid("no valid meta page"))?;
        if pages > len / page_size as u64 || root >= pages {
            return Err(invalid("meta page points past the end of the file"));
        }
        Ok(Reader {
            file,
            page_size,
            pages,
            root,
        })
    }

    /// Page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Vec<u8>, BoltError> {
        if id < 2 || id >= self.pages {
            return Err(invalid(format!("page {id} out of range")));
        }
        let mut head = vec![0u8; self.page_size];
        self.file
            .read_exact_at(&mut head, id * self.page_size as u64)?;
        let overflow = u64::from(u32_at(&head, 12).unwrap_or(0));
        if overflow >= self.pages - id || overflow * self.page_size as u64 > MAX_PAGE_SPAN {
            return Err(invalid(format!("page {id} overflows the file")));
        }
        if overflow > 0 {
            let mut rest = vec![0u8; overflow as usize * self.page_size];
            self.file
                .read_exact_at(&mut rest, (id + 1) * self.page_size as u64)?;
            head.extend_from_slice(&rest);
        }
        Ok(head)
    }

    /// The names of the top-level buckets, in order.
    pub fn buckets(&self) -> Result<Vec<Vec<u8>>, BoltError> {
        let mut names = Vec::new();
        self.walk(
            &Root::Page(self.root),
            0,
            &mut HashSet::new(),
            &mut |flags, k, _| {
                if flags & BUCKET_LEAF != 0 {
                    names.push(k.to_vec());
                }
                Ok(())
            },
        )?;
        Ok(names)
    }

    /// Calls `f` with every pair of top-level bucket `name`, in key order
    /// (nested buckets are skipped). Returns false when there is no such
    /// bucket.
    pub fn for_each(&self, name: &[u8], f: &mut PairVisitor<'_>) -> Result<bool, BoltError> {
        let mut root = None;
        self.walk(
            &Root::Page(self.root),
            0,
            &mut HashSet::new(),
            &mut |flags, k, v| {
                if flags & BUCKET_LEAF != 0 && k == name {
                    root = Some(bucket_root(v)?);
                }
                Ok(())
            },
        )?;
        let Some(root) = root else {
            return Ok(false);
        };
        self.walk(&root, 0, &mut HashSet::new(), &mut |flags, k, v| {
            if flags & BUCKET_LEAF == 0 {
                f(k, v)?;
            }
            Ok(())
        })?;
        Ok(true)
    }

    /// Visits every leaf element under `root`, each page once: a page met
    /// twice (a cycle, or pages shared between branches) is an error.
    fn walk(
        &self,
        root: &Root,
        depth: usize,
        visited: &mut HashSet<u64>,
        f: &mut ElementVisitor<'_>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH {
            return Err(invalid("tree too deep"));
        }
        let owned;
        let page: &[u8] = match root {
            Root::Inline(p) => p,
            Root::Page(id) => {
                if !visited.insert(*id) {
                    return Err(invalid(format!("page {id} referenced twice")));
                }
                owned = self.page(*id)?;
                &owned
            }
        };
        let flags = u16_at(page, 8).ok_or_else(|| invalid("short page"))?;
        let count = usize::from(u16_at(page, 10).unwrap_or(0));
        for i in 0..count {
            let at = PAGE_HEADER + i * ELEMENT;
            let bad = || invalid("element outside its page");
            if flags & LEAF_PAGE != 0 {
                let eflags = u32_at(page, at).ok_or_else(bad)?;
                let pos = u32_at(page, at + 4).ok_or_else(bad)? as usize;
                let ksize = u32_at(page, at + 8).ok_or_else(bad)? as usize;
                let vsize = u32_at(page, at + 12).ok_or_else(bad)? as usize;
                let k0 = at.checked_add(pos).ok_or_else(bad)?;
                let key = page.get(k0..k0 + ksize).ok_or_else(bad)?;
                let value = page.get(k0 + ksize..k0 + ksize + vsize).ok_or_else(bad)?;
                f(eflags, key, value)?;
            } else if flags & BRANCH_PAGE != 0 {
                let child = u64_at(page, at + 8).ok_or_else(bad)?;
                self.walk(&Root::Page(child), depth + 1, visited, f)?;
            } else {
                return Err(invalid(format!("page of kind {flags:#x} in a bucket")));
            }
        }
        Ok(())
    }
}

fn bucket_root(header: &[u8]) -> Result<Root, BoltError> {
    let root = u64_at(header, 0).ok_or_else(|| invalid("short bucket header"))?;
    if root == 0 {
        let page = header
            .get(BUCKET_HEADER..)
            .ok_or_else(|| invalid("short inline bucket"))?;
        Ok(Root::Inline(page.to_vec()))
    } else {
        Ok(Root::Page(root))
    }
}

// ---------------------------------------------------------------- writing

/// Writes a bbolt file: buckets one after the other, each with its pairs
/// in strictly increasing key order.
pub struct Writer<W: Write + Seek> {
    out: W,
    next_page: u64,
    buckets: Vec<(Vec<u8>, u64)>,
    current: Option<BucketBuilder>,
}

struct BucketBuilder {
    name: Vec<u8>,
    /// The leaf being filled: its pairs and their size on the page.
    pairs: Pairs,
    bytes: usize,
    /// (first key, page id) of every leaf written.
    leaves: Vec<(Vec<u8>, u64)>,
    last_key: Option<Vec<u8>>,
}

impl<W: Write + Seek> Writer<W> {
    /// Starts a file on `out` (pages 0–2 are written by `finish`).
    pub fn new(mut out: W) -> Result<Self, BoltError> {
        out.seek(SeekFrom::Start(3 * PAGE_SIZE as u64))?;
        Ok(Writer {
            out,
            next_page: 3,
            buckets: Vec::new(),
            current: None,
        })
    }

    /// Starts bucket `name` (ending the one before).
    pub fn bucket(&mut self, name: &[u8]) -> Result<(), BoltError> {
        self.end_bucket()?;
        if self.buckets.iter().any(|(n, _)| n == name) {
            return Err(invalid("bucket written twice"));
        }
        self.current = Some(BucketBuilder {
            name: name.to_vec(),
            pairs: Vec::new(),
            bytes: PAGE_HEADER,
            leaves: Vec::new(),
            last_key: None,
        });
        Ok(())
    }

    /// Adds a pair to the current bucket; keys must increase.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        let b = self
            .current
            .as_mut()
            .ok_or_else(|| invalid("put outside a bucket"))?;
        if key.is_empty() || b.last_key.as_deref().is_some_and(|last| key <= last) {
            return Err(invalid("keys must be non-empty and increasing"));
        }
        b.last_key = Some(key.to_vec());
        let size = ELEMENT + key.len() + value.len();
        if !b.pairs.is_empty() && b.bytes + size > PAGE_SIZE {
            let pairs = std::mem::take(&mut b.pairs);
            b.bytes = PAGE_HEADER;
            let first = pairs[0].0.clone();
            let id = self.write_leaf(&pairs, 0)?;
            self.current
                .as_mut()
                .ok_or_else(|| invalid("no bucket"))?
                .leaves
                .push((first, id));
        }
        let b = self.current.as_mut().ok_or_else(|| invalid("no bucket"))?;
        b.bytes += size;
        b.pairs.push((key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn end_bucket(&mut self) -> Result<(), BoltError> {
        let Some(mut b) = self.current.take() else {
            return Ok(());
        };
        if !b.pairs.is_empty() || b.leaves.is_empty() {
            let first = b.pairs.first().map(|p| p.0.clone()).unwrap_or_default();
            let id = self.write_leaf(&b.pairs, 0)?;
            b.leaves.push((first, id));
        }
        let root = self.write_branches(b.leaves)?;
        self.buckets.push((b.name, root));
        Ok(())
    }

    /// Writes branch levels over `children` until one page is the root.
    fn write_branches(&mut self, mut children: Vec<(Vec<u8>, u64)>) -> Result<u64, BoltError> {
        while children.len() > 1 {
            let mut level = Vec::new();
            let mut page: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut bytes = PAGE_HEADER;
            for child in children {
                let size = ELEMENT + child.0.len();
                if !page.is_empty() && bytes + size > PAGE_SIZE {
                    let first = page[0].0.clone();
                    level.push((first, self.write_branch(&std::mem::take(&mut page))?));
                    bytes = PAGE_HEADER;
                }
                bytes += size;
                page.push(child);
            }
            let first = page[0].0.clone();
            level.push((first, self.write_branch(&page)?));
            children = level;
        }
        Ok(children[0].1)
    }

    fn write_leaf(&mut self, pairs: &[(Vec<u8>, Vec<u8>)], flags: u32) -> Result<u64, BoltError> {
        let mut elements = Vec::with_capacity(pairs.len() * ELEMENT);
        let mut data = Vec::new();
        for (i, (k, v)) in pairs.iter().enumerate() {
            let pos = pairs.len() * ELEMENT - i * ELEMENT + data.len();
            elements.extend_from_slice(&flags.to_le_bytes());
            elements.extend_from_slice(&(pos as u32).to_le_bytes());
            elements.extend_from_slice(&(k.len() as u32).to_le_bytes());
            elements.extend_from_slice(&(v.len() as u32).to_le_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(v);
        }
        self.write_page(LEAF_PAGE, pairs.len(), &elements, &data)
    }

    fn write_branch(&mut self, children: &[(Vec<u8>, u64)]) -> Result<u64, BoltError> {
        let mut elements = Vec::with_capacity(children.len() * ELEMENT);
        let mut data = Vec::new();
        for (i, (k, id)) in children.iter().enumerate() {
            let pos = children.len() * ELEMENT - i * ELEMENT + data.len();
            elements.extend_from_slice(&(pos as u32).to_le_bytes());
            elements.extend_from_slice(&(k.len() as u32).to_le_bytes());
            elements.extend_from_slice(&id.to_le_bytes());
            data.extend_from_slice(k);
        }
        self.write_page(BRANCH_PAGE, children.len(), &elements, &data)
    }

    /// Appends a page (with overflow pages as needed); returns its id.
    fn write_page(
        &mut self,
        flags: u16,
        count: usize,
        elements: &[u8],
        data: &[u8],
    ) -> Result<u64, BoltError> {
        let count = u16::try_from(count).map_err(|_| invalid("too many elements on a page"))?;
        let len = PAGE_HEADER + elements.len() + data.len();
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let id = self.next_page;
        let mut page = Vec::with_capacity(pages * PAGE_SIZE);
        page.extend_from_slice(&id.to_le_bytes());
        page.extend_from_slice(&flags.to_le_bytes());
        page.extend_from_slice(&count.to_le_bytes());
        page.extend_from_slice(&((pages - 1) as u32).to_le_bytes());
        page.extend_from_slice(elements);
        page.extend_from_slice(data);
        page.resize(pages * PAGE_SIZE, 0);
        self.out.write_all(&page)?;
        self.next_page += pages as u64;
        Ok(id)
    }

    /// Writes the root bucket, the freelist and the meta pages; returns the
    /// writer and the file's length.
    pub fn finish(mut self) -> Result<(W, u64), BoltError> {
        self.end_bucket()?;
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort();
        let entries: Pairs = buckets
            .into_iter()
            .map(|(name, root)| {
                let mut header = root.to_le_bytes().to_vec();
                header.extend_from_slice(&0u64.to_le_bytes());
                (name, header)
            })
            .collect();
        // The root bucket is small (a few names): one leaf, overflowing if
        // it must.
        let root = self.write_leaf(&entries, BUCKET_LEAF)?;
        let pages = self.next_page;
        let len = pages * PAGE_SIZE as u64;
        // Page 2: an empty freelist.
        let mut freelist = vec![0u8; PAGE_SIZE];
        freelist[..8].copy_from_slice(&2u64.to_le_bytes());
        freelist[8..10].copy_from_slice(&FREELIST_PAGE.to_le_bytes());
        self.out.seek(SeekFrom::Start(2 * PAGE_SIZE as u64))?;
        self.out.write_all(&freelist)?;
        for id in 0..2u64 {
            let mut page = vec![0u8; PAGE_SIZE];
            page[..8].copy_from_slice(&id.to_le_bytes());
            page[8..10].copy_from_slice(&META_PAGE.to_le_bytes());
            let mut m = Vec::with_capacity(64);
            m.extend_from_slice(&MAGIC.to_le_bytes());
            m.extend_from_slice(&VERSION.to_le_bytes());
            m.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&root.to_le_bytes());
            m.extend_from_slice(&0u64.to_le_bytes());
            m.extend_from_slice(&2u64.to_le_bytes());
            m.extend_from_slice(&pages.to_le_bytes());
            // Transaction ids 2 and 3: the meta page of a transaction is
            // page txid % 2.
            m.extend_from_slice(&(id + 2).to_le_bytes());
            let sum = fnv64a(&m);
            m.extend_from_slice(&sum.to_le_bytes());
            page[PAGE_HEADER..PAGE_HEADER + m.len()].copy_from_slice(&m);
            self.out.seek(SeekFrom::Start(id * PAGE_SIZE as u64))?;
            self.out.write_all(&page)?;
        }
        self.out.seek(SeekFrom::Start(len))?;
        self.out.flush()?;
        Ok((self.out, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(buckets: &[(&str, Pairs)]) -> Reader {
        let file = tempfile::tempfile().unwrap();
        let mut w = Writer::new(file).unwrap();
        for (name, pairs) in buckets {
            w.bucket(name.as_bytes()).unwrap();
            for (k, v) in pairs {
                w.put(k, v).unwrap();
            }
        }
        let (file, len) = w.finish().unwrap();
        assert_eq!(file.metadata().unwrap().len(), len);
        Reader::open(file, len).unwrap()
    }

    #[test]
    fn buckets_of_every_size_read_back() {
        let many: Pairs = (0..20_000u32)
            .map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; (i % 50) as usize]))
            .collect();
        let big = vec![(b"big".to_vec(), vec![7u8; 3 * PAGE_SIZE + 5])];
        let r = roundtrip(&[
            ("key", many.clone()),
            ("empty", vec![]),
            ("meta", big.clone()),
        ]);
        assert_eq!(
            r.buckets().unwrap(),
            vec![b"empty".to_vec(), b"key".to_vec(), b"meta".to_vec()]
        );
        for (name, want) in [("key", &many), ("meta", &big), ("empty", &vec![])] {
            let mut got = Vec::new();
            assert!(r
                .for_each(name.as_bytes(), &mut |k, v| {
                    got.push((k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .unwrap());
            assert_eq!(&got, want, "{name}");
        }
        assert!(!r.for_each(b"missing", &mut |_, _| Ok(())).unwrap());
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let file = tempfile::tempfile().unwrap();
        let mut w = Writer::new(file).unwrap();
        w.bucket(b"b").unwrap();
        w.put(b"k", b"v").unwrap();
        assert!(w.put(b"a", b"v").is_err(), "keys out of order");
        let (file, len) = w.finish().unwrap();
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        // Every single flipped byte in the metas and the first data pages:
        // an error or a readable file, never a panic.
        for at in (0..bytes.len()).step_by(7) {
            let mut copy = bytes.clone();
            copy[at] ^= 0xA5;
            let f = tempfile::tempfile().unwrap();
            f.write_all_at(&copy, 0).unwrap();
            if let Ok(r) = Reader::open(f, len) {
                let _ = r.buckets();
                let _ = r.for_each(b"b", &mut |_, _| Ok(()));
            }
        }
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"not a database", 0).unwrap();
        assert!(Reader::open(f, 14).is_err());

        // A branch page whose children are itself: refused, not walked
        // forever. (The root bucket's leaf is the last page; point bucket
        // "b" at a hand-made branch page.)
        let file = tempfile::tempfile().unwrap();
        let mut w = Writer::new(file).unwrap();
        w.bucket(b"b").unwrap();
        w.put(b"k", b"v").unwrap();
        let (file, len) = w.finish().unwrap();
        let mut branch = vec![0u8; PAGE_SIZE];
        branch[..8].copy_from_slice(&3u64.to_le_bytes());
        branch[8..10].copy_from_slice(&BRANCH_PAGE.to_le_bytes());
        branch[10..12].copy_from_slice(&2u16.to_le_bytes());
        for i in 0..2 {
            let at = PAGE_HEADER + i * ELEMENT;
            branch[at..at + 4].copy_from_slice(&((2 * ELEMENT - i * ELEMENT) as u32).to_le_bytes());
            branch[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
            branch[at + 8..at + 16].copy_from_slice(&3u64.to_le_bytes());
        }
        branch[PAGE_HEADER + 2 * ELEMENT] = b'a';
        branch[PAGE_HEADER + 2 * ELEMENT + 1] = b'b';
        file.write_all_at(&branch, 3 * PAGE_SIZE as u64).unwrap();
        let r = Reader::open(file, len).unwrap();
        let err = r.for_each(b"b", &mut |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("referenced twice"), "{err}");
    }
}
