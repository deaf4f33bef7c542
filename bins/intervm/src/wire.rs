//! Turns a validated [`Config`] into running VMs. Parsing lives in
//! `config`, device logic in the crates; this module only connects them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use intervm_protocol::probe::{BootInfo, Workload};
use vmm_core::devices::serial::SerialOutput;
use vmm_core::{boot::probe, RunningVm, Vm, VmConfig, VmExit};

use crate::config::{Config, Kernel, Serial};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Why `run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting the config parser accepts but this build cannot run yet.
    #[error("{file}: {key}: {msg}")]
    Unsupported {
        /// Config file.
        file: String,
        /// Offending key.
        key: String,
        /// Explanation.
        msg: String,
    },
    /// `--vm` named a VM that is not in the file.
    #[error("{file}: --vm {name}: no [[vm]] has that name (defined: {have})")]
    NoSuchVm {
        /// Config file.
        file: String,
        /// The name given.
        name: String,
        /// The names defined.
        have: String,
    },
    /// Creating or starting a VM failed.
    #[error("vm[{vm}]: {source}")]
    Vm {
        /// VM name.
        vm: String,
        /// Cause.
        #[source]
        source: vmm_core::Error,
    },
}

/// The outcome of one VM.
pub struct Outcome {
    /// VM name.
    pub name: String,
    /// How it stopped.
    pub exit: VmExit,
    /// Wall time from start to stop.
    pub elapsed: Duration,
}

/// Boots the VMs of `cfg` (only `only` if given) and waits for all of them.
/// With `timeout`, VMs still running then are stopped.
pub fn run(
    cfg: &Config,
    only: Option<&str>,
    timeout: Option<Duration>,
) -> Result<Vec<Outcome>, RunError> {
    let file = cfg.file.display().to_string();
    let selected: Vec<_> = match only {
        Some(n) => {
            let v: Vec<_> = cfg.vms.iter().filter(|v| v.name == n).collect();
            if v.is_empty() {
                let have = cfg
                    .vms
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(RunError::NoSuchVm {
                    file,
                    name: n.into(),
                    have,
                });
            }
            v
        }
        None => cfg.vms.iter().collect(),
    };
    if let Some(c) = cfg.channels.first() {
        return Err(RunError::Unsupported {
            file,
            key: format!("channel[{}].kind", c.name),
            msg: format!(
                "{:?} channels are not available in this build yet",
                c.kind.as_str()
            ),
        });
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_signal) {
            log::warn!("cannot catch signal {sig}: {e}");
        }
    }

    let mut vms = Vec::new();
    for (i, spec) in selected.iter().enumerate() {
        let verr = |source| RunError::Vm {
            vm: spec.name.clone(),
            source,
        };
        let mut vc = VmConfig::new(spec.name.clone(), spec.memory);
        vc.vcpus = spec.vcpus;
        vc.serial = match &spec.serial {
            Serial::Stdout => SerialOutput::Stdout,
            Serial::None => SerialOutput::Sink,
            Serial::File(p) => SerialOutput::File(p.clone()),
        };
        let vm = Vm::new(&vc).map_err(verr)?;
        match &spec.kernel {
            Kernel::Probe => {
                let mut info = BootInfo::new(Workload::Hello, 0, 0);
                info.args[0] = i as u64;
                probe::load(&vm, probe_image::PROBE_ELF, &info).map_err(verr)?;
            }
            Kernel::Linux { .. } => {
                return Err(RunError::Unsupported {
                    file: file.clone(),
                    key: format!("vm[{}].kernel", spec.name),
                    msg: "booting a Linux kernel is not available in this build yet; use kernel = \"probe\"".into(),
                })
            }
        }
        vms.push(vm);
    }

    let start = Instant::now();
    let mut running: Vec<(String, Option<RunningVm>, Option<Outcome>)> = Vec::new();
    for vm in vms {
        let name = vm.name().to_string();
        let r = vm.start().map_err(|source| RunError::Vm {
            vm: name.clone(),
            source,
        })?;
        running.push((name, Some(r), None));
    }
    loop {
        let mut left = 0;
        for (name, r, out) in running.iter_mut() {
            let Some(vm) = r else { continue };
            if let Some(exit) = vm.wait_timeout(Duration::from_millis(5)) {
                *out = Some(Outcome {
                    name: name.clone(),
                    exit,
                    elapsed: start.elapsed(),
                });
                if let Some(vm) = r.take() {
                    vm.join();
                }
            } else {
                left += 1;
            }
        }
        if left == 0 {
            break;
        }
        let expired = timeout.is_some_and(|t| start.elapsed() >= t);
        if expired || INTERRUPTED.load(Ordering::SeqCst) {
            for (_, r, _) in running.iter() {
                if let Some(vm) = r {
                    vm.stop();
                }
            }
            if expired {
                log::warn!("timeout: stopping the VMs still running");
            }
        }
    }
    Ok(running.into_iter().filter_map(|(_, _, o)| o).collect())
}
