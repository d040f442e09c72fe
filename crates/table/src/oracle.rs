//! A deliberately naive reference implementation, used as the test oracle for
//! [`PrefixMap`](crate::PrefixMap).
//!
//! [`BitTrie`] is a binary trie with one node per bit: each operation walks the prefix bit by
//! bit, so it is slow and memory-hungry but obviously correct. It is public so that tests and
//! benchmarks outside this crate can cross-check against it; it is not meant for production use.

use serval_wire::{ServiceId, ServicePrefix};

struct BitNode<V> {
    value: Option<V>,
    children: [Option<Box<BitNode<V>>>; 2],
}

impl<V> BitNode<V> {
    fn new() -> Self {
        BitNode {
            value: None,
            children: [None, None],
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.iter().all(Option::is_none)
    }
}

/// A binary trie, one node per bit, with the same map semantics as
/// [`PrefixMap`](crate::PrefixMap).
pub struct BitTrie<V> {
    root: BitNode<V>,
    len: usize,
}

impl<V> Default for BitTrie<V> {
    fn default() -> Self {
        BitTrie {
            root: BitNode::new(),
            len: 0,
        }
    }
}

impl<V> BitTrie<V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of prefixes stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no prefix is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps `p` to `v`; returns the previous value.
    pub fn insert(&mut self, p: ServicePrefix, v: V) -> Option<V> {
        let mut node = &mut self.root;
        for i in 0..p.len() {
            let bit = usize::from(p.id().bit(i));
            node = node.children[bit].get_or_insert_with(|| Box::new(BitNode::new()));
        }
        let old = node.value.replace(v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `p`, pruning nodes left empty; returns its value.
    pub fn remove(&mut self, p: &ServicePrefix) -> Option<V> {
        fn go<V>(node: &mut BitNode<V>, id: &ServiceId, depth: u16, len: u16) -> Option<V> {
            if depth == len {
                return node.value.take();
            }
            let bit = usize::from(id.bit(depth));
            let child = node.children[bit].as_mut()?;
            let out = go(child, id, depth + 1, len);
            if child.is_empty() {
                node.children[bit] = None;
            }
            out
        }
        let out = go(&mut self.root, p.id(), 0, p.len());
        if out.is_some() {
            self.len -= 1;
        }
        out
    }

    /// The value stored for exactly `p`.
    pub fn get(&self, p: &ServicePrefix) -> Option<&V> {
        let mut node = &self.root;
        for i in 0..p.len() {
            node = node.children[usize::from(p.id().bit(i))].as_deref()?;
        }
        node.value.as_ref()
    }

    /// The longest stored prefix containing `id`, with its value.
    pub fn longest_match(&self, id: &ServiceId) -> Option<(ServicePrefix, &V)> {
        let mut best = self.root.value.as_ref().map(|v| (0, v));
        let mut node = &self.root;
        for i in 0..256u16 {
            match node.children[usize::from(id.bit(i))].as_deref() {
                Some(n) => node = n,
                None => break,
            }
            if let Some(v) = &node.value {
                best = Some((i + 1, v));
            }
        }
        best.map(|(len, v)| (ServicePrefix::new(*id, len), v))
    }

    /// Every prefix with its value, in ascending [`ServicePrefix`] order (a pre-order walk,
    /// 0-branch first).
    pub fn iter(&self) -> impl Iterator<Item = (ServicePrefix, &V)> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack: Vec<(&BitNode<V>, [u8; 32], u16)> = vec![(&self.root, [0; 32], 0)];
        while let Some((node, bits, depth)) = stack.pop() {
            if let Some(v) = &node.value {
                out.push((ServicePrefix::new(ServiceId(bits), depth), v));
            }
            // Push the 1-branch first so that the 0-branch is walked first.
            for bit in [1usize, 0] {
                if let Some(c) = &node.children[bit] {
                    let mut b = bits;
                    if bit == 1 {
                        b[usize::from(depth / 8)] |= 0x80 >> (depth % 8);
                    }
                    stack.push((c, b, depth + 1));
                }
            }
        }
        out.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The oracle's own oracle: a linear scan.
    #[test]
    fn agrees_with_linear_scan() {
        let ids: Vec<ServiceId> = (0u8..40)
            .map(|i| {
                let mut b = [0u8; 32];
                b[0] = i.wrapping_mul(37);
                b[1] = i % 3;
                b[31] = i;
                ServiceId(b)
            })
            .collect();
        let mut t = BitTrie::new();
        let mut all = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let p = ServicePrefix::new(*id, [0, 3, 8, 9, 16, 255, 256][i % 7]);
            t.insert(p, i);
            all.retain(|(q, _)| *q != p);
            all.push((p, i));
        }
        for id in &ids {
            let want = all
                .iter()
                .filter(|(p, _)| p.contains(id))
                .max_by_key(|(p, _)| p.len())
                .map(|(p, v)| (*p, v));
            assert_eq!(t.longest_match(id), want);
        }
        all.sort();
        assert_eq!(
            t.iter().map(|(p, v)| (p, *v)).collect::<Vec<_>>(),
            all.clone()
        );
        for (p, v) in &all {
            assert_eq!(t.remove(p), Some(*v));
        }
        assert!(t.is_empty() && t.root.is_empty());
    }
}
