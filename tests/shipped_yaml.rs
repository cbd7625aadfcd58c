//! Every YAML file shipped in the repository loads.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gateway::config::{self, LoadOptions};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                yaml_files(&p, out);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_yaml_loads() {
    let plugins = build_plugins();
    let root = repo_root();
    let mut all = Vec::new();
    yaml_files(&root, &mut all);
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
