//! The service-backed suite: the real gateway loads the real service source
//! plugins (`redis-source`, `mqtt-source`, `postgres-source`, `nats-source`),
//! real WebSocket clients subscribe, and the tests publish to the real
//! services on 127.0.0.1 with their client crates.
//!
//! Run: `cargo test --workspace --features services --test services` (add a filter such
//! as `redis` to run one service's tests). Needs Redis on 6379, Mosquitto on
//! 1883, NATS with JetStream on 4222 and PostgreSQL on 5432 (user postgres,
//! trust auth, database `test`). A service that cannot be reached fails its
//! tests with a message naming it and its address; nothing is skipped.
//!
//! The outage tests never stop the shared services: they start a private
//! `redis-server` / `mosquitto` on a free port (the binaries must be
//! installed), stop and restart that, and a guard kills it even when the test
//! fails. Backlog tests use a [`support::Gate`] (a TCP forwarder they open
//! once their WebSocket client is connected) so that what the plugin delivers
//! first has a subscriber.

#[path = "../common/mod.rs"]
mod common;
mod support;

mod cluster;
mod mqtt;
mod nats;
mod postgres;
mod redis;
