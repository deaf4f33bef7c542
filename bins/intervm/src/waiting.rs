//! Members in other processes, watched from this one. For each channel
//! with members elsewhere:
//! - tells the user which members have not joined yet, since when, and
//!   when the guests will give up (the channel's `join_timeout`), instead
//!   of a silent wait;
//! - marks a member whose heartbeat stopped for the channel's
//!   `peer_timeout` (its process was killed) as gone, so that guests asleep
//!   until it rings are woken and see it gone instead of sleeping for ever;
//! - wakes those guests too when a member was restarted (a new
//!   incarnation joined) before anybody saw the last one gone.

use std::time::{Duration, Instant};

use intervm_protocol::ring::{Liveness, MemberState};
use shmem_device::transport::monotonic_ms;
use shmem_device::Transport;

use crate::config::{ChannelSpec, Config};

/// Say nothing for a member that comes this quickly.
const FIRST_NOTICE: Duration = Duration::from_secs(2);
/// Then repeat the notice this often.
const REPEAT: Duration = Duration::from_secs(30);

struct Awaited {
    channel: String,
    member: String,
    index: u32,
    transport: Transport,
    join_timeout: Duration,
    peer_timeout: Duration,
    came: bool,
    /// Watches its heartbeat while it is alive.
    live: Option<Liveness>,
    told: Option<Instant>,
    gave_up: bool,
}

/// The members this process waits for.
pub struct Waiting {
    file: String,
    start: Instant,
    awaited: Vec<Awaited>,
}

impl Waiting {
    /// The members of `cfg`'s channels that run in other processes than
    /// `here` (VM names), on channels whose region this process holds.
    pub fn new(
        cfg: &Config,
        here: &[&str],
        transports: &std::collections::HashMap<String, Transport>,
    ) -> Self {
        let mut awaited = Vec::new();
        for c in &cfg.channels {
            let Some(t) = transports.get(&c.name) else {
                continue;
            };
            if !c.members.iter().any(|m| here.contains(&m.as_str())) {
                continue;
            }
            for (i, m) in c.members.iter().enumerate() {
                if !here.contains(&m.as_str()) {
                    awaited.push(Awaited {
                        channel: c.name.clone(),
                        member: m.clone(),
                        index: i as u32,
                        transport: t.clone(),
                        join_timeout: Duration::from_millis(c.join_timeout_ms),
                        peer_timeout: Duration::from_millis(c.peer_timeout_ms),
                        came: false,
                        live: None,
                        told: None,
                        gave_up: false,
                    });
                }
            }
        }
        Self {
            file: cfg.file.display().to_string(),
            start: Instant::now(),
            awaited,
        }
    }

    /// Looks at the members elsewhere: tells the user about those still
    /// awaited, and marks those whose heartbeat stopped as gone. Returns
    /// the channels where it marked one (their guests need waking).
    pub fn check(&mut self) -> Vec<String> {
        let mut marked = Vec::new();
        for a in self.awaited.iter_mut().filter(|a| a.came) {
            let (ring, geo) = (a.transport.ring_region(), a.transport.geometry());
            if !matches!(ring.member_state(&geo, a.index), Ok(MemberState::Alive)) {
                a.live = None;
                continue;
            }
            let now = monotonic_ms();
            let watch =
                || Liveness::new(&ring, &geo, a.index, a.peer_timeout.as_millis() as u64, now);
            let live = a.live.get_or_insert_with(watch);
            if live.rejoined(&ring, &geo) {
                // Restarted (a new process joined as this member) while
                // the last one still looked alive: watch the new one, and
                // wake the guests here, whose transfer with the last one
                // is over.
                *live = watch();
                eprintln!(
                    "intervm: channel {}: {} joined again (restarted: what its last incarnation was doing is over)",
                    a.channel, a.member
                );
                marked.push(a.channel.clone());
                continue;
            }
            // Alive and the same incarnation, so an error means its
            // heartbeat stood still too long.
            if live.check(&ring, &geo, now).is_err() {
                let _ = ring.set_member_state(&geo, a.index, MemberState::Gone);
                if live.rejoined(&ring, &geo) {
                    // A new incarnation joined just now, and its "alive"
                    // may be what this overwrote: it counts its
                    // incarnation before it stores "alive", so this look
                    // sees it whenever that happened. Give it back.
                    let _ = ring.set_member_state(&geo, a.index, MemberState::Alive);
                    *live = watch();
                    marked.push(a.channel.clone());
                    continue;
                }
                eprintln!(
                    "intervm: channel {}: {}'s heartbeat stood still for peer_timeout = {} s \
                     (its process died?); marked gone",
                    a.channel,
                    a.member,
                    a.peer_timeout.as_secs_f64()
                );
                a.live = None;
                marked.push(a.channel.clone());
            }
        }
        let waited = self.start.elapsed();
        for a in self.awaited.iter_mut().filter(|a| !a.came) {
            // Any state but Absent means it joined at some point.
            a.came = !matches!(
                a.transport.member_state(a.index),
                Ok(MemberState::Absent) | Err(_)
            );
            if a.came {
                if a.told.is_some() {
                    eprintln!(
                        "intervm: channel {}: {} joined after {:.1} s",
                        a.channel,
                        a.member,
                        waited.as_secs_f64()
                    );
                }
                continue;
            }
            if waited >= a.join_timeout {
                if !a.gave_up {
                    a.gave_up = true;
                    eprintln!(
                        "intervm: channel {}: {} did not join within join_timeout = {} s; \
                         its peers here give up",
                        a.channel,
                        a.member,
                        a.join_timeout.as_secs_f64()
                    );
                }
                continue;
            }
            let due = match a.told {
                None => waited >= FIRST_NOTICE,
                Some(t) => t.elapsed() >= REPEAT,
            };
            if due {
                eprintln!(
                    "intervm: channel {}: waiting {:.0} s for {} (it runs in another process: \
                     `intervm run {} --vm {}`); its peers here give up after join_timeout = {} s",
                    a.channel,
                    waited.as_secs_f64(),
                    a.member,
                    self.file,
                    a.member,
                    a.join_timeout.as_secs_f64()
                );
                a.told = Some(Instant::now());
            }
        }
        marked
    }

    /// What to add to the report of a VM on `c`: members that never came.
    pub fn never_came(&self, c: &ChannelSpec) -> Vec<String> {
        self.awaited
            .iter()
            .filter(|a| a.channel == c.name && !a.came)
            .map(|a| {
                format!(
                    "channel {}: {} never joined (waited {:.1} s; join_timeout = {} s)",
                    a.channel,
                    a.member,
                    self.start.elapsed().as_secs_f64(),
                    a.join_timeout.as_secs_f64()
                )
            })
            .collect()
    }
}
