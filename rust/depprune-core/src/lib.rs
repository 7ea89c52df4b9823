//! depprune-core: the axis algebra behind depprune's structural pruning.
//!
//! Every tensor axis of a traced model is an *axis*; ops relate axes through
//! *equations* (equal, sum = concatenation, product = row-major merge). The
//! core unifies them with union-find, refining atoms into common sums and
//! products, and reads off *groups*: classes of atoms whose units can be
//! removed together from every parameter that shares them. No Python here:
//! flat slices in, `Vec`s out.
//!
//! ```
//! use depprune_core::{analyze, EquationSet, ParamTable};
//! // Residual stream: fc1 input dim == fc2 output dim (axis 0), hidden axis 1.
//! let eqs = EquationSet {
//!     axis_sizes: &[4, 6, 4],
//!     kinds: &[0],
//!     left: &[0],
//!     right_offsets: &[0, 1],
//!     right: &[2],
//!     frozen_axes: &[],
//! };
//! let params = ParamTable { params: &[0, 0, 1, 1], dims: &[0, 1, 0, 1], axes: &[1, 0, 2, 1] };
//! let analysis = analyze(&eqs, &params).unwrap();
//! assert_eq!(analysis.group_sizes(), &[6, 4]);
//! assert_eq!(analysis.member_rows(), &[0, 3, 1, 2]);
//! ```

mod analysis;
mod builder;
mod error;
mod gather;
mod input;
mod rope;
mod structure;
mod sums;
mod unify;

pub use analysis::{analyze, Analysis};
pub use builder::EquationBuilder;
pub use error::CoreError;
pub use gather::take_rows_columns;
pub use input::{EquationKind, EquationSet, ParamTable, MAX_AXIS_SIZE};
pub use sums::{power_sums, Bf16, Element, Power, BLOCK_ROWS};
