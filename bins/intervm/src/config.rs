//! The TOML configuration: parsing and validation only.
//!
//! Every error names the file, the key (`vm[NAME].key` or
//! `channel[NAME].key`) and the problem.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use intervm_protocol::notify;
pub use intervm_protocol::notify::Notify;
use intervm_protocol::probe::shmem_min_memory;
use intervm_protocol::ring::{Geometry, RingError, MAX_MEMBERS};
use serde::Deserialize;

/// A configuration error, already phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// Key and problem.
    pub msg: String,
}

/// A byte size: an integer or a string with a K, M or G suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A name from a fixed set (a serde enum), or what the file said instead,
/// kept so that the error names the key, quotes the value and lists the
/// choices.
#[derive(Debug)]
enum Choice<T> {
    Is(T),
    Not(String),
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Choice<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::IntoDeserializer;
        // Not a string at all: serde's own message ("expected a string").
        let s = String::deserialize(d)?;
        let known: Result<T, serde::de::value::Error> =
            T::deserialize(s.clone().into_deserializer());
        Ok(known.map_or(Choice::Not(s), Choice::Is))
    }
}

impl<T: Copy> Choice<T> {
    /// The value, or the error `explain` phrases for what the file said.
    fn get(&self, explain: impl FnOnce(&str) -> String) -> Result<T, String> {
        match self {
            Choice::Is(t) => Ok(*t),
            Choice::Not(s) => Err(explain(s)),
        }
    }
}

/// `kind` of a `[[channel]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindName {
    Portio,
    Shmem,
    Doorbell,
}

/// `task` of a probe table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TaskName {
    Hello,
    Send,
    Recv,
    Ping,
    Pong,
    Chaos,
    Exchange,
}

impl TaskName {
    fn name(self) -> &'static str {
        match self {
            TaskName::Hello => "hello",
            TaskName::Send => "send",
            TaskName::Recv => "recv",
            TaskName::Ping => "ping",
            TaskName::Pong => "pong",
            TaskName::Chaos => "chaos",
            TaskName::Exchange => "exchange",
        }
    }
}

/// `mode` of a port-I/O probe task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    Port,
    Descriptor,
}

/// `serial` given by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SerialName {
    Stdout,
    Console,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    vm: Vec<RawVm>,
    #[serde(default)]
    channel: Vec<RawChannel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    memory: Option<RawSize>,
    vcpus: Option<u32>,
    kernel: Option<String>,
    cmdline: Option<String>,
    initrd: Option<String>,
    serial: Option<RawSerial>,
    probe: Option<RawProbes>,
}

/// One task table, or an array of them run in order.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawProbes {
    One(Box<RawProbe>),
    Many(Vec<RawProbe>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    task: Choice<TaskName>,
    channel: Option<String>,
    to: Option<String>,
    from: Option<Vec<String>>,
    with: Option<Vec<String>>,
    size: Option<RawSize>,
    chunk: Option<RawSize>,
    mode: Option<Choice<ModeName>>,
    width: Option<u64>,
    rep: Option<bool>,
    rounds: Option<u64>,
    transfers: Option<u64>,
    zero_copy: Option<bool>,
    ops: Option<u64>,
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBacking {
    shm: Option<String>,
    file: Option<String>,
    hugetlbfs: Option<String>,
    server: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSerial {
    Named(Choice<SerialName>),
    File { file: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    name: String,
    kind: Choice<KindName>,
    members: Vec<String>,
    size: Option<RawSize>,
    ring_size: Option<RawSize>,
    backing: Option<RawBacking>,
    port: Option<i64>,
    vectors: Option<u32>,
    fast_path: Option<bool>,
    notify: Option<Choice<Notify>>,
    spin_us: Option<u64>,
    peer_timeout: Option<String>,
    join_timeout: Option<String>,
}

/// What a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// The built-in bare-metal probe guest.
    Probe,
    /// A Linux kernel image on disk.
    Linux {
        /// Kernel image.
        path: PathBuf,
        /// Command line.
        cmdline: String,
        /// Initramfs.
        initrd: Option<PathBuf>,
    },
}

/// Console destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// stdout with a `[name]` prefix.
    Stdout,
    /// stdout with a `[name]` prefix, partial lines (prompts) written at
    /// once, and intervm's stdin forwarded to the guest (one VM per file).
    Console,
    /// Discarded.
    None,
    /// Appended to a file.
    File(PathBuf),
}

/// A validated `[[vm]]`.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique name.
    pub name: String,
    /// RAM bytes.
    pub memory: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// What it boots.
    pub kernel: Kernel,
    /// Console.
    pub serial: Serial,
    /// What the probe guest does, in order (only for `kernel = "probe"`;
    /// empty: greet and power off).
    pub probe: Vec<ProbeTask>,
}

/// How a probe moves bytes over a port-I/O channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortioHow {
    /// The channel's first port.
    pub port: u16,
    /// Descriptor mode (one exit per message) instead of port mode.
    pub descriptor: bool,
    /// Port mode: access width in bytes (1, 2 or 4).
    pub width: u8,
    /// Port mode: `rep outs`/`rep ins`.
    pub rep: bool,
}

/// The `probe = { task = ... }` table of a probe VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTask {
    /// Doorbell ping-pong: `ping` rings first, `pong` answers.
    PingPong {
        /// The channel.
        channel: ChannelRef,
        /// The other VM.
        to: MemberRef,
        /// Round trips.
        rounds: u64,
        /// Rings first.
        initiator: bool,
    },
    /// Print a greeting and power off (the default).
    Hello,
    /// Send `size` bytes to `to` over `channel`.
    Send {
        /// The channel.
        channel: ChannelRef,
        /// Receiving VM.
        to: MemberRef,
        /// Bytes.
        size: u64,
        /// Payload bytes per frame (message).
        chunk: u64,
        /// Port-I/O channels: how bytes cross.
        portio: Option<PortioHow>,
        /// Shared-memory channels: fill frames in place in the ring
        /// (`zero_copy` in the file).
        zero_copy: bool,
    },
    /// A hostile guest: `ops` random accesses to every device of the VM
    /// (config space, BARs, port-I/O registers, doorbells, its regions).
    Chaos {
        /// Accesses to make.
        ops: u64,
        /// Seed of the random sequence.
        seed: u64,
    },
    /// Send `size` bytes to each VM in `with` and receive `size` bytes
    /// from each of them, all at once, over a shared-memory `channel`.
    Exchange {
        /// The channel.
        channel: ChannelRef,
        /// The other VMs (each runs an exchange with this one).
        with: Vec<MemberRef>,
        /// Bytes each way with each peer.
        size: u64,
        /// Payload bytes per frame.
        chunk: u64,
    },
    /// Receive `size` bytes from each VM in `from` over `channel`.
    Recv {
        /// The channel.
        channel: ChannelRef,
        /// Sending VMs.
        from: Vec<MemberRef>,
        /// Bytes from each sender.
        size: u64,
        /// Largest frame accepted (0 = the ring's largest).
        chunk: u64,
        /// Port-I/O channels: how bytes cross.
        portio: Option<PortioHow>,
        /// 0: one transfer, ended by the first error. N: N complete
        /// transfers from the one sender, which may leave, crash or be
        /// restarted meanwhile (`transfers` in the file).
        transfers: u64,
        /// Shared-memory channels: read frames in place in the ring
        /// (`zero_copy` in the file).
        zero_copy: bool,
    },
}

/// A channel a probe task uses, resolved when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    /// Its name.
    pub name: String,
    /// Its index in [`Config::channels`].
    pub index: usize,
    /// The task's own VM's member index on it.
    pub me: u32,
    /// Which of its VM's ivshmem functions the channel is, in the order
    /// the guest finds them on the bus ([`pci_channels`]); 0 and unused on
    /// a port-I/O channel, which has no PCI function.
    pub device: u32,
}

/// The shared-memory channels (`shmem`, `doorbell`) of VM `vm`, in the
/// order the launcher puts their ivshmem functions on the VM's PCI bus:
/// file order. A probe finds its devices by that order.
pub fn pci_channels<'a>(
    channels: &'a [ChannelSpec],
    vm: &'a str,
) -> impl Iterator<Item = &'a ChannelSpec> + 'a {
    channels
        .iter()
        .filter(move |c| !c.kind.is_portio() && c.index_of(vm).is_some())
}

/// Another member VM a probe task names, resolved when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    /// Its name.
    pub name: String,
    /// Its member index on the task's channel.
    pub index: u32,
}

impl std::fmt::Display for ChannelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::fmt::Display for MemberRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Most complete transfers a `recv` task may wait for.
pub const MAX_TRANSFERS: u64 = 1_000_000;

/// Default payload bytes per frame of a probe transfer.
pub const DEFAULT_CHUNK: u64 = 64 << 10;

/// The most a probe transfer may move.
const MAX_TRANSFER: u64 = 1 << 40;
/// The most frames a probe transfer may take.
const MAX_FRAMES: u64 = 1 << 32;

/// Default shared region size of a `shmem` channel.
pub const DEFAULT_SHMEM_SIZE: u64 = 4 << 20;

/// Default queue region size of a `portio` channel.
pub const DEFAULT_PORTIO_SIZE: u64 = 1 << 20;

/// Largest port-I/O channel region.
pub const MAX_PORTIO_SIZE: u64 = 256 << 20;

/// Where a port-I/O channel's ports may go: above the legacy ISA devices
/// and below the PCI I/O window.
pub const PORTIO_PORTS: std::ops::Range<u32> = 0x1000..0xc000;

/// Where a shared-memory channel's region lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// An anonymous memfd (every member in one process).
    Memfd,
    /// `/dev/shm/NAME`.
    Shm(String),
    /// A file.
    File(PathBuf),
    /// A file on hugetlbfs.
    Hugetlbfs(PathBuf),
    /// Region and doorbells from an ivshmem server at this socket
    /// (`doorbell` channels).
    Server(PathBuf),
}

impl Backing {
    /// Where the region (or its server) lives, spelled one way: a shm name
    /// as its `/dev/shm` path, a path with symlinks, `.` and `..`
    /// resolved as far as it exists. `None` for a memfd (one per channel).
    fn location(&self) -> Option<PathBuf> {
        let p = match self {
            Backing::Memfd => return None,
            Backing::Shm(n) => Path::new("/dev/shm").join(n),
            Backing::File(p) | Backing::Hugetlbfs(p) | Backing::Server(p) => p.clone(),
        };
        if let Ok(c) = std::fs::canonicalize(&p) {
            return Some(c);
        }
        if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            if let Ok(d) = std::fs::canonicalize(dir) {
                return Some(d.join(name));
            }
        }
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        Some(out)
    }
}

/// A channel's kind, with the options only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Port-I/O channel on ports `port..port + PORT_COUNT`.
    Portio {
        /// First port.
        port: u16,
    },
    /// Shared memory, polled.
    Shmem,
    /// Shared memory with doorbell interrupts.
    Doorbell(DoorbellSpec),
}

/// The options of a `doorbell` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorbellSpec {
    /// Interrupt vectors per member.
    pub vectors: usize,
    /// In-kernel doorbells (ioeventfd -> irqfd) where KVM allows.
    pub fast_path: bool,
    /// When transfers ring doorbells.
    pub notify: Notify,
    /// Adaptive notification: polling budget before sleeping, µs (`None`:
    /// [`default_spin_us`] of the host it runs on).
    pub spin_us: Option<u64>,
}

impl DoorbellSpec {
    /// The polling budget, µs: the file's, or this host's default.
    pub fn spin_us(&self) -> u64 {
        self.spin_us.unwrap_or_else(default_spin_us)
    }
}

impl Kind {
    /// The TOML spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Portio { .. } => "portio",
            Kind::Shmem => "shmem",
            Kind::Doorbell(_) => "doorbell",
        }
    }

    /// A port-I/O channel (its region holds queues, not a BAR2).
    pub fn is_portio(&self) -> bool {
        matches!(self, Kind::Portio { .. })
    }

    /// The doorbell options, for a `doorbell` channel.
    pub fn doorbell(&self) -> Option<&DoorbellSpec> {
        match self {
            Kind::Doorbell(d) => Some(d),
            _ => None,
        }
    }
}

/// A validated `[[channel]]`.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// Unique name.
    pub name: String,
    /// Kind, with its own options.
    pub kind: Kind,
    /// Member VM names (at least two, distinct, all defined).
    pub members: Vec<String>,
    /// Shared region bytes (`shmem`/`doorbell`; `portio`: its queues).
    pub size: u64,
    /// True when the file gave `size` (with `backing = { server }` the
    /// server's region must then have that size).
    pub size_given: bool,
    /// `ring_size`: data bytes per ring, the rings at the region's end
    /// (`shmem`/`doorbell`; `None`: rings that fill the region).
    pub ring_bytes: Option<u64>,
    /// Region backing (`shmem`/`doorbell`; `portio`: its queues).
    pub backing: Backing,
    /// A member that neither leaves nor shows a heartbeat or progress for
    /// this long counts as gone (`peer_timeout`, ms).
    pub peer_timeout_ms: u64,
    /// How long a member waits for its peers to show up before giving up
    /// (`join_timeout`, ms).
    pub join_timeout_ms: u64,
}

/// Default `peer_timeout`: long enough for a live but slow guest (a Linux
/// guest on PVM runs its heartbeat thread on emulated kernel code, and a
/// busy host may not schedule a vCPU for a while), short enough that a
/// dead member is reported within seconds.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 10_000;

/// Default `peer_timeout` of a channel with a Linux member: its heartbeat
/// is a thread of a guest program, which a guest kernel on PVM (emulated)
/// on a busy host was seen to leave unscheduled for more than 10 s.
pub const DEFAULT_LINUX_PEER_TIMEOUT_MS: u64 = 60_000;

/// Default `join_timeout`.
pub const DEFAULT_JOIN_TIMEOUT_MS: u64 = 120_000;

/// Default `join_timeout` of a channel with a Linux member: Linux boots in
/// about 18 s on PVM and up to 5 times slower on a busy host, and each
/// command of its guest program starts with an exec on emulated kernel
/// code (`intervm-guest --join-timeout` has the same default).
pub const DEFAULT_LINUX_JOIN_TIMEOUT_MS: u64 = 600_000;

/// Parses a duration: a number with `ms`, `s` or `m`, from 1 ms to a day.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        _ => {
            return Err(format!(
                "{t:?} is not a duration (use e.g. \"500ms\", \"10s\" or \"2m\")"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| (1..=86_400_000).contains(ms))
        .ok_or_else(|| format!("{t:?} is not between 1ms and 24h"))
}

/// The default polling budget of adaptive notification, µs: about two
/// one-way doorbells as measured on this host's kind of KVM.
pub fn default_spin_us() -> u64 {
    if vmm_core::host::KvmFlavor::detect() == vmm_core::host::KvmFlavor::Pvm {
        notify::SPIN_US_PVM
    } else {
        notify::SPIN_US_HARDWARE
    }
}

impl ChannelSpec {
    /// Member index of `vm`.
    pub fn index_of(&self, vm: &str) -> Option<u32> {
        self.members.iter().position(|m| m == vm).map(|i| i as u32)
    }
}

/// A validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// VMs in file order.
    pub vms: Vec<VmSpec>,
    /// Channels in file order.
    pub channels: Vec<ChannelSpec>,
}

/// Default RAM when `memory` is omitted.
pub const DEFAULT_MEMORY: u64 = 32 << 20;

/// Parses a size given on the command line (bytes, or K/M/G suffix).
pub fn parse_size_str(s: &str) -> Result<u64, String> {
    parse_size(&RawSize::Text(s.to_string()))
}

fn parse_size(s: &RawSize) -> Result<u64, String> {
    match s {
        RawSize::Bytes(b) => Ok(*b),
        RawSize::Text(t) => intervm_protocol::units::parse_size(t).ok_or_else(|| {
            format!(
                "{:?} is not a size (use bytes or a number with K, M or G)",
                t.trim()
            )
        }),
    }
}

/// Validates a `probe = { ... }` table; errors start with the key below `probe`.
fn probe_task(p: &RawProbe, vm: &VmSpec, channels: &[ChannelSpec]) -> Result<ProbeTask, String> {
    use TaskName::*;
    let task = p.task.get(|t| {
        format!("task: {t:?} is not \"hello\", \"send\", \"recv\", \"exchange\", \"ping\", \"pong\" or \"chaos\"")
    })?;
    if matches!(task, Hello | Chaos) {
        for (k, set) in [
            ("channel", p.channel.is_some()),
            ("to", p.to.is_some()),
            ("from", p.from.is_some()),
            ("with", p.with.is_some()),
            ("size", p.size.is_some()),
            ("chunk", p.chunk.is_some()),
            ("mode", p.mode.is_some()),
            ("width", p.width.is_some()),
            ("rep", p.rep.is_some()),
            ("rounds", p.rounds.is_some()),
            ("transfers", p.transfers.is_some()),
            ("zero_copy", p.zero_copy.is_some()),
            ("ops", p.ops.is_some() && task == Hello),
            ("seed", p.seed.is_some() && task == Hello),
        ] {
            if set {
                return Err(format!("{k}: not used by task {:?}", task.name()));
            }
        }
        if task == Hello {
            return Ok(ProbeTask::Hello);
        }
        return Ok(ProbeTask::Chaos {
            ops: p.ops.unwrap_or(10_000),
            seed: p.seed.unwrap_or(1),
        });
    }
    for (k, set) in [("ops", p.ops.is_some()), ("seed", p.seed.is_some())] {
        if set {
            return Err(format!("{k}: only meaningful for task \"chaos\""));
        }
    }
    let name = p
        .channel
        .as_deref()
        .ok_or("channel: missing (which channel to use)")?;
    let index = channels
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| format!("channel: no [[channel]] is named {name:?}"))?;
    let ch = &channels[index];
    let me = ch
        .index_of(&vm.name)
        .ok_or_else(|| format!("channel: {:?} is not a member of {name:?}", vm.name))?;
    let channel = ChannelRef {
        name: name.into(),
        index,
        me,
        device: pci_channels(channels, &vm.name)
            .position(|c| c.name == name)
            .unwrap_or(0) as u32,
    };
    if matches!(task, Ping | Pong) {
        if ch.kind.doorbell().is_none() {
            return Err(format!(
                "channel: ping/pong run on kind = \"doorbell\" channels; {name:?} is {:?}",
                ch.kind.as_str()
            ));
        }
        let to = p.to.clone().ok_or("to: missing (the other VM)")?;
        let index = ch
            .index_of(&to)
            .filter(|_| to != vm.name)
            .ok_or_else(|| format!("to: {to:?} is not another member of channel {name:?}"))?;
        return Ok(ProbeTask::PingPong {
            channel,
            to: MemberRef { name: to, index },
            rounds: p.rounds.unwrap_or(1000).max(1),
            initiator: task == Ping,
        });
    }
    if p.rounds.is_some() {
        return Err("rounds: only meaningful for ping/pong".into());
    }
    if p.with.is_some() && task != Exchange {
        return Err("with: only meaningful for task \"exchange\"".into());
    }
    if task == Exchange && ch.kind.is_portio() {
        return Err(format!(
            "channel: exchange runs on \"shmem\" and \"doorbell\" channels; {name:?} is \"portio\""
        ));
    }
    if p.transfers.is_some() && task != Recv {
        return Err("transfers: only meaningful for task \"recv\"".into());
    }
    if p.zero_copy.is_some() && !matches!(task, Send | Recv) {
        return Err("zero_copy: only meaningful for tasks \"send\" and \"recv\"".into());
    }
    if p.zero_copy.is_some() && ch.kind.is_portio() {
        return Err(format!(
            "zero_copy: only meaningful on \"shmem\" and \"doorbell\" channels; {name:?} is \"portio\" (its rings belong to the VMMs)"
        ));
    }
    let zero_copy = p.zero_copy.unwrap_or(false);
    let portio = if let Kind::Portio { port } = ch.kind {
        let descriptor = match &p.mode {
            None => false,
            Some(m) => {
                m.get(|m| format!("mode: {m:?} is not \"port\" or \"descriptor\""))?
                    == ModeName::Descriptor
            }
        };
        let width = match p.width {
            None => 4,
            Some(w @ (1 | 2 | 4)) => w as u8,
            Some(w) => return Err(format!("width: {w} is not 1, 2 or 4")),
        };
        if descriptor && (p.width.is_some() || p.rep.is_some()) {
            return Err("width: only meaningful with mode = \"port\"".into());
        }
        Some(PortioHow {
            port,
            descriptor,
            width,
            rep: p.rep.unwrap_or(false),
        })
    } else {
        for (k, set) in [
            ("mode", p.mode.is_some()),
            ("width", p.width.is_some()),
            ("rep", p.rep.is_some()),
        ] {
            if set {
                return Err(format!("{k}: only meaningful on a \"portio\" channel"));
            }
        }
        None
    };
    let size = match &p.size {
        Some(s) => parse_size(s).map_err(|e| format!("size: {e}"))?,
        None => return Err("size: missing (bytes to move)".into()),
    };
    if size == 0 {
        return Err("size: must be at least 1 byte".into());
    }
    let chunk = match &p.chunk {
        Some(s) => parse_size(s).map_err(|e| format!("chunk: {e}"))?,
        None => DEFAULT_CHUNK,
    };
    if chunk == 0 {
        return Err("chunk: must be at least 1 byte".into());
    }
    if chunk > intervm_protocol::probe::SHMEM_BUF_MAX {
        return Err(format!(
            "chunk: {chunk} bytes is more than the probe's {} MiB frame buffer",
            intervm_protocol::probe::SHMEM_BUF_MAX >> 20
        ));
    }
    // intervm computes the checksum a transfer must arrive with one frame
    // at a time: bound the transfer and its frames.
    if size > MAX_TRANSFER {
        return Err(format!(
            "size: {size} bytes is more than a probe transfer moves ({} GiB)",
            MAX_TRANSFER >> 30
        ));
    }
    if size.div_ceil(chunk) > MAX_FRAMES {
        return Err(format!(
            "chunk: {size} bytes in frames of {chunk} bytes is more than {MAX_FRAMES} frames; \
             use a larger chunk"
        ));
    }
    let need = shmem_min_memory(size);
    if vm.memory < need {
        return Err(format!(
            "size: moving {size} bytes needs memory of at least {}M for the probe's buffer (vm has {}M)",
            need.div_ceil(1 << 20),
            vm.memory >> 20
        ));
    }
    let peer = |n: &String, k: &str| -> Result<MemberRef, String> {
        if *n == vm.name {
            return Err(format!("{k}: a VM cannot be its own peer"));
        }
        let index = ch
            .index_of(n)
            .ok_or_else(|| format!("{k}: {n:?} is not a member of channel {name:?}"))?;
        Ok(MemberRef {
            name: n.clone(),
            index,
        })
    };
    // A list of other members (key `k`); left out: every other member.
    let peers = |list: &Option<Vec<String>>, k: &str| -> Result<Vec<MemberRef>, String> {
        let names: Vec<String> = match list {
            Some(l) if l.is_empty() => return Err(format!("{k}: empty")),
            Some(l) => l.clone(),
            None => ch
                .members
                .iter()
                .filter(|m| **m != vm.name)
                .cloned()
                .collect(),
        };
        let mut seen = HashSet::new();
        names
            .iter()
            .map(|n| match seen.insert(n) {
                true => peer(n, k),
                false => Err(format!("{k}: {n:?} is named twice")),
            })
            .collect()
    };
    if task == Exchange {
        for (k, set) in [("to", p.to.is_some()), ("from", p.from.is_some())] {
            if set {
                return Err(format!("{k}: not used by task \"exchange\" (use with)"));
            }
        }
        // Its receive buffer follows its payload buffer.
        let need = shmem_min_memory(size).next_multiple_of(4096) + chunk.min(size);
        if vm.memory < need {
            return Err(format!(
                "size: exchanging {size} bytes in frames of {chunk} needs memory of at least {}M for the probe's buffers (vm has {}M)",
                need.div_ceil(1 << 20),
                vm.memory >> 20
            ));
        }
        return Ok(ProbeTask::Exchange {
            with: peers(&p.with, "with")?,
            channel,
            size,
            chunk,
        });
    }
    if task == Send {
        if p.from.is_some() {
            return Err("from: not used by task \"send\" (use to)".into());
        }
        let to = p.to.clone().ok_or("to: missing (the receiving VM)")?;
        Ok(ProbeTask::Send {
            to: peer(&to, "to")?,
            channel,
            size,
            chunk,
            portio,
            zero_copy,
        })
    } else {
        if p.to.is_some() {
            return Err("to: not used by task \"recv\" (use from)".into());
        }
        let from = peers(&p.from, "from")?;
        let transfers = match p.transfers {
            None => 0,
            Some(_) if from.len() != 1 => {
                return Err(format!(
                    "transfers: needs exactly one sender in from (has {})",
                    from.len()
                ))
            }
            Some(n @ 1..=MAX_TRANSFERS) => n,
            Some(n) => {
                return Err(format!(
                    "transfers: {n} is not between 1 and {MAX_TRANSFERS}"
                ))
            }
        };
        Ok(ProbeTask::Recv {
            channel,
            from,
            size,
            chunk: p.chunk.as_ref().map_or(0, |_| chunk),
            portio,
            transfers,
            zero_copy,
        })
    }
}

/// The key `k` of section number `i` of kind `section` in messages:
/// `vm[NAME].k`, or `vm[i].k` while the name is missing.
fn section_key(section: &str, i: usize, name: &str, k: &str) -> String {
    if name.is_empty() {
        format!("{section}[{i}].{k}")
    } else {
        format!("{section}[{name}].{k}")
    }
}

/// Validates `[[vm]]` number `i`; errors start with its key. `names`
/// collects the VM names so far, `earlier` the VMs before it.
fn vm_spec(
    i: usize,
    v: &RawVm,
    names: &mut HashSet<String>,
    earlier: &[VmSpec],
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<VmSpec, String> {
    let key = |k: &str| section_key("vm", i, &v.name, k);
    if v.name.is_empty()
        || !v
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{}: {:?} must be non-empty letters, digits, '-' or '_'",
            key("name"),
            v.name
        ));
    }
    if !names.insert(v.name.clone()) {
        return Err(format!("{}: duplicate VM name {:?}", key("name"), v.name));
    }
    let memory = match &v.memory {
        Some(m) => parse_size(m).map_err(|e| format!("{}: {e}", key("memory")))?,
        None => DEFAULT_MEMORY,
    };
    if memory == 0 || memory % 4096 != 0 {
        return Err(format!(
            "{}: {memory} is not a non-zero multiple of 4 KiB",
            key("memory")
        ));
    }
    if memory > vmm_core::layout::MAX_RAM {
        return Err(format!(
            "{}: {memory} exceeds the maximum {}",
            key("memory"),
            vmm_core::layout::MAX_RAM
        ));
    }
    let vcpus = v.vcpus.unwrap_or(1);
    let max_vcpus = vmm_core::x86::mptable::MAX_VCPUS as u32;
    if !(1..=max_vcpus).contains(&vcpus) {
        return Err(format!(
            "{}: {vcpus} is not between 1 and {max_vcpus}",
            key("vcpus")
        ));
    }
    let kernel = match v.kernel.as_deref() {
        None | Some("probe") => {
            for (k, set) in [
                ("cmdline", v.cmdline.is_some()),
                ("initrd", v.initrd.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{}: only meaningful with a Linux kernel, not the probe",
                        key(k)
                    ));
                }
            }
            if memory < 4 << 20 {
                return Err(format!(
                    "{}: the probe guest needs at least 4M",
                    key("memory")
                ));
            }
            Kernel::Probe
        }
        Some(p) => {
            if memory < vmm_core::boot::linux::MIN_RAM {
                return Err(format!(
                    "{}: a Linux guest needs at least {}M",
                    key("memory"),
                    vmm_core::boot::linux::MIN_RAM >> 20
                ));
            }
            let path = resolve(p);
            if !path.is_file() {
                return Err(format!(
                    "{}: kernel file {} does not exist",
                    key("kernel"),
                    path.display()
                ));
            }
            let initrd = match &v.initrd {
                Some(i) => {
                    let ip = resolve(i);
                    if !ip.is_file() {
                        return Err(format!(
                            "{}: initrd file {} does not exist",
                            key("initrd"),
                            ip.display()
                        ));
                    }
                    Some(ip)
                }
                None => None,
            };
            Kernel::Linux {
                path,
                cmdline: v.cmdline.clone().unwrap_or_default(),
                initrd,
            }
        }
    };
    let serial = match &v.serial {
        None => Serial::Stdout,
        Some(RawSerial::Named(Choice::Is(SerialName::Stdout))) => Serial::Stdout,
        Some(RawSerial::Named(Choice::Is(SerialName::None))) => Serial::None,
        Some(RawSerial::Named(Choice::Is(SerialName::Console))) => {
            if let Some(other) = earlier.iter().find(|o| o.serial == Serial::Console) {
                return Err(format!(
                    "{}: \"console\" is already taken by vm[{}]: stdin can feed only one VM's console (give the others \"stdout\")",
                    key("serial"),
                    other.name
                ));
            }
            Serial::Console
        }
        Some(RawSerial::Named(Choice::Not(s))) => {
            return Err(format!(
                "{}: {s:?} is not \"stdout\", \"console\", \"none\" or {{ file = \"path\" }}",
                key("serial")
            ))
        }
        Some(RawSerial::File { file }) => Serial::File(resolve(file)),
    };
    if v.probe.is_some() && kernel != Kernel::Probe {
        return Err(format!(
            "{}: only meaningful with kernel = \"probe\"",
            key("probe")
        ));
    }
    Ok(VmSpec {
        name: v.name.clone(),
        memory,
        vcpus: vcpus as u8,
        kernel,
        serial,
        probe: Vec::new(),
    })
}

/// Validates `[[channel]]` number `i` against the VMs (`names`) and the
/// channels before it (`earlier`, whose names are in `chan_names`); errors
/// start with its key.
fn channel_spec(
    i: usize,
    c: &RawChannel,
    names: &HashSet<String>,
    vms: &[VmSpec],
    chan_names: &mut HashSet<String>,
    earlier: &[ChannelSpec],
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<ChannelSpec, String> {
    let key = |k: &str| section_key("channel", i, &c.name, k);
    if c.name.is_empty() {
        return Err(format!("{}: must not be empty", key("name")));
    }
    if !chan_names.insert(c.name.clone()) {
        return Err(format!(
            "{}: duplicate channel name {:?}",
            key("name"),
            c.name
        ));
    }
    let kind = channel_kind(c, &key)?;
    if c.members.len() < 2 {
        return Err(format!(
            "{}: a channel needs at least two members",
            key("members")
        ));
    }
    let mut seen = HashSet::new();
    for m in &c.members {
        if !names.contains(m) {
            return Err(format!("{}: no [[vm]] is named {m:?}", key("members")));
        }
        if !seen.insert(m) {
            return Err(format!("{}: {m:?} is listed twice", key("members")));
        }
    }
    if c.members.len() as u32 > MAX_MEMBERS {
        return Err(format!("{}: at most {MAX_MEMBERS} members", key("members")));
    }
    let size = match &c.size {
        Some(s) => parse_size(s).map_err(|e| format!("{}: {e}", key("size")))?,
        None if kind.is_portio() => DEFAULT_PORTIO_SIZE,
        None => DEFAULT_SHMEM_SIZE,
    };
    if size < 4096 || !size.is_power_of_two() {
        return Err(format!(
            "{}: {size} is not a power of two of at least 4K",
            key("size")
        ));
    }
    if let Err(RingError::RegionTooSmall { needed, .. }) =
        Geometry::fit(c.members.len() as u32, size)
    {
        return Err(format!(
            "{}: {size} bytes cannot hold rings for {} members (needs at least {})",
            key("size"),
            c.members.len(),
            needed.next_power_of_two()
        ));
    }
    let ring_bytes = match &c.ring_size {
        None => None,
        Some(_) if kind.is_portio() => {
            return Err(format!(
                "{}: only meaningful for kind = \"shmem\" or \"doorbell\"",
                key("ring_size")
            ))
        }
        Some(r) => {
            let n = parse_size(r).map_err(|e| format!("{}: {e}", key("ring_size")))?;
            match Geometry::at_end(c.members.len() as u32, size, n) {
                Ok(_) => Some(n),
                Err(RingError::RegionTooSmall { needed, .. }) => {
                    return Err(format!(
                        "{}: {} rings of {n} bytes (one per ordered pair of {} members) do not fit in size = {size} (need {needed} bytes)",
                        key("ring_size"),
                        c.members.len() * (c.members.len() - 1),
                        c.members.len()
                    ))
                }
                Err(_) => {
                    return Err(format!(
                        "{}: {n} is not a power of two of at least {}",
                        key("ring_size"),
                        intervm_protocol::ring::MIN_RING_BYTES
                    ))
                }
            }
        }
    };
    if kind.is_portio() && size > MAX_PORTIO_SIZE {
        // Each member's device holds a message buffer each way as
        // large as a ring.
        return Err(format!(
            "{}: {size} bytes is more than a port-I/O channel takes ({} MiB)",
            key("size"),
            MAX_PORTIO_SIZE >> 20
        ));
    }
    let backing = backing(c, &kind, &key, resolve)?;
    // One backing, one channel: two channels on one region would
    // write each other's rings (and a host-only port-I/O ring would
    // be open to a shared-memory guest).
    if let Some(at) = backing.location() {
        if let Some(other) = earlier
            .iter()
            .find(|o| o.backing.location().as_ref() == Some(&at))
        {
            return Err(format!(
                "{}: channel[{}] uses the same backing ({}); every channel needs its own region",
                key("backing"),
                other.name,
                at.display()
            ));
        }
    }
    let has_linux = c.members.iter().any(|m| {
        vms.iter()
            .any(|v| &v.name == m && v.kernel != Kernel::Probe)
    });
    let spec = ChannelSpec {
        name: c.name.clone(),
        kind,
        members: c.members.clone(),
        size,
        size_given: c.size.is_some(),
        ring_bytes,
        backing,
        peer_timeout_ms: match &c.peer_timeout {
            // A Linux member's heartbeat is a guest program's thread.
            None if has_linux => DEFAULT_LINUX_PEER_TIMEOUT_MS,
            None => DEFAULT_PEER_TIMEOUT_MS,
            Some(t) => parse_duration_ms(t).map_err(|m| format!("{}: {m}", key("peer_timeout")))?,
        },
        join_timeout_ms: match &c.join_timeout {
            None if has_linux => DEFAULT_LINUX_JOIN_TIMEOUT_MS,
            None => DEFAULT_JOIN_TIMEOUT_MS,
            Some(t) => parse_duration_ms(t).map_err(|m| format!("{}: {m}", key("join_timeout")))?,
        },
    };
    pci_room(&spec, earlier).map_err(|m| format!("{}: {m}", key("size")))?;
    port_overlap(&spec, earlier).map_err(|m| format!("{}: {m}", key("port")))?;
    Ok(spec)
}

/// The kind of a channel with the options of that kind; an option of
/// another kind is an error.
fn channel_kind(c: &RawChannel, key: &dyn Fn(&str) -> String) -> Result<Kind, String> {
    let kind = c.kind.get(|k| {
        format!(
            "{}: unknown channel kind {k:?} (expected \"portio\", \"shmem\" or \"doorbell\")",
            key("kind")
        )
    })?;
    for (k, set, owner, name) in [
        ("port", c.port.is_some(), KindName::Portio, "portio"),
        (
            "vectors",
            c.vectors.is_some(),
            KindName::Doorbell,
            "doorbell",
        ),
        (
            "fast_path",
            c.fast_path.is_some(),
            KindName::Doorbell,
            "doorbell",
        ),
        ("notify", c.notify.is_some(), KindName::Doorbell, "doorbell"),
        (
            "spin_us",
            c.spin_us.is_some(),
            KindName::Doorbell,
            "doorbell",
        ),
    ] {
        if set && kind != owner {
            return Err(format!("{}: only meaningful for kind = \"{name}\"", key(k)));
        }
    }
    Ok(match kind {
        KindName::Portio => Kind::Portio {
            port: match c.port {
                None => intervm_protocol::portio::DEFAULT_BASE,
                Some(p) => {
                    let end = p.saturating_add(intervm_protocol::portio::PORT_COUNT as i64);
                    if p < PORTIO_PORTS.start as i64 || end > PORTIO_PORTS.end as i64 {
                        return Err(format!(
                            "{}: {p:#x}..{end:#x} must lie within {:#x}..{:#x} (below is legacy ISA, above is the PCI I/O window)",
                            key("port"),
                            PORTIO_PORTS.start,
                            PORTIO_PORTS.end
                        ));
                    }
                    p as u16
                }
            },
        },
        KindName::Shmem => Kind::Shmem,
        KindName::Doorbell => {
            let vectors = c.vectors.unwrap_or(1);
            if !(1..=64).contains(&vectors) {
                return Err(format!(
                    "{}: {vectors} is not between 1 and 64",
                    key("vectors")
                ));
            }
            Kind::Doorbell(DoorbellSpec {
                vectors: vectors as usize,
                fast_path: c.fast_path.unwrap_or(true),
                notify: match &c.notify {
                    None => Notify::default(),
                    Some(Choice::Is(n)) => *n,
                    // The mode's own parser phrases what it accepts.
                    Some(Choice::Not(n)) => n
                        .parse()
                        .map_err(|e| format!("{}: {n:?} is {e}", key("notify")))?,
                },
                spin_us: c.spin_us.map(|us| us.max(1)),
            })
        }
    })
}

/// The region behind a channel.
fn backing(
    c: &RawChannel,
    kind: &Kind,
    key: &dyn Fn(&str) -> String,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<Backing, String> {
    Ok(match &c.backing {
        None => Backing::Memfd,
        Some(RawBacking {
            server: Some(sock),
            shm: None,
            file: None,
            hugetlbfs: None,
        }) => {
            if kind.doorbell().is_none() {
                return Err(format!(
                    "{}: an ivshmem server only serves kind = \"doorbell\" channels",
                    key("backing.server")
                ));
            }
            Backing::Server(resolve(sock))
        }
        Some(b) if b.server.is_some() => {
            return Err(format!(
                "{}: give exactly one of shm, file, hugetlbfs, server",
                key("backing")
            ))
        }
        Some(b) => match (&b.shm, &b.file, &b.hugetlbfs) {
            (Some(n), None, None) => {
                if !shmem_device::is_shm_name(n) {
                    return Err(format!(
                        "{}: shm name {n:?} must be 1-200 characters without '/' or NUL, and not . or ..",
                        key("backing.shm")
                    ));
                }
                Backing::Shm(n.clone())
            }
            (None, Some(f), None) => Backing::File(resolve(f)),
            (None, None, Some(h)) => Backing::Hugetlbfs(resolve(h)),
            _ => {
                return Err(format!(
                    "{}: give exactly one of shm = \"name\", file = \"path\", hugetlbfs = \"path\"",
                    key("backing")
                ))
            }
        },
    })
}

/// Whether `c`'s region fits in the 64-bit PCI window of each member
/// beside the regions of `earlier` channels. BAR2 of every shared region of
/// a VM goes there, in file order, each aligned to its size: this places
/// them as the PCI bus will, to fail here, not at boot.
fn pci_room(c: &ChannelSpec, earlier: &[ChannelSpec]) -> Result<(), String> {
    let in_window =
        |o: &ChannelSpec| !o.kind.is_portio() && !matches!(o.backing, Backing::Server(_));
    if !in_window(c) {
        return Ok(());
    }
    let end = vmm_core::layout::PCI_MMIO64_BASE + vmm_core::layout::PCI_MMIO64_SIZE;
    for vm in &c.members {
        let mut next = vmm_core::layout::PCI_MMIO64_BASE;
        for o in earlier
            .iter()
            .filter(|o| in_window(o) && o.members.contains(vm))
            .chain([c])
        {
            let at = next.next_multiple_of(o.size.max(4096));
            if at.saturating_add(o.size) > end {
                return Err(format!(
                    "vm {vm:?} has no room for {}'s {} bytes in its {} GiB PCI window for \
                     shared regions (placed in file order, each aligned to its size)",
                    o.name,
                    o.size,
                    vmm_core::layout::PCI_MMIO64_SIZE >> 30
                ));
            }
            next = at + o.size;
        }
    }
    Ok(())
}

/// Whether a port-I/O channel's ports overlap those of an `earlier` one on
/// a VM both are members of.
fn port_overlap(c: &ChannelSpec, earlier: &[ChannelSpec]) -> Result<(), String> {
    let Kind::Portio { port } = c.kind else {
        return Ok(());
    };
    let count = intervm_protocol::portio::PORT_COUNT as u32;
    let a = port as u32;
    for other in earlier {
        let Kind::Portio { port: b } = other.kind else {
            continue;
        };
        let b = b as u32;
        let shared_vm = c.members.iter().find(|m| other.members.contains(m));
        if let (true, Some(vm)) = (a < b + count && b < a + count, shared_vm) {
            return Err(format!(
                "ports {a:#x}..{:#x} overlap channel[{}] ({b:#x}..{:#x}) on vm {vm:?}",
                a + count,
                other.name,
                b + count
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths inside are
    /// taken relative to the file's directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError {
            file: path.display().to_string(),
            msg,
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| err(e.to_string().trim_end().replace('\n', "\n  ")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        if raw.vm.is_empty() {
            return Err(err("no [[vm]] defined".into()));
        }
        let mut names = HashSet::new();
        let mut vms = Vec::new();
        for (i, v) in raw.vm.iter().enumerate() {
            let spec = vm_spec(i, v, &mut names, &vms, &resolve).map_err(err)?;
            vms.push(spec);
        }

        let mut chan_names = HashSet::new();
        let mut channels = Vec::new();
        for (i, c) in raw.channel.iter().enumerate() {
            let spec = channel_spec(i, c, &names, &vms, &mut chan_names, &channels, &resolve)
                .map_err(err)?;
            channels.push(spec);
        }
        for (v, spec) in raw.vm.iter().zip(vms.iter_mut()) {
            match &v.probe {
                None => {}
                Some(RawProbes::One(p)) => {
                    let t = probe_task(p, spec, &channels)
                        .map_err(|m| err(format!("vm[{}].probe.{m}", spec.name)))?;
                    spec.probe = vec![t];
                }
                Some(RawProbes::Many(list)) => {
                    if list.is_empty() || list.len() > intervm_protocol::probe::MAX_TASKS {
                        return Err(err(format!(
                            "vm[{}].probe: give 1 to {} tasks",
                            spec.name,
                            intervm_protocol::probe::MAX_TASKS
                        )));
                    }
                    let mut tasks = Vec::new();
                    for (i, p) in list.iter().enumerate() {
                        tasks.push(
                            probe_task(p, spec, &channels)
                                .map_err(|m| err(format!("vm[{}].probe[{i}].{m}", spec.name)))?,
                        );
                    }
                    spec.probe = tasks;
                }
            }
        }
        Ok(Config {
            file: path.to_path_buf(),
            vms,
            channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, String> {
        Config::parse(s, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("[[vm]]\nname = \"a\"\n").unwrap();
        assert_eq!(c.vms[0].memory, DEFAULT_MEMORY);
        assert_eq!(c.vms[0].vcpus, 1);
        assert_eq!(c.vms[0].kernel, Kernel::Probe);
        assert_eq!(c.vms[0].serial, Serial::Stdout);
    }

    #[test]
    fn tasks_know_their_pci_function_in_bus_order() {
        // b's ivshmem functions: s (0), then d (1); p is port I/O and t
        // does not include b.
        let c = parse(
            "[[vm]]\nname = \"a\"\nmemory = \"64M\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\n\
             probe = [{ task = \"recv\", channel = \"d\", size = \"4K\" }, { task = \"recv\", channel = \"s\", size = \"4K\" }]\n\
             [[vm]]\nname = \"c\"\n\
             [[channel]]\nname = \"t\"\nkind = \"shmem\"\nmembers = [\"a\", \"c\"]\n\
             [[channel]]\nname = \"s\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n\
             [[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n\
             [[channel]]\nname = \"d\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let devices: Vec<(String, u32)> = c.vms[1]
            .probe
            .iter()
            .map(|t| match t {
                ProbeTask::Recv { channel, .. } => (channel.name.clone(), channel.device),
                t => panic!("unexpected task {t:?}"),
            })
            .collect();
        assert_eq!(devices, [("d".to_string(), 1), ("s".to_string(), 0)]);
        let names: Vec<&str> = pci_channels(&c.channels, "a")
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["t", "s", "d"]);
    }

    #[test]
    fn an_exchange_is_with_every_other_member_unless_named() {
        let c = parse(
            "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nprobe = { task = \"exchange\", channel = \"c\", size = \"1M\" }\n\
             [[vm]]\nname = \"b\"\nmemory = \"64M\"\nprobe = { task = \"exchange\", channel = \"c\", size = \"1M\", with = [\"d\"], chunk = \"4K\" }\n\
             [[vm]]\nname = \"d\"\n\
             [[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\", \"d\"]\n",
        )
        .unwrap();
        let with = |vm: usize| match &c.vms[vm].probe[0] {
            ProbeTask::Exchange { with, chunk, .. } => (
                with.iter()
                    .map(|w| (w.name.as_str(), w.index))
                    .collect::<Vec<_>>(),
                *chunk,
            ),
            t => panic!("unexpected task {t:?}"),
        };
        assert_eq!(with(0), (vec![("b", 1), ("d", 2)], DEFAULT_CHUNK));
        assert_eq!(with(1), (vec![("d", 2)], 4096));
    }

    #[test]
    fn one_vm_may_take_the_console() {
        let c = parse(
            "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nserial = \"console\"\n[[vm]]\nname = \"c\"\nserial = \"none\"\n",
        )
        .unwrap();
        let serials: Vec<_> = c.vms.iter().map(|v| v.serial.clone()).collect();
        assert_eq!(serials, [Serial::Stdout, Serial::Console, Serial::None]);
    }

    #[test]
    fn durations_and_liveness_defaults() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms(" 10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert!(parse_duration_ms("10").is_err(), "a unit is required");
        assert!(parse_duration_ms("99999999999999999999s").is_err());
        let c = parse(
            "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n[[channel]]\nname = \"d\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\npeer_timeout = \"30s\"\njoin_timeout = \"5m\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.channels[0].peer_timeout_ms, c.channels[0].join_timeout_ms),
            (DEFAULT_PEER_TIMEOUT_MS, DEFAULT_JOIN_TIMEOUT_MS)
        );
        assert_eq!(
            (c.channels[1].peer_timeout_ms, c.channels[1].join_timeout_ms),
            (30_000, 300_000)
        );
        // A Linux member's heartbeat is a guest thread, and it boots and
        // execs slowly: longer defaults, unless the file says otherwise.
        let linux = |extra: &str| {
            parse(&format!(
                "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nkernel = \"{}\"\n\
                 [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n{extra}",
                // Any file will do: parsing only checks that it exists.
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")
            ))
            .unwrap()
            .channels[0]
                .clone()
        };
        let times = |c: ChannelSpec| (c.peer_timeout_ms, c.join_timeout_ms);
        assert_eq!(
            times(linux("")),
            (DEFAULT_LINUX_PEER_TIMEOUT_MS, DEFAULT_LINUX_JOIN_TIMEOUT_MS)
        );
        assert_eq!(
            times(linux("peer_timeout = \"5s\"\njoin_timeout = \"7s\"\n")),
            (5_000, 7_000)
        );
    }

    #[test]
    fn notify_defaults_to_adaptive_and_reads_every_mode() {
        let doorbell = |extra: &str| {
            parse(&format!(
                "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\n{extra}"
            ))
            .unwrap()
            .channels[0]
                .clone()
        };
        let spec = |c: ChannelSpec| c.kind.doorbell().cloned().expect("a doorbell channel");
        let d = spec(doorbell(""));
        assert_eq!((d.notify, d.spin_us), (Notify::Adaptive, None));
        assert_eq!(d.spin_us(), default_spin_us());
        for n in Notify::ALL {
            let d = spec(doorbell(&format!("notify = \"{n}\"\nspin_us = 7\n")));
            assert_eq!((d.notify, d.spin_us()), (n, 7));
        }
    }

    #[test]
    fn sizes_accept_suffixes() {
        let c = parse(
            "[[vm]]\nname = \"a\"\nmemory = \"64M\"\n[[vm]]\nname = \"b\"\nmemory = 8388608\n",
        )
        .unwrap();
        assert_eq!(c.vms[0].memory, 64 << 20);
        assert_eq!(c.vms[1].memory, 8 << 20);
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let cases = [
            ("[[vm]]\nname = \"a\"\nmemroy = 1\n", "t.toml: ", "unknown field `memroy`"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = 5\nmembers = [\"a\", \"b\"]\n", "t.toml: ", "invalid type: integer `5`, expected a string"),
            ("[[vm]]\nname = \"a\"\nprobe = { task = \"Hello\" }\n", "vm[a].probe.task", "\"Hello\" is not \"hello\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"a\"\n", "vm[a].name", "duplicate VM name"),
            ("[[vm]]\nname = \"a\"\nmemory = 10000\n", "vm[a].memory", "not a non-zero multiple of 4 KiB"),
            ("[[vm]]\nname = \"a\"\nmemory = \"12Q\"\n", "vm[a].memory", "is not a size"),
            ("[[vm]]\nname = \"a\"\nkernel = \"/nonexistent/bzImage\"\n", "vm[a].kernel", "does not exist"),
            ("[[vm]]\nname = \"a\"\nvcpus = 0\n", "vm[a].vcpus", "between 1 and 239"),
            ("[[vm]]\nname = \"a\"\nvcpus = 240\n", "vm[a].vcpus", "between 1 and 239"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nport = 9223372036854775807\n", "channel[c].port", "must lie within"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nsize = \"1024G\"\n", "channel[c].size", "more than a port-I/O channel takes (256 MiB)"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"64G\"\n", "channel[c].size", "vm \"a\" has no room for c's"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"8G\"\n[[channel]]\nname = \"d\"\nkind = \"doorbell\"\nmembers = [\"b\", \"a\"]\nsize = \"16G\"\n", "channel[d].size", "no room for d's"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nbacking = { shm = \"..\" }\n", "channel[c].backing.shm", "not . or .."),
            ("[[vm]]\nname = \"a\"\nserial = \"tty\"\n", "vm[a].serial", "is not \"stdout\", \"console\""),
            ("[[vm]]\nname = \"a\"\nserial = \"console\"\n[[vm]]\nname = \"b\"\nserial = \"console\"\n", "vm[b].serial", "already taken by vm[a]: stdin can feed only one VM"),
            ("[[vm]]\nname = \"a\"\ncmdline = \"x\"\n", "vm[a].cmdline", "not the probe"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"carrier-pigeon\"\nmembers = [\"a\", \"b\"]\n", "channel[c].kind", "unknown channel kind"),
            ("[[vm]]\nname = \"a\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"z\"]\n", "channel[c].members", "no [[vm]] is named \"z\""),
            ("[[vm]]\nname = \"a\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\"]\n", "channel[c].members", "at least two"),
            ("", "t.toml", "no [[vm]] defined"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\npeer_timeout = \"soon\"\n", "channel[c].peer_timeout", "is not a duration"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\njoin_timeout = \"0s\"\n", "channel[c].join_timeout", "between 1ms and 24h"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"d\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\nprobe = { task = \"recv\", channel = \"c\", from = [\"a\", \"d\"], size = \"1M\", transfers = 2 }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\", \"d\"]\n[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.transfers", "needs exactly one sender in from (has 2)"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"d\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\nprobe = { task = \"recv\", channel = \"c\", from = [\"a\"], size = \"1M\", transfers = 0 }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\", \"d\"]\n[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.transfers", "0 is not between 1 and 1000000"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nprobe = { task = \"send\", channel = \"c\", to = \"a\", size = \"1000000G\" }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.size", "more than a probe transfer moves (1024 GiB)"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nprobe = { task = \"recv\", channel = \"c\", from = [\"a\"], size = \"1000G\", chunk = \"1\" }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.chunk", "more than 4294967296 frames; use a larger chunk"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nprobe = { task = \"send\", channel = \"p\", to = \"a\", size = \"1M\", zero_copy = true }\n[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.zero_copy", "only meaningful on \"shmem\" and \"doorbell\" channels; \"p\" is \"portio\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\nprobe = { task = \"exchange\", channel = \"c\", size = \"1M\", zero_copy = true }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.zero_copy", "only meaningful for tasks \"send\" and \"recv\""),
            ("[[vm]]\nname = \"a\"\nprobe = { task = \"hello\", zero_copy = false }\n", "vm[a].probe.zero_copy", "not used by task \"hello\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"d\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\nprobe = { task = \"send\", channel = \"c\", to = \"a\", size = \"1M\", transfers = 2 }\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\", \"d\"]\n[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n", "vm[b].probe.transfers", "only meaningful for task \"recv\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\nnotify = \"sometimes\"\n", "channel[c].notify", "\"sometimes\" is not \"always\", \"adaptive\" or \"never\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nnotify = \"never\"\n", "channel[c].notify", "only meaningful for kind = \"doorbell\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nspin_us = 5\n", "channel[c].spin_us", "only meaningful for kind = \"doorbell\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nring_size = \"64K\"\n", "channel[c].ring_size", "only meaningful for kind = \"shmem\" or \"doorbell\""),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nring_size = \"96K\"\n", "channel[c].ring_size", "98304 is not a power of two of at least 4096"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\nsize = \"4M\"\nring_size = \"2M\"\n", "channel[c].ring_size", "2 rings of 2097152 bytes (one per ordered pair of 2 members) do not fit in size = 4194304"),
        ];
        let exchange = |task: &str, kind: &str| {
            format!(
                "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"d\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\nprobe = {{ {task} }}\n\
                 [[channel]]\nname = \"c\"\nkind = \"{kind}\"\nmembers = [\"a\", \"b\", \"d\"]\n"
            )
        };
        let exchanges = [
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"1M\"",
                    "portio",
                ),
                "vm[b].probe.channel",
                "exchange runs on \"shmem\" and \"doorbell\" channels",
            ),
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"1M\", to = \"a\"",
                    "shmem",
                ),
                "vm[b].probe.to",
                "not used by task \"exchange\" (use with)",
            ),
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"1M\", with = [\"a\", \"a\"]",
                    "shmem",
                ),
                "vm[b].probe.with",
                "\"a\" is named twice",
            ),
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"1M\", with = []",
                    "shmem",
                ),
                "vm[b].probe.with",
                "empty",
            ),
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"1M\", with = [\"b\"]",
                    "shmem",
                ),
                "vm[b].probe.with",
                "cannot be its own peer",
            ),
            (
                exchange(
                    "task = \"send\", channel = \"c\", size = \"1M\", to = \"a\", with = [\"a\"]",
                    "shmem",
                ),
                "vm[b].probe.with",
                "only meaningful for task \"exchange\"",
            ),
            (
                exchange(
                    "task = \"exchange\", channel = \"c\", size = \"16M\", chunk = \"16M\"",
                    "shmem",
                )
                .replace("64M", "48M"),
                "vm[b].probe.size",
                "needs memory of at least 64M for the probe's buffers (vm has 48M)",
            ),
        ];
        let cases = cases
            .into_iter()
            .map(|(t, k, p)| (t.to_string(), k, p))
            .chain(exchanges);
        for (text, key, problem) in cases {
            let text = text.as_str();
            let e = parse(text).expect_err(text);
            assert!(e.starts_with("t.toml: "), "{e}");
            assert!(
                e.contains(key) && e.contains(problem),
                "expected {key:?} and {problem:?} in: {e}"
            );
        }
    }
}
