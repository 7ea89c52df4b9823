//! The unified structures as one graph of nodes, the graph the analysis walks.
//!
//! Nodes are the store's nodes (each class read through its root) followed by
//! the inner nodes and the runs of every rope, read in place. A class's sum lists its
//! pieces through its rope: a whole rope by its two halves, a range of one (a
//! view) by the few rope nodes that cover it, found only when a walk reaches
//! it. Rope nodes are shared by every sum over the same pieces, so a walk
//! that visits each node once stays linear in the store, and building the
//! graph costs O(1) per class however many pieces its sum has.

use std::ops::Deref;

use crate::rope::{Node, Rope, Ropes, View};
use crate::unify::{Def, Store};

/// What a store node's class is made of; children are nodes of the graph.
#[derive(Debug, Clone)]
enum Shape {
    Leaf,
    Sum(Vec<usize>),
    Product(Vec<usize>),
    /// A sum over a range of a rope, expanded when a walk reaches it.
    View(View),
}

/// What a node is, for walks that treat each kind differently. Rope nodes
/// are sums: part of the sum above them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Leaf,
    Sum,
    Product,
}

/// The graph of classes and rope nodes.
#[derive(Debug, Clone)]
pub(crate) struct Structure {
    /// One per store node; meaningful on class roots.
    shape: Vec<Shape>,
    roots: Vec<usize>,
    size: Vec<u64>,
    ropes: Ropes,
    /// The class root of every piece that runs list (runs are slices of it).
    listed_roots: Vec<usize>,
}

/// The children of a node: borrowed where the graph lists them, made where
/// they are read off a rope.
pub(crate) enum Kids<'a> {
    Listed(&'a [usize]),
    Two([usize; 2]),
    Made(Vec<usize>),
}

impl Deref for Kids<'_> {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        match self {
            Kids::Listed(list) => list,
            Kids::Two(pair) => pair,
            Kids::Made(list) => list,
        }
    }
}

impl Structure {
    /// The graph of a unified store (whose ropes it takes over).
    pub fn from_store(store: &mut Store) -> Self {
        let num_store_nodes = store.num_nodes();
        let roots: Vec<usize> = (0..num_store_nodes).map(|n| store.find(n)).collect();
        let size: Vec<u64> = (0..num_store_nodes).map(|n| store.size(n)).collect();
        let ropes = store.take_ropes();
        let num_joins = ropes.num_joins();
        let node_of = |rope: Rope| match rope.node() {
            Node::Piece(node) => roots[node],
            Node::Join(join) => num_store_nodes + join,
            Node::Run(run) => num_store_nodes + num_joins + run,
        };
        let shape = (0..num_store_nodes)
            .map(|node| match store.def_of_root(node) {
                _ if roots[node] != node => Shape::Leaf,
                None => Shape::Leaf,
                Some(Def::Product(c)) => Shape::Product(c.iter().map(|&x| roots[x]).collect()),
                // A whole rope is its two halves; a range is read when reached.
                Some(Def::Sum(view)) if *view == ropes.whole(view.rope) => match view.rope.node() {
                    Node::Join(join) => {
                        let (left, right) = ropes.halves(join);
                        Shape::Sum(vec![node_of(left), node_of(right)])
                    }
                    // A run (its pieces listed once) or a single piece.
                    _ => Shape::Sum(vec![node_of(view.rope)]),
                },
                Some(Def::Sum(view)) => Shape::View(*view),
            })
            .collect();
        let listed_roots = ropes.listed_nodes().map(|n| roots[n]).collect();
        Structure {
            shape,
            roots,
            size,
            ropes,
            listed_roots,
        }
    }

    /// Store nodes, then inner rope nodes, then runs.
    pub fn num_nodes(&self) -> usize {
        self.shape.len() + self.ropes.num_joins() + self.ropes.num_runs()
    }

    pub fn num_store_nodes(&self) -> usize {
        self.shape.len()
    }

    /// The class root of a store node.
    pub fn root(&self, node: usize) -> usize {
        self.roots[node]
    }

    #[inline]
    pub fn size(&self, node: usize) -> u64 {
        match self.rope_of(node) {
            None => self.size[node],
            Some(rope) => self.ropes.size(rope),
        }
    }

    /// The rope node that analysis node `node` stands for, if any.
    fn rope_of(&self, node: usize) -> Option<Rope> {
        let index = node.checked_sub(self.shape.len())?;
        Some(match index.checked_sub(self.ropes.num_joins()) {
            None => Rope::join(index),
            Some(run) => Rope::run(run),
        })
    }

    #[inline]
    pub fn kind(&self, node: usize) -> Kind {
        match self.shape.get(node) {
            Some(Shape::Leaf) => Kind::Leaf,
            Some(Shape::Product(_)) => Kind::Product,
            Some(Shape::Sum(_) | Shape::View(_)) | None => Kind::Sum,
        }
    }

    fn node_of(&self, rope: Rope) -> usize {
        match rope.node() {
            Node::Piece(node) => self.roots[node],
            Node::Join(join) => self.shape.len() + join,
            Node::Run(run) => self.shape.len() + self.ropes.num_joins() + run,
        }
    }

    /// The children of `node`: factors of a product; for a sum, pieces and
    /// the rope nodes that hold runs of them.
    #[inline]
    pub fn children(&self, node: usize) -> Kids<'_> {
        match self.shape.get(node) {
            Some(Shape::Sum(c) | Shape::Product(c)) => Kids::Listed(c),
            Some(Shape::Leaf) => Kids::Listed(&[]),
            _ => self.read_off_rope(node),
        }
    }

    /// The children of a rope node, or of a sum over a range of a rope.
    #[inline(never)]
    fn read_off_rope(&self, node: usize) -> Kids<'_> {
        if let Some(Shape::View(view)) = self.shape.get(node) {
            let cover = self.ropes.cover(*view);
            return Kids::Made(cover.into_iter().map(|r| self.node_of(r)).collect());
        }
        match self.rope_of(node).map(Rope::node) {
            Some(Node::Join(join)) => {
                let (left, right) = self.ropes.halves(join);
                Kids::Two([self.node_of(left), self.node_of(right)])
            }
            Some(Node::Run(run)) => Kids::Listed(&self.listed_roots[self.ropes.run_span(run)]),
            _ => unreachable!("node {node} is out of range"),
        }
    }

    /// The parts of `node`: factors of a product, or every piece of a sum,
    /// left to right, read through its rope (no rope nodes).
    pub fn parts(&self, node: usize) -> Kids<'_> {
        let rope_node = |n: usize| n >= self.shape.len();
        let kids = self.children(node);
        if self.kind(node) == Kind::Product || !kids.iter().copied().any(rope_node) {
            return kids;
        }
        let mut out = Vec::new();
        let mut stack: Vec<usize> = kids.iter().rev().copied().collect();
        while let Some(n) = stack.pop() {
            if rope_node(n) {
                stack.extend(self.children(n).iter().rev());
            } else {
                out.push(n);
            }
        }
        Kids::Made(out)
    }
}

/// Visit every node under `root` children-first, skipping nodes `done` says
/// are already handled; iterative so deep structures cannot overflow.
pub(crate) fn post_order<C: Deref<Target = [usize]>>(
    root: usize,
    children: impl Fn(usize) -> C,
    done: impl Fn(usize) -> bool,
    mut visit: impl FnMut(usize),
) {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(root, false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            visit(node);
            continue;
        }
        if done(node) || !seen.insert(node) {
            continue;
        }
        stack.push((node, true));
        stack.extend(children(node).iter().rev().map(|&c| (c, false)));
    }
}

/// Distinct leaves under `root`, left to right (pre-order); `first_visit`
/// marks a node seen and says whether it was not seen before.
pub(crate) fn leaves_in_order(
    structure: &Structure,
    root: usize,
    mut first_visit: impl FnMut(usize) -> bool,
) -> Vec<usize> {
    let mut leaves = Vec::new();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if !first_visit(node) {
            continue;
        }
        // Only leaves have no children: sums and products have at least one.
        match &*structure.children(node) {
            [] => leaves.push(node),
            children => stack.extend(children.iter().rev()),
        }
    }
    leaves
}
