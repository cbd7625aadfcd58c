//! The black-box suite in one test binary: the real gateway, real `.so`
//! plugins and real WebSocket and HTTP clients. One binary instead of one per
//! file: the shared harness and the generic code of the client crates are
//! compiled and linked once (32 binaries took about 250 s of compile time,
//! half of a fresh `cargo test --workspace` build), and the tests of all the
//! files share the test threads instead of waiting for each file's slowest.
//!
//! Run one file's tests with its module name as the filter, e.g.
//! `cargo test --workspace --test suite reload::`. Tests that read the
//! process's RSS or own a process-wide logger, or that must not share the
//! cores, have their own binaries beside this one (`tests/abuse.rs`,
//! `tests/soak.rs`, `tests/slow_consumer_load.rs`,
//! `tests/source_plugins.rs`).

#[path = "../common/mod.rs"]
mod common;

mod asyncapi;
mod auth_modes;
mod bad_input;
mod config_errors;
mod config_schema;
mod delivery;
mod example_crypto_monitor;
mod example_iot_telemetry;
mod example_jobs_chain_market;
mod example_ledger_events;
mod example_relay_sync;
mod fuzz_config;
mod fuzz_messages;
mod http;
mod http_routes;
mod limits;
mod plugins;
mod protocol;
mod publish_api;
mod reload;
mod shipped_yaml;
mod shutdown;
mod slow_consumer;
mod source_examples;
mod status_page;
mod subscribe;
mod tls;
mod validation;
