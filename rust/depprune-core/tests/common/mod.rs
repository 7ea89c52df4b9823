//! Test helpers: an equation builder and a brute-force element-level oracle.
#![allow(dead_code)]

use std::collections::HashSet;

use depprune_core::{Analysis, EquationBuilder};

/// The core's own builder, with a shorthand that expects valid equations.
pub type Builder = EquationBuilder;

pub trait Solve {
    fn solve(&self) -> Analysis;
}

impl Solve for Builder {
    fn solve(&self) -> Analysis {
        self.analyze().expect("valid equations")
    }
}

/// Groups as (size, member rows), in the core's order.
pub fn groups(a: &Analysis) -> Vec<(i64, Vec<i64>)> {
    let offsets = a.member_offsets();
    a.group_sizes()
        .iter()
        .enumerate()
        .map(|(g, &size)| {
            let rows = a.member_rows()[offsets[g] as usize..offsets[g + 1] as usize].to_vec();
            (size, rows)
        })
        .collect()
}

/// The unit map of one (group, row) pair.
pub fn unit_map(a: &Analysis, group: usize, row: usize) -> Vec<i64> {
    let (offsets, values) = a.unit_maps(&[group as i64]).unwrap();
    let rows = &a.member_rows()
        [a.member_offsets()[group] as usize..a.member_offsets()[group + 1] as usize];
    let k = rows
        .iter()
        .position(|&r| r as usize == row)
        .expect("row is a member");
    values[offsets[k] as usize..offsets[k + 1] as usize].to_vec()
}

/// The group whose members include `row` and whose unit map on it is not all -1.
pub fn group_sizes_of_row(a: &Analysis, row: usize) -> Vec<i64> {
    groups(a)
        .iter()
        .filter(|(_, rows)| rows.contains(&(row as i64)))
        .map(|(size, _)| *size)
        .collect()
}

/// Keep mask that removes exactly the given (group, unit) pairs.
pub fn keep_without(a: &Analysis, removed: &[(usize, i64)]) -> Vec<u8> {
    let mut keep = vec![1u8; a.num_units() as usize];
    for &(g, u) in removed {
        keep[(a.unit_offsets()[g] + u) as usize] = 0;
    }
    keep
}

/// Kept indices of one row under a keep mask.
pub fn kept_of_row(a: &Analysis, keep: &[u8], row: usize) -> Vec<i64> {
    let (offsets, indices) = a.kept_indices(keep).unwrap();
    indices[offsets[row] as usize..offsets[row + 1] as usize].to_vec()
}

/// Element-level constraints of an equation set: every element is a boolean
/// "kept"; equal and sum identify elements; a product element is kept iff all
/// its coordinates are; frozen axes and size-1 product factors are kept.
pub struct Oracle {
    pub axis_base: Vec<usize>,
    pub num_vars: usize,
    class: Vec<usize>,
    products: Vec<(usize, Vec<usize>)>,
    forced: Vec<usize>,
}

fn find(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

impl Oracle {
    pub fn new(b: &Builder) -> Self {
        let mut axis_base = Vec::new();
        let mut total = 0usize;
        for &s in &b.sizes {
            axis_base.push(total);
            total += s as usize;
        }
        let var = |axis: i64, i: usize| axis_base[axis as usize] + i;
        let mut parent: Vec<usize> = (0..total).collect();
        let mut products = Vec::new();
        let mut forced = Vec::new();
        for e in 0..b.kinds.len() {
            let left = b.left[e];
            let right = &b.right[b.offsets[e] as usize..b.offsets[e + 1] as usize];
            match b.kinds[e] {
                0 | 1 => {
                    let mut offset = 0;
                    for &r in right {
                        for i in 0..b.sizes[r as usize] as usize {
                            let (x, y) = (
                                find(&mut parent, var(left, offset + i)),
                                find(&mut parent, var(r, i)),
                            );
                            parent[x] = y;
                        }
                        offset += b.sizes[r as usize] as usize;
                    }
                }
                _ => {
                    let sizes: Vec<usize> = right
                        .iter()
                        .map(|&r| b.sizes[r as usize] as usize)
                        .collect();
                    for &r in right {
                        if b.sizes[r as usize] == 1 {
                            forced.push(var(r, 0));
                        }
                    }
                    let n = b.sizes[left as usize] as usize;
                    for flat in 0..n {
                        let mut rem = flat;
                        let mut coords = vec![0; sizes.len()];
                        for k in (0..sizes.len()).rev() {
                            coords[k] = rem % sizes[k];
                            rem /= sizes[k];
                        }
                        let factors = right
                            .iter()
                            .zip(&coords)
                            .map(|(&r, &c)| var(r, c))
                            .collect();
                        products.push((var(left, flat), factors));
                    }
                }
            }
        }
        for &a in &b.frozen {
            for i in 0..b.sizes[a as usize] as usize {
                forced.push(var(a, i));
            }
        }
        let class = (0..total).map(|v| find(&mut parent, v)).collect();
        Oracle {
            axis_base,
            num_vars: total,
            class,
            products,
            forced,
        }
    }

    /// Does an element assignment (indexed like the vars) meet every constraint?
    pub fn satisfied(&self, kept: &[bool]) -> bool {
        (0..self.num_vars).all(|v| kept[v] == kept[self.class[v]])
            && self.forced.iter().all(|&v| kept[v])
            && self
                .products
                .iter()
                .all(|(l, f)| kept[*l] == f.iter().all(|&x| kept[x]))
    }

    /// Does every non-empty axis keep at least one element? Pruning never
    /// empties an axis; once one is empty the product equations through it
    /// say nothing about the other factors, so such assignments are not counted.
    pub fn no_axis_emptied(&self, kept: &[bool]) -> bool {
        let mut bounds = self.axis_base.clone();
        bounds.push(self.num_vars);
        bounds
            .windows(2)
            .all(|w| w[0] == w[1] || kept[w[0]..w[1]].iter().any(|&k| k))
    }

    /// Count the assignments meeting every constraint with no axis emptied,
    /// by backtracking over element classes; `None` if more than `limit`
    /// nodes would be searched.
    pub fn count_solutions(&self, limit: usize) -> Option<usize> {
        let classes: Vec<usize> = {
            let mut seen = HashSet::new();
            self.class
                .iter()
                .copied()
                .filter(|c| seen.insert(*c))
                .collect()
        };
        let position: std::collections::HashMap<usize, usize> =
            classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let forced: HashSet<usize> = self
            .forced
            .iter()
            .map(|&v| position[&self.class[v]])
            .collect();
        // Each product constraint is checked once its last class is assigned.
        let mut checks: Vec<Vec<(usize, Vec<usize>)>> = vec![Vec::new(); classes.len()];
        for (l, f) in &self.products {
            let l = position[&self.class[*l]];
            let f: Vec<usize> = f.iter().map(|&x| position[&self.class[x]]).collect();
            let last = f.iter().copied().chain([l]).max().unwrap();
            checks[last].push((l, f));
        }
        let mut value = vec![false; classes.len()];
        let mut count = 0usize;
        let mut nodes = 0usize;
        // Iterative DFS: (depth, next value to try).
        let mut stack = vec![(0usize, 0u8)];
        while let Some((depth, choice)) = stack.pop() {
            nodes += 1;
            if nodes > limit {
                return None;
            }
            if depth == classes.len() {
                let kept: Vec<bool> = self.class.iter().map(|c| value[position[c]]).collect();
                count += usize::from(self.no_axis_emptied(&kept));
                continue;
            }
            if choice > 1 {
                continue;
            }
            stack.push((depth, choice + 1));
            let v = choice == 1;
            if forced.contains(&depth) && !v {
                continue;
            }
            value[depth] = v;
            let ok = checks[depth]
                .iter()
                .all(|(l, f)| value[*l] == f.iter().all(|&x| value[x]));
            if ok {
                stack.push((depth + 1, 0));
            }
        }
        Some(count)
    }
}
