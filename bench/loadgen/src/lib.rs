//! WebSocket fan-out load generator (library part; the `loadgen` binary is a
//! thin CLI over [`run::run`] and [`publish::publish`]).
//!
//! See README.md for usage and the meaning of every output field.

pub mod nats;
pub mod publish;
pub mod run;
pub mod scan;
pub mod sys;
pub mod ws;

pub use run::{Config, Mode, Report, SetupError, run};
