//! Every YAML file shipped in the repository loads.

use std::path::PathBuf;

use crate::common::*;
use gateway::config::{self, LoadOptions};

#[test]
fn every_shipped_yaml_loads() {
    let plugins = build_plugins();
    let root = repo_root();
    let all = shipped_yaml_files();
    let gateways: Vec<&PathBuf> = all
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "gateway.yaml"))
        .collect();
    assert!(
        gateways.iter().any(|p| p.parent() == Some(root.as_path())),
        "the default gateway.yaml exists"
    );
    let mut covered = Vec::new();
    for g in &gateways {
        let opts = LoadOptions {
            plugin_dirs: Some(vec![plugins.clone()]),
            ..Default::default()
        };
        let cfg = config::load(g, &opts)
            .unwrap_or_else(|e| panic!("{} does not load:\n{e}", g.display()));
        assert!(
            !cfg.channels.is_empty(),
            "{} defines no channel",
            g.display()
        );
        covered.push(g.canonicalize().unwrap());
        for ch in &cfg.channels {
            covered.push(ch.spec_file.canonicalize().unwrap());
        }
    }
    for y in &all {
        assert!(
            covered.contains(&y.canonicalize().unwrap()),
            "{} is shipped but no gateway.yaml loads it",
            y.display()
        );
    }
}
