//! Turns a validated [`Config`] into running VMs. Parsing lives in
//! `config`, device logic in the crates; this module only connects them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interrupt_doorbell::attach::{self, ServerChannel};
use interrupt_doorbell::rendezvous::{self, Rendezvous};
use interrupt_doorbell::IvshmemDoorbell;
use intervm_protocol::portio::PORT_COUNT;
use portio_channel::{PortioDevice, RingLink};
use shmem_device::{IvshmemPlain, Membership, SharedRegion, Transport};
use vmm_core::boot::{linux, probe};
use vmm_core::devices::console::ConsoleInput;
use vmm_core::devices::serial::SerialOutput;
use vmm_core::{RunningVm, Vm, VmConfig, VmExit};

use crate::config::{Backing, ChannelSpec, Config, Kernel, Kind, Serial};
use crate::lost::LostRegions;
use crate::tasks::{self, Report};
use crate::waiting::Waiting;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into [`interrupted`] returning true.
pub(crate) fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_signal) {
            log::warn!("cannot catch signal {sig}: {e}");
        }
    }
}

/// True once SIGINT or SIGTERM arrived (after [`catch_signals`]).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Why `run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file the config names (kernel, initrd) cannot be read.
    #[error("{file}: {key}: {msg}")]
    Input {
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
    /// A channel could not be set up.
    #[error("{file}: channel[{channel}]: {msg}")]
    Channel {
        /// Config file.
        file: String,
        /// Channel name.
        channel: String,
        /// What went wrong.
        msg: String,
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
    /// What its probe task did, checked.
    pub report: Option<Report>,
}

/// Where the members of a doorbell channel split across processes meet
/// (`interrupt_doorbell::rendezvous`), and the file their server shares.
/// `None` for backings without a name another process could open.
pub fn rendezvous_of(c: &ChannelSpec) -> Option<(Rendezvous, PathBuf)> {
    let dir = rendezvous::default_dir();
    match &c.backing {
        Backing::Shm(n) => Some((Rendezvous::for_shm(&dir, n), Path::new("/dev/shm").join(n))),
        Backing::File(p) | Backing::Hugetlbfs(p) => {
            Some((Rendezvous::for_file(&dir, p), p.clone()))
        }
        Backing::Memfd | Backing::Server(_) => None,
    }
}

/// Opens the region of every shared-memory channel with a member among
/// `selected`, formatting it if this process is the first to arrive.
/// Doorbell channels with members in other processes get their rendezvous
/// directory checked here, before any VM boots.
fn open_channels(
    cfg: &Config,
    selected: &[&crate::config::VmSpec],
) -> Result<HashMap<String, Transport>, RunError> {
    let file = cfg.file.display().to_string();
    let mut out: HashMap<String, Transport> = HashMap::new();
    for c in &cfg.channels {
        let away = elsewhere(c, selected);
        if away.len() == c.members.len() {
            continue;
        }
        let split = !away.is_empty();
        let cerr = |msg: String| RunError::Channel {
            file: file.clone(),
            channel: c.name.clone(),
            msg,
        };
        let backing = match &c.backing {
            // Each member gets the region from the server when it joins.
            Backing::Server(_) => continue,
            Backing::Memfd if split => {
                return Err(cerr(
                    "backing: an anonymous memfd cannot be shared with members in other \
                     processes; set backing = { shm = \"name\" } (or file/hugetlbfs) to run \
                     members with --vm"
                        .into(),
                ))
            }
            Backing::Memfd => shmem_device::Backing::Memfd,
            Backing::Shm(n) => shmem_device::Backing::Shm(n.clone()),
            Backing::File(p) => shmem_device::Backing::File(p.clone()),
            Backing::Hugetlbfs(p) => shmem_device::Backing::Hugetlbfs(p.clone()),
        };
        if c.kind.doorbell().is_some() && split {
            if let Some((rv, _)) = rendezvous_of(c) {
                rv.prepare_dir().map_err(|e| {
                    cerr(format!(
                        "the doorbells of the members in other processes ({}) meet at \
                         {}, which cannot be used: {e}; set {} to a directory every member \
                         process can use, or run `intervm ivshmem-server` and set \
                         backing = {{ server = PATH }}",
                        away.join(", "),
                        rv.socket.display(),
                        rendezvous::DIR_ENV
                    ))
                })?;
            }
        }
        let region = SharedRegion::open(&backing, c.size).map_err(|e| cerr(e.to_string()))?;
        // `check` compares the backings' paths; a hard link (or a name it
        // could not resolve) is only found by the file itself.
        if let Some(other) = out.iter().find_map(|(name, t)| {
            interrupt_doorbell::client::same_object(t.region().file(), region.file())
                .then_some(name)
        }) {
            return Err(cerr(format!(
                "backing: {} is the file channel[{other}] uses (another name for it); \
                 every channel needs its own region",
                region.label()
            )));
        }
        if matches!(c.kind, Kind::Portio { .. }) {
            // Only VMMs touch port-I/O rings: fault them in now (once per
            // process) rather than during the first transfers.
            if let Err(e) = region.populate() {
                log::warn!("channel {}: {e}", c.name);
            }
        }
        let t = Transport::attach_rings(Arc::new(region), c.members.len() as u32, c.ring_bytes)
            .map_err(|e| cerr(e.to_string()))?;
        out.insert(c.name.clone(), t);
    }
    Ok(out)
}

/// The members of `c` not among `selected`: they run in other processes.
fn elsewhere<'a>(c: &'a ChannelSpec, selected: &[&crate::config::VmSpec]) -> Vec<&'a str> {
    c.members
        .iter()
        .filter(|m| !selected.iter().any(|v| &v.name == *m))
        .map(String::as_str)
        .collect()
}

/// Doorbell devices of in-process channels, to be wired to each other once
/// every member exists: channel name -> (peer ID, device).
type Groups = HashMap<String, Vec<(u16, Arc<Mutex<IvshmemDoorbell>>)>>;

/// What plugging the VMs of this process builds up.
#[derive(Default)]
struct Wiring {
    /// Regions of the channels with a member here.
    transports: HashMap<String, Transport>,
    /// Channels with members in other processes.
    split: HashSet<String>,
    /// In-process doorbell groups.
    groups: Groups,
    /// Doorbell devices here whose peers are elsewhere (through a server),
    /// to wake when a peer there is marked gone: channel -> devices.
    remote_bells: HashMap<String, Vec<Arc<Mutex<IvshmemDoorbell>>>>,
}

/// Plugs `vm` into each of its channels and joins them, in file order, so
/// that its ivshmem functions sit on its bus in the order
/// [`crate::config::pci_channels`] gives (which is where probe tasks were told
/// to look, `ChannelRef::device`).
fn plug_channels(cfg: &Config, vm: &Vm, w: &mut Wiring) -> Result<Vec<Membership>, RunError> {
    let file = cfg.file.display().to_string();
    let mut joined = Vec::new();
    for c in &cfg.channels {
        let Some(me) = c.index_of(vm.name()) else {
            continue;
        };
        let cerr = |msg: String| RunError::Channel {
            file: file.clone(),
            channel: c.name.clone(),
            msg,
        };
        if let (Kind::Doorbell(d), Backing::Server(sock)) = (&c.kind, &c.backing) {
            let server = ServerChannel {
                socket: sock.clone(),
                name: c.name.clone(),
                vectors: d.vectors,
                size: c.size_given.then_some(c.size),
                members: c.members.len() as u32,
                ring_bytes: c.ring_bytes,
                fast_path: d.fast_path,
            };
            let got = attach::from_server(vm, &server, me).map_err(|e| match e {
                interrupt_doorbell::Error::SizeMismatch { .. } => cerr(format!(
                    "size: {e}; fix size (or leave it out to take the server's)"
                )),
                e => cerr(format!("backing.server: {e}")),
            })?;
            joined.push(got.attached.membership);
            w.remote_bells
                .entry(c.name.clone())
                .or_default()
                .push(got.attached.device);
            w.transports.entry(c.name.clone()).or_insert(got.transport);
            continue;
        }
        let Some(t) = w.transports.get(&c.name) else {
            continue;
        };
        let added = match &c.kind {
            Kind::Doorbell(d) if w.split.contains(&c.name) => {
                // Members in other processes: meet them at the channel's
                // rendezvous, starting its server if nobody serves it yet.
                let Some((rv, path)) = rendezvous_of(c) else {
                    continue;
                };
                let session = rv
                    .join(
                        d.vectors,
                        interrupt_doorbell::client::JOIN_DEADLINE,
                        &mut || crate::serve::start_on_demand(&rv, &path, d.vectors),
                    )
                    .map_err(|e| cerr(format!("rendezvous: {e}")))?;
                if !interrupt_doorbell::client::same_object(&session.shm, t.region().file()) {
                    return Err(cerr(format!(
                        "rendezvous: the server on {} shares another object than {} \
                         (the backing was replaced while it ran?); stop the members using it \
                         and start again",
                        rv.socket.display(),
                        path.display()
                    )));
                }
                log::info!(
                    "channel {}: doorbells through {} (peer ID {})",
                    c.name,
                    rv.socket.display(),
                    session.id
                );
                // A server gone (killed, crashed) is started again the
                // same way by whichever member notices first.
                let vectors = d.vectors;
                let reconnect: interrupt_doorbell::client::Reconnect = Box::new(move || {
                    rv.join(
                        vectors,
                        interrupt_doorbell::client::JOIN_DEADLINE,
                        &mut || crate::serve::start_on_demand(&rv, &path, vectors),
                    )
                });
                let a = attach::attach_session(vm, t, session, me, d.fast_path, Some(reconnect))
                    .map_err(|e| cerr(e.to_string()))?;
                joined.push(a.membership);
                w.remote_bells
                    .entry(c.name.clone())
                    .or_default()
                    .push(a.device);
                Ok(())
            }
            Kind::Doorbell(d) => {
                let own = interrupt_doorbell::device::new_eventfds(d.vectors)
                    .map_err(|e| cerr(e.to_string()))?;
                let dev = IvshmemDoorbell::new(vm, t.region().clone(), me as u16, own, d.fast_path)
                    .map_err(|e| cerr(e.to_string()))?;
                dev.lock()
                    .map_err(|_| cerr("doorbell device lock poisoned".into()))?
                    .set_guest_read_only(t.guest_read_only(me));
                joined.push(t.join(me).map_err(|e| cerr(e.to_string()))?);
                w.groups
                    .entry(c.name.clone())
                    .or_default()
                    .push((me as u16, dev.clone()));
                vm.add_pci_device(dev).map(|_| ())
            }
            Kind::Portio { port } => {
                // The device holds the membership: the VM leaves the
                // channel when it (and so its device) goes away.
                let mut link = RingLink::join(t, me).map_err(|e| cerr(e.to_string()))?;
                link.set_stale_after_ms(c.peer_timeout_ms);
                let dev = PortioDevice::new(link, vm.memory().clone());
                vm.add_pio_device(*port, PORT_COUNT, Arc::new(Mutex::new(dev)))
            }
            Kind::Shmem => {
                let mut dev = IvshmemPlain::new(t.region().clone());
                dev.set_guest_read_only(t.guest_read_only(me));
                joined.push(t.join(me).map_err(|e| cerr(e.to_string()))?);
                vm.add_pci_device(Arc::new(Mutex::new(dev))).map(|_| ())
            }
        };
        added.map_err(|e| cerr(format!("adding the device to vm {}: {e}", vm.name())))?;
    }
    Ok(joined)
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
    let mut w = Wiring {
        transports: open_channels(cfg, &selected)?,
        ..Default::default()
    };
    w.split = cfg
        .channels
        .iter()
        .filter(|c| !elsewhere(c, &selected).is_empty())
        .map(|c| c.name.clone())
        .collect();
    catch_signals();

    // Doorbell channels whose peer IDs come from an ivshmem server.
    let server_ids: HashSet<String> = cfg
        .channels
        .iter()
        .filter(|c| {
            c.kind.doorbell().is_some()
                && (w.split.contains(&c.name) || matches!(c.backing, Backing::Server(_)))
        })
        .map(|c| c.name.clone())
        .collect();
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
            Serial::Console => SerialOutput::Console,
            Serial::None => SerialOutput::Sink,
            Serial::File(p) => SerialOutput::File(p.clone()),
        };
        let vm = Vm::new(&vc).map_err(verr)?;
        let joined = plug_channels(cfg, &vm, &mut w)?;
        match &spec.kernel {
            Kernel::Probe => {
                let index = cfg
                    .vms
                    .iter()
                    .position(|v| v.name == spec.name)
                    .unwrap_or(i);
                let infos = tasks::boot_infos(cfg, spec, index, &server_ids, &w.transports);
                probe::load_tasks(&vm, probe_image::PROBE_ELF, &infos).map_err(verr)?;
            }
            Kernel::Linux {
                path,
                cmdline,
                initrd,
            } => {
                let read = |p: &std::path::Path, what: &str| {
                    std::fs::read(p).map_err(|e| RunError::Input {
                        file: file.clone(),
                        key: format!("vm[{}].{what}", spec.name),
                        msg: format!("cannot read {}: {e}", p.display()),
                    })
                };
                let kernel = read(path, "kernel")?;
                let initrd = initrd.as_deref().map(|p| read(p, "initrd")).transpose()?;
                let cmdline = linux::cmdline_for(vm.flavor(), cmdline);
                linux::load(&vm, &kernel, initrd.as_deref(), &cmdline).map_err(verr)?;
            }
        }
        vms.push((vm, joined, *spec));
    }

    let Wiring {
        transports,
        groups,
        remote_bells,
        ..
    } = w;
    for (name, members) in &groups {
        let devs: Vec<_> = members.iter().map(|(_, d)| d.clone()).collect();
        interrupt_doorbell::group::wire(&devs).map_err(|e| RunError::Channel {
            file: file.clone(),
            channel: name.clone(),
            msg: e.to_string(),
        })?;
    }
    let here: Vec<&str> = selected.iter().map(|v| v.name.as_str()).collect();
    let mut waiting = Waiting::new(cfg, &here, &transports);
    let mut lost = LostRegions::default();
    // Channels found lost whose members here are still to be stopped.
    let mut to_stop: Vec<String> = Vec::new();
    let start = Instant::now();
    type Slot<'a> = (
        &'a crate::config::VmSpec,
        Option<(RunningVm, Vec<Membership>, Option<ConsoleInput>)>,
        Option<Outcome>,
    );
    let mut running: Vec<Slot> = Vec::new();
    for (vm, joined, spec) in vms {
        let r = vm.start().map_err(|source| RunError::Vm {
            vm: spec.name.clone(),
            source,
        })?;
        let input = if spec.serial == Serial::Console {
            match ConsoleInput::stdin(r.vm().serial().clone(), &spec.name) {
                Ok(i) => Some(i),
                Err(e) => {
                    log::warn!(
                        "vm[{}].serial: cannot read stdin for the console ({e}); output only",
                        spec.name
                    );
                    None
                }
            }
        } else {
            None
        };
        running.push((spec, Some((r, joined, input)), None));
    }
    loop {
        to_stop.extend(lost.poll(&transports));
        for c in to_stop.drain(..) {
            let members = cfg.channels.iter().find(|ch| ch.name == c);
            for (spec, r, _) in running.iter() {
                if let Some((vm, _, _)) = r {
                    if members.is_some_and(|ch| ch.index_of(&spec.name).is_some()) {
                        vm.stop();
                    }
                }
            }
        }
        let mut left = 0;
        for (spec, r, out) in running.iter_mut() {
            let Some((vm, _, _)) = r else { continue };
            if let Some(exit) = vm.wait_timeout(Duration::from_millis(5)) {
                let elapsed = start.elapsed();
                let mut report = match spec.kernel {
                    Kernel::Probe => tasks::reports(cfg, spec, vm.vm().memory(), &transports),
                    Kernel::Linux { .. } => None,
                };
                // A guest that stopped on its own on a lost region's zeros
                // may get here before the loop's check above; its peers
                // here are stopped on the next round.
                to_stop.extend(lost.poll(&transports));
                let why = lost.lines_for(cfg, &spec.name);
                if !why.is_empty() {
                    let r = report.get_or_insert(Report {
                        lines: Vec::new(),
                        ok: false,
                    });
                    r.lines.extend(why);
                    r.ok = false;
                }
                if let Some(r) = report.as_mut() {
                    for c in cfg
                        .channels
                        .iter()
                        .filter(|c| c.index_of(&spec.name).is_some())
                    {
                        r.lines.extend(
                            waiting
                                .never_came(c)
                                .into_iter()
                                .map(|l| format!("{}: {l}", spec.name)),
                        );
                    }
                }
                *out = Some(Outcome {
                    name: spec.name.clone(),
                    exit,
                    elapsed,
                    report,
                });
                if let Some((vm, joined, input)) = r.take() {
                    if let Some(Err(e)) = input.map(ConsoleInput::stop) {
                        log::warn!("vm[{}]: console input from stdin: {e}", spec.name);
                    }
                    vm.join();
                    // Leaving marks this member gone for its peers, and
                    // wakes peers that sleep until it rings.
                    drop(joined);
                    for (name, members) in &groups {
                        if let Some(c) = cfg.channels.iter().find(|c| &c.name == name) {
                            if let Some(me) = c.index_of(&spec.name) {
                                let devs: Vec<_> = members.iter().map(|(_, d)| d.clone()).collect();
                                interrupt_doorbell::group::leave(&devs, me as u16);
                            }
                        }
                    }
                }
            } else {
                left += 1;
            }
        }
        if left == 0 {
            // One last look: a member that never came is named even when
            // the guests gave up on it before this loop looked again.
            waiting.check();
            break;
        }
        for c in waiting.check() {
            for d in remote_bells.get(&c).into_iter().flatten() {
                if let Ok(g) = d.lock() {
                    g.wake();
                }
            }
        }
        let expired = timeout.is_some_and(|t| start.elapsed() >= t);
        if expired || interrupted() {
            for (_, r, _) in running.iter() {
                if let Some((vm, _, _)) = r {
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
