//! Trie nodes: a header and the child slots in one allocation.
//!
//! A node with `n` children has room for the smallest size class that holds `n` (0, 1, 2, 3, 4,
//! 6, 8, 12, ... 192, 256: at most a third of the slot area is spare). Its slots sit in the same
//! allocation as its header, so a lookup reaches the child pointer without a second dependent
//! load, and the (fat) pointer to it carries the capacity, so no lookup dispatches on the class.

use std::sync::Arc;

use super::Key;
use super::prefixes::{Prefixes, rank};

/// The part of a node that every size class shares.
///
/// `repr(C)` keeps the fields a lookup reads first (key, depth, child bitmap) at the front.
#[repr(C)]
pub(super) struct Head<V> {
    /// The first `depth` bits shared by everything below; later bits are zero.
    pub(super) key: Key,
    /// Bit position of the byte this node branches on: a multiple of 8, below 256.
    pub(super) depth: u16,
    /// Children in the words of `cbits` before each word (at most 192, so a byte each).
    pub(super) cbase: [u8; 4],
    /// Bit `b` set iff there is a child under key byte `b`.
    pub(super) cbits: [u64; 4],
    /// Prefixes of lengths `depth ..= depth + 7`.
    pub(super) prefixes: Prefixes<V>,
}

impl<V: Clone> Clone for Head<V> {
    fn clone(&self) -> Self {
        Head {
            key: self.key,
            depth: self.depth,
            cbase: self.cbase,
            cbits: self.cbits,
            prefixes: self.prefixes.clone(),
        }
    }
}

/// Per-word popcount bases of a child bitmap.
pub(super) fn bases(bits: &[u64; 4]) -> [u8; 4] {
    let mut base = [0u8; 4];
    let mut acc = 0u32;
    for (b, w) in base.iter_mut().zip(bits) {
        *b = acc as u8;
        acc += w.count_ones();
    }
    base
}

impl<V> Head<V> {
    pub(super) fn new(key: Key, depth: u16) -> Self {
        Head {
            key,
            depth,
            cbase: [0; 4],
            cbits: [0; 4],
            prefixes: Prefixes::default(),
        }
    }

    /// Slot index of the child under key byte `b`, if there is one.
    #[inline(always)]
    pub(super) fn child_rank(&self, b: u8) -> Option<usize> {
        let w = usize::from(b >> 6);
        let word = self.cbits[w];
        let bit = 1u64 << (b & 63);
        if word & bit == 0 {
            return None;
        }
        Some(usize::from(self.cbase[w]) + (word & (bit - 1)).count_ones() as usize)
    }

    /// Number of children.
    pub(super) fn child_count(&self) -> usize {
        usize::from(self.cbase[3]) + self.cbits[3].count_ones() as usize
    }

    /// Prefixes plus children.
    pub(super) fn items(&self) -> usize {
        self.prefixes.len() + self.child_count()
    }
}

/// A child slot: occupied slots come first, in key order.
pub(super) type Slot<V> = Option<Child<V>>;

/// A node: the header, then its child slots in the same allocation.
///
/// Built as `Node<V, [Slot<V>; C]>` for a size class `C` and used through the unsized
/// `Node<V, [Slot<V>]>` (a safe `Arc` coercion): the pointer carries the capacity, so reaching
/// a slot needs neither a second allocation nor a per-class dispatch.
#[repr(C)]
pub(super) struct Node<V, S: ?Sized> {
    pub(super) head: Head<V>,
    pub(super) slots: S,
}

/// A node of any capacity.
pub(super) type DynNode<V> = Node<V, [Slot<V>]>;

/// A prefix with nothing else beneath it, hung directly in its parent's child slot.
pub(super) struct Leaf<V> {
    /// The prefix bits; bits from `len` on are zero.
    pub(super) key: Key,
    /// The prefix length, at least the parent's depth + 8.
    pub(super) len: u16,
    pub(super) value: V,
}

impl<V: Clone> Clone for Leaf<V> {
    fn clone(&self) -> Self {
        Leaf {
            key: self.key,
            len: self.len,
            value: self.value.clone(),
        }
    }
}

/// A borrowed look at a child: a node's header and slots, or a leaf.
pub(super) enum View<'a, V> {
    Node(&'a Head<V>, &'a [Slot<V>]),
    Leaf(&'a Leaf<V>),
}

/// A node's contents taken apart, to be rebuilt in the size class that fits.
pub(super) struct Builder<V> {
    pub(super) head: Head<V>,
    /// Children in key order; `head.cbits` says which bytes they sit under.
    pub(super) children: Vec<Child<V>>,
}

impl<V> Builder<V> {
    pub(super) fn new(key: Key, depth: u16) -> Self {
        Builder {
            head: Head::new(key, depth),
            children: Vec::new(),
        }
    }

    /// Adds `c` under key byte `b`, which must be free.
    pub(super) fn add_child(&mut self, b: u8, c: Child<V>) {
        let i = usize::from(b);
        let r = rank(&self.head.cbits, i);
        self.head.cbits[i >> 6] |= 1 << (i & 63);
        self.children.insert(r, c);
    }

    /// Takes out the only child, if there is exactly one.
    pub(super) fn into_only_child(mut self) -> Option<Child<V>> {
        if self.children.len() == 1 {
            self.children.pop()
        } else {
            None
        }
    }
}

/// A child of a node: an inner node, or a leaf holding exactly one prefix.
pub(super) enum Child<V> {
    /// A single prefix with nothing else under it.
    Leaf(Arc<Leaf<V>>),
    /// An inner node.
    Node(Arc<DynNode<V>>),
}

impl<V> Clone for Child<V> {
    fn clone(&self) -> Self {
        match self {
            Child::Leaf(l) => Child::Leaf(Arc::clone(l)),
            Child::Node(n) => Child::Node(Arc::clone(n)),
        }
    }
}

impl<V> Child<V> {
    /// Looks at the node or leaf without touching its memory (only its address).
    #[inline(always)]
    pub(super) fn view(&self) -> View<'_, V> {
        match self {
            Child::Leaf(l) => View::Leaf(l),
            Child::Node(n) => View::Node(&n.head, &n.slots),
        }
    }

    /// Bytes of the allocation behind this child, its value array excluded.
    pub(super) fn alloc_size(&self) -> usize {
        match self {
            Child::Leaf(l) => core::mem::size_of_val::<Leaf<V>>(l),
            Child::Node(n) => core::mem::size_of_val::<DynNode<V>>(n),
        }
    }

    /// Builds the node of the smallest class that holds `b.children`.
    pub(super) fn build(b: Builder<V>) -> Child<V> {
        let Builder { mut head, children } = b;
        head.cbase = bases(&head.cbits);
        let cap = class_for(children.len());
        Child::Node(alloc_node(head, children.into_iter().map(Some), cap))
    }
}

impl<V: Clone> Child<V> {
    /// Mutable access to a node's header and slots, copying the node first if it is shared.
    /// `None` for a leaf.
    pub(super) fn node_mut(&mut self) -> Option<(&mut Head<V>, &mut [Slot<V>])> {
        let Child::Node(n) = self else {
            return None;
        };
        if Arc::get_mut(n).is_none() {
            *n = alloc_node(n.head.clone(), n.slots.iter().cloned(), n.slots.len());
        }
        Arc::get_mut(n).map(|n| (&mut n.head, &mut n.slots))
    }

    /// Takes a node apart (copying it if shared); a leaf comes back as `Err`.
    pub(super) fn into_builder(self) -> Result<Builder<V>, Arc<Leaf<V>>> {
        let mut n = match self {
            Child::Leaf(l) => return Err(l),
            Child::Node(n) => n,
        };
        Ok(match Arc::get_mut(&mut n) {
            Some(owned) => Builder {
                head: core::mem::replace(&mut owned.head, Head::new([0; 4], 0)),
                children: owned.slots.iter_mut().filter_map(Option::take).collect(),
            },
            None => Builder {
                head: n.head.clone(),
                children: n.slots.iter().flatten().cloned().collect(),
            },
        })
    }
}

macro_rules! size_classes {
    ($($cap:literal),*) => {
        /// The smallest size class that holds `n` children.
        pub(super) fn class_for(n: usize) -> usize {
            $(if n <= $cap { return $cap; })*
            256
        }

        /// Allocates a node of capacity `cap` (a size class) holding `slots`, then unused slots.
        fn alloc_node<V>(
            head: Head<V>,
            slots: impl Iterator<Item = Slot<V>>,
            cap: usize,
        ) -> Arc<DynNode<V>> {
            let mut it = slots;
            $(
                if cap <= $cap {
                    let slots: [Slot<V>; $cap] = core::array::from_fn(|_| it.next().flatten());
                    return Arc::new(Node { head, slots });
                }
            )*
            let slots: [Slot<V>; 256] = core::array::from_fn(|_| it.next().flatten());
            Arc::new(Node { head, slots })
        }
    };
}

size_classes!(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192);
