//! One module per channel: functions that boot probe VMs on /dev/kvm,
//! move data and return what the guests measured.

pub mod doorbell;
pub mod linux;
pub mod linux_user;
pub mod portio;
pub mod shmem;

use std::time::Duration;

/// How a receiving probe timed the transfers of one boot.
#[derive(Clone, Debug, Default)]
pub struct Rounds {
    /// From the first "go" to the last byte of the last round.
    pub total: Duration,
    /// Seconds of each round, in order (the first is the cold one: first
    /// touches, first start line).
    pub each: Vec<f64>,
}

impl Rounds {
    /// Reads the round log of the receiving probe `vm` that ran `rounds`
    /// rounds, at `tsc_khz`.
    pub fn read(vm: &vmm_core::RunningVm, rounds: u64, tsc_khz: u64, total: Duration) -> Self {
        let khz = tsc_khz.max(1) as f64;
        let log = vmm_core::boot::probe::round_log(vm.vm().memory(), rounds).unwrap_or_default();
        Self {
            total,
            each: log.iter().map(|&c| c as f64 / khz / 1e3).collect(),
        }
    }

    /// Waits for a ping-pong between initiator `a` and responder `b` to
    /// end, checks that the initiator reported no error, and reads the
    /// `rounds` round trips it logged.
    pub fn of_ping_pong(a: &vmm_core::RunningVm, b: &vmm_core::RunningVm, rounds: u64) -> Self {
        let limit = Duration::from_secs(600);
        a.wait_timeout(limit).expect("initiator finished");
        b.wait_timeout(limit).expect("responder finished");
        let info = vmm_core::boot::probe::read_info(a.vm().memory()).expect("info");
        let res = probe_image::shmem::ShmemResult::from_info(&info);
        assert!(res.error.is_none(), "ping-pong failed: {:?}", res.error);
        let total = Duration::from_secs_f64(res.seconds().unwrap_or(0.0));
        Self::read(a, rounds, info.tsc_khz, total)
    }

    /// The rounds after the first.
    pub fn warm(&self) -> &[f64] {
        self.each.get(1..).unwrap_or(&[])
    }
}

/// Most round trips of one ping-pong kind per boot a criterion bench asks
/// for: both kinds of a floor-first ping-pong fit in the round log.
pub const PING_PONG_MAX: u64 = 16_000;

/// Mean one-way time of the round trips `rounds` (seconds each): half
/// their mean.
pub fn one_way(rounds: &[f64]) -> f64 {
    if rounds.is_empty() {
        return 0.0;
    }
    rounds.iter().sum::<f64>() / rounds.len() as f64 / 2.0
}
