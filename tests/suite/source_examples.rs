//! The example deployment of the service source plugins
//! (`examples/sources/services`) loads with the gateway's config loader, and
//! each channel's `source.config` is accepted by its plugin's `create`
//! (`gateway check` does not create instances). Creating an instance does not
//! connect, so this needs no running service.

use std::sync::Arc;

use crate::common::*;
use gateway::config::{self, LoadOptions};
use gateway::plugin::{Instance, InstanceParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_source_examples_load_and_their_plugin_configs_are_accepted() {
    let plugins = build_plugins();
    let opts = LoadOptions {
        plugin_dirs: Some(vec![plugins]),
        ..Default::default()
    };
    let path = repo_root().join("examples/sources/services/gateway.yaml");
    let cfg = config::load(&path, &opts)
        .unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()));
    let mut seen: Vec<(String, String, bool)> = cfg
        .channels
        .iter()
        .map(|c| (c.name.to_string(), c.source.name().to_string(), c.keyed))
        .collect();
    seen.sort();
    let expect = [
        ("mqtt-sensors", "mqtt-source", true),
        ("nats-devices", "nats-source", true),
        ("nats-order-log", "nats-source", false),
        ("postgres-jobs", "postgres-source", true),
        ("redis-events-stream", "redis-source", false),
        ("redis-orders", "redis-source", false),
    ]
    .map(|(c, p, k)| (c.to_owned(), p.to_owned(), k));
    assert_eq!(seen, expect);

    for ch in &cfg.channels {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let params = InstanceParams {
            channel: ch.name.clone(),
            config: ch.source.config_json.clone(),
            tx,
            max_message: 1 << 20,
            metrics: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        };
        let plugin = ch.source.plugin().expect("a plugin source").clone();
        let name = ch.name.clone();
        tokio::task::spawn_blocking(move || match Instance::create(plugin, params) {
            Ok((inst, _exited)) => inst.shutdown(),
            Err(f) => panic!("channel {name}: the plugin refused its config: {f:?}"),
        })
        .await
        .unwrap();
    }
}

/// A config mistake is refused by `create` with the plugin's own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_a_service_source_config_is_refused_by_name() {
    let dir = build_plugins();
    for (plugin, config, expect) in [
        (
            "mqtt-source",
            r#"{"topics":["a"],"qso":1}"#,
            "mqtt-source: invalid config: unknown field `qso`",
        ),
        (
            "redis-source",
            r#"{"chanels":["a"]}"#,
            "redis-source: invalid config: unknown field `chanels`",
        ),
        (
            "nats-source",
            r#"{"subjects":["a..b"]}"#,
            "nats-source: invalid subject \"a..b\"",
        ),
        (
            "postgres-source",
            r#"{"channels":[]}"#,
            "postgres-source: `channels` must list at least one",
        ),
    ] {
        let plugin_lib = gateway::plugin::PluginRegistry::global()
            .find(plugin, std::slice::from_ref(&dir))
            .unwrap_or_else(|e| panic!("{plugin}: {e}"));
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let params = InstanceParams {
            channel: Arc::from("x"),
            config: config.as_bytes().to_vec(),
            tx,
            max_message: 1 << 20,
            metrics: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        };
        let failure = tokio::task::spawn_blocking(move || {
            Instance::create(plugin_lib, params).map(|(inst, _)| inst.shutdown())
        })
        .await
        .unwrap()
        .expect_err("a bad config must be refused");
        assert!(
            failure.message.starts_with(expect),
            "{plugin}: {}",
            failure.message
        );
    }
}
