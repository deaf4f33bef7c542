//! Channels whose shared region another process shrank (see
//! the `shrink-guard` crate): this process keeps running on a private copy,
//! so such a channel is lost. The run loop stops its members here and their
//! reports say why.

use std::collections::{BTreeMap, HashMap};

use shmem_device::Transport;

use crate::config::Config;

/// The channels found lost so far, with their backing's label.
#[derive(Default)]
pub struct LostRegions {
    lost: BTreeMap<String, String>,
}

impl LostRegions {
    /// Checks every channel's region; returns the channels newly lost.
    pub fn poll(&mut self, transports: &HashMap<String, Transport>) -> Vec<String> {
        let mut new = Vec::new();
        for (name, t) in transports {
            if t.region().lost() && !self.lost.contains_key(name) {
                let label = t.region().label().to_string();
                log::error!(
                    "channel {name}: {label} can no longer be read (another process shrank it, or its hugepages ran out); this process now sees a private copy, so the channel is lost; stopping its members here"
                );
                self.lost.insert(name.clone(), label);
                new.push(name.clone());
            }
        }
        new
    }

    /// Report lines for `vm`: one per lost channel it is a member of.
    pub fn lines_for(&self, cfg: &Config, vm: &str) -> Vec<String> {
        self.lost
            .iter()
            .filter(|(c, _)| {
                cfg.channels
                    .iter()
                    .any(|ch| &ch.name == *c && ch.index_of(vm).is_some())
            })
            .map(|(c, label)| {
                format!("{vm}: channel {c} lost: {label} can no longer be read (shrunk by another process?)")
            })
            .collect()
    }
}
