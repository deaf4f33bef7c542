//! `intervm-guest`: the guest userspace side of intervm's channels.
//!
//! ```text
//! intervm-guest shmem send --me 0 --to 1 [--size 64M | --file F] [--device 00:03.0]
//! intervm-guest shmem recv --me 1 --from 0 [--size 64M] [--file OUT]
//! intervm-guest shmem recv --me 1 --from 0 --size 64M --transfers 3   # across sender restarts
//! intervm-guest shmem format --members 2
//! intervm-guest shmem check-protection --me 1   # what this guest may write
//! ```
//!
//! Runs in any Linux guest as root (it maps
//! `/sys/bus/pci/devices/*/resource2`); `--resource PATH` maps a file
//! instead, which is how the tests run it on the host against a
//! `/dev/shm` region shared with probe guests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use intervm_guest::{pci, portio, shmem, uio, Error, Payload};
use intervm_protocol::notify::{Notify, SPIN_US_PVM};

#[derive(Parser)]
#[command(
    name = "intervm-guest",
    version,
    about = "Guest userspace tools for intervm channels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Shared memory without interrupts (ivshmem BAR2, polled).
    #[command(subcommand)]
    Shmem(ShmemCmd),
    /// The port-I/O channel (in/out on the device's ports; needs root).
    #[command(subcommand)]
    Portio(PortioCmd),
    /// Shared memory with doorbells, through the ivshmem_uio driver.
    #[command(subcommand)]
    Doorbell(DoorbellCmd),
    /// Check the guest kernel's PVM system-call shim: a jump to the
    /// system-call entry with hostile RCX/R11 gains nothing (see
    /// `intervm_guest::syscall_entry`).
    #[cfg(target_arch = "x86_64")]
    #[command(hide = true)]
    CheckSyscallEntry {
        /// Address of entry_SYSCALL_64 (`nm vmlinux`), hexadecimal.
        #[arg(long, value_parser = parse_hex)]
        entry: u64,
    },
    /// Time the guest kernel's basic costs from userspace: a system call
    /// (`getppid`) and a page fault (first touch of an anonymous page).
    Costs {
        /// System calls and page faults to time.
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
    /// End the VM with an exit status: through intervm's debug port (so
    /// `intervm run` exits with it), else by rebooting (needs root).
    Poweroff {
        /// The status (0-255).
        #[arg(long, default_value_t = 0)]
        status: u8,
    },
}

#[derive(Args, Clone)]
struct UioOpts {
    /// The UIO device (default: the only one the ivshmem_uio driver made).
    #[arg(long)]
    uio: Option<PathBuf>,
    /// "adaptive": poll for --spin-us, ring only a sleeping side; "always":
    /// a doorbell per frame. Both sides must agree.
    #[arg(long, default_value_t = Notify::Adaptive, value_parser = doorbell_notify)]
    notify: Notify,
    /// Adaptive polling budget in microseconds (the default suits PVM; on
    /// hardware KVM, where a doorbell costs a few µs, 20 does).
    #[arg(long, default_value_t = SPIN_US_PVM)]
    spin_us: u64,
}

#[derive(Subcommand)]
enum DoorbellCmd {
    /// Send through the ring in BAR2, ringing the receiver when it sleeps
    /// (or after every frame with --notify always).
    Send {
        #[command(flatten)]
        uio: UioOpts,
        #[command(flatten)]
        args: SendArgs,
    },
    /// Receive, sleeping in read() on the UIO device until rung.
    Recv {
        #[command(flatten)]
        uio: UioOpts,
        #[command(flatten)]
        args: RecvArgs,
    },
    /// Ring a peer and wait for its ring, --rounds times.
    Pingpong {
        #[command(flatten)]
        uio: UioOpts,
        /// The peer's doorbell ID (its IVPosition).
        #[arg(long)]
        peer: u16,
        /// Round trips.
        #[arg(long, default_value_t = 1000)]
        rounds: u64,
        /// Ring first (the other side answers).
        #[arg(long)]
        initiator: bool,
        /// Seconds to wait for each ring.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
}

#[derive(Args, Clone)]
struct PortioOpts {
    /// First port of the channel device.
    #[arg(long, default_value = "0x5000", value_parser = parse_port)]
    port: u16,
    /// Move whole buffers with descriptors instead of in/out per element.
    #[arg(long)]
    descriptor: bool,
    /// Access width in bytes for in/out (1, 2 or 4).
    #[arg(long, default_value_t = 4, value_parser = parse_width)]
    width: usize,
    /// Use rep outs/rep ins.
    #[arg(long)]
    rep: bool,
}

fn parse_width(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "2" => Ok(2),
        "4" => Ok(4),
        _ => Err(format!("{s:?}: the width is 1, 2 or 4 bytes")),
    }
}

/// A pattern seed: a number, or `CHANNEL:SENDER` (the seed intervm's
/// launcher gives that sender's payload on that channel).
fn parse_seed(s: &str) -> Result<u64, String> {
    match s.split_once(':') {
        Some((channel, sender)) if !channel.is_empty() && !sender.is_empty() => {
            Ok(intervm_protocol::ring::seed_for(channel, sender))
        }
        _ => s
            .parse()
            .map_err(|_| format!("{s:?} is neither a number nor CHANNEL:SENDER")),
    }
}

fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{s:?} is not a hexadecimal address"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    let v = match s.strip_prefix("0x") {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("{s:?} is not a port number (e.g. 0x5000)"))
}

#[derive(Subcommand)]
enum PortioCmd {
    /// Send the test pattern (--size) or a file (--file) to a member.
    Send {
        #[command(flatten)]
        opts: PortioOpts,
        /// The receiving member.
        #[arg(long, default_value_t = 1)]
        to: u32,
        #[command(flatten)]
        what: PayloadArgs,
        /// Bytes per message.
        #[arg(long, default_value = "4K")]
        message: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// Receive --size bytes, or until an empty message.
    Recv {
        #[command(flatten)]
        opts: PortioOpts,
        /// The sending member.
        #[arg(long, default_value_t = 0)]
        from: u32,
        /// Bytes to receive.
        #[arg(long)]
        size: Option<String>,
        /// Write the payload here.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        timing: Timing,
    },
}

#[derive(Args, Clone)]
struct Region {
    /// PCI address of the ivshmem device (needed when there are several).
    #[arg(long)]
    device: Option<String>,
    /// Map this file instead of a PCI BAR (e.g. /dev/shm/NAME on a host).
    #[arg(long, conflicts_with = "device")]
    resource: Option<PathBuf>,
    /// sysfs PCI devices directory.
    #[arg(long, default_value = pci::SYSFS_DEVICES, hide = true)]
    sysfs: PathBuf,
}

#[derive(Args, Clone)]
struct Timing {
    /// Seconds without a heartbeat or progress after which the peer counts
    /// as gone (the default of intervm's `peer_timeout` for a channel with
    /// a Linux member).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Seconds to wait for the peer to show up (the default of intervm's
    /// `join_timeout` for a channel with a Linux member).
    #[arg(long, default_value_t = 600.0)]
    join_timeout: f64,
}

/// What a ring send takes (shared by `shmem send` and `doorbell send`).
#[derive(Args, Clone)]
struct SendArgs {
    /// This member's index in the channel.
    #[arg(long)]
    me: u32,
    /// The receiving member.
    #[arg(long)]
    to: u32,
    #[command(flatten)]
    what: PayloadArgs,
    /// Payload bytes per frame.
    #[arg(long, default_value = "64K")]
    chunk: String,
    /// Fill each frame where it lies in the ring: a file is read straight
    /// into it, the prepared pattern written there (no copy through a
    /// staging buffer; the checksum is taken in place at the commit).
    #[arg(long)]
    zero_copy: bool,
    #[command(flatten)]
    timing: Timing,
}

/// What a ring receive takes (shared by `shmem recv` and `doorbell recv`).
#[derive(Args, Clone)]
struct RecvArgs {
    /// This member's index in the channel.
    #[arg(long)]
    me: u32,
    /// The sending member.
    #[arg(long)]
    from: u32,
    /// Bytes to receive (default: until end of stream).
    #[arg(long)]
    size: Option<String>,
    /// Write the payload here.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Check every byte against the test pattern with this seed (a number,
    /// or CHANNEL:SENDER as for `send --seed`); the first difference fails.
    #[arg(long, value_parser = parse_seed)]
    verify_seed: Option<u64>,
    /// Serve this many complete transfers of --size bytes from a sender
    /// that may be killed and restarted meanwhile: an interrupted transfer
    /// is reported and not counted, and the receiver waits (up to
    /// --join-timeout) for the sender to come back. --file then holds the
    /// last complete transfer.
    #[arg(long, requires = "size")]
    transfers: Option<u64>,
    /// Read each frame where it lies in the ring (check it, write it to
    /// --file) and only then take it off the ring, if its checksum still
    /// holds: no copy through a buffer.
    #[arg(long)]
    zero_copy: bool,
    #[command(flatten)]
    timing: Timing,
}

/// Runs a ring receive (one transfer, or `--transfers N`) and its line.
fn receive(
    c: &shmem::Common,
    a: &RecvArgs,
    notify: &mut dyn shmem::Notifier,
) -> Result<String, Error> {
    let want = a.size.as_deref().map(size).transpose()?;
    match (a.transfers, want) {
        (Some(n), Some(bytes)) => {
            let s = shmem::serve(c, bytes, n, a.file.as_ref(), a.verify_seed, notify)?;
            Ok(format!(
                "received {} of {n} complete transfers, {} interrupted by the sender leaving \
                 ({} stale bytes dropped); last: {}",
                s.complete, s.interrupted, s.stale_bytes, s.last
            ))
        }
        _ => {
            let s = shmem::recv(c, want, a.file.as_ref(), a.verify_seed, notify)?;
            Ok(format!("received {s}"))
        }
    }
}

/// What a sender sends (shared by every `send` subcommand).
#[derive(Args, Clone)]
struct PayloadArgs {
    /// Bytes of test pattern to send (K, M, G suffixes).
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    size: Option<String>,
    /// Send this file, then an end-of-stream marker.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Pattern seed: a number, or CHANNEL:SENDER for the seed intervm uses
    /// for that sender on that channel.
    #[arg(long, default_value = "0", value_parser = parse_seed)]
    seed: u64,
}

impl PayloadArgs {
    fn payload(&self) -> Result<Payload, Error> {
        match (&self.file, &self.size) {
            (Some(f), _) => Ok(Payload::File(f.clone())),
            (None, Some(s)) => Ok(Payload::Pattern {
                seed: self.seed,
                size: size(s)?,
            }),
            (None, None) => Err(Error::Usage("give --size or --file".into())),
        }
    }
}

#[derive(Subcommand)]
enum ShmemCmd {
    /// Send the seeded test pattern (--size) or a file (--file).
    Send {
        #[command(flatten)]
        region: Region,
        #[command(flatten)]
        args: SendArgs,
    },
    /// Receive --size bytes, or until the sender's end-of-stream frame.
    Recv {
        #[command(flatten)]
        region: Region,
        #[command(flatten)]
        args: RecvArgs,
    },
    /// Check that this guest cannot write the region's header or another
    /// member's section, and can write its own (as an intervm VMM maps
    /// them); exits 1 otherwise. A write that lands is undone at once,
    /// but peers may see it: for tests, not for regions in real use.
    CheckProtection {
        #[command(flatten)]
        region: Region,
        /// This guest's member index.
        #[arg(long)]
        me: u32,
    },
    /// Write a fresh ring layout (for regions no intervm VMM manages).
    Format {
        #[command(flatten)]
        region: Region,
        /// Number of members.
        #[arg(long)]
        members: u32,
        /// Format even while members are alive.
        #[arg(long)]
        force: bool,
    },
}

fn size(s: &str) -> Result<u64, Error> {
    intervm_protocol::units::parse_size(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::Usage(format!(
                "{s:?} is not a size (bytes, or a number with K, M or G)"
            ))
        })
}

fn secs(what: &str, v: f64) -> Result<Duration, Error> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(Error::Usage(format!(
            "--{what} {v}: must be a positive number of seconds"
        )))
    }
}

fn source(r: Region) -> shmem::Source {
    shmem::Source {
        device: r.device,
        resource: r.resource,
        sysfs: r.sysfs,
        uio: None,
    }
}

/// What a ring send or receive command says about its member, peer and
/// frames.
struct Ends<'a> {
    me: u32,
    peer: u32,
    timing: &'a Timing,
    zero_copy: bool,
}

impl Ends<'_> {
    fn common(&self, source: shmem::Source) -> Result<shmem::Common, Error> {
        Ok(shmem::Common {
            source,
            me: self.me,
            peer: self.peer,
            timeout: secs("timeout", self.timing.timeout)?,
            join_timeout: secs("join-timeout", self.timing.join_timeout)?,
            zero_copy: self.zero_copy,
        })
    }
}

impl SendArgs {
    fn ends(&self) -> Ends<'_> {
        Ends {
            me: self.me,
            peer: self.to,
            timing: &self.timing,
            zero_copy: self.zero_copy,
        }
    }
}

impl RecvArgs {
    fn ends(&self) -> Ends<'_> {
        Ends {
            me: self.me,
            peer: self.from,
            timing: &self.timing,
            zero_copy: self.zero_copy,
        }
    }
}

fn mode(o: &PortioOpts) -> portio::Mode {
    portio::Mode {
        descriptor: o.descriptor,
        width: o.width,
        rep: o.rep,
    }
}

/// `--notify` of the doorbell commands: a mode that rings doorbells.
fn doorbell_notify(s: &str) -> Result<Notify, String> {
    match s.parse::<Notify>() {
        Ok(Notify::Never) => {
            Err("\"never\" rings no doorbells; to poll, use `shmem send` or `shmem recv`".into())
        }
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is {e}")),
    }
}

fn uio_dev(o: &UioOpts) -> Result<PathBuf, Error> {
    uio::pick(std::path::Path::new(uio::SYSFS_UIO), o.uio.as_deref())
}

fn uio_common(o: &UioOpts, ends: Ends<'_>) -> Result<(shmem::Common, uio::Uio), Error> {
    let dev = uio_dev(o)?;
    let mut u = uio::Uio::open(std::path::Path::new(uio::SYSFS_UIO), &dev)?;
    u.set_adaptive((o.notify == Notify::Adaptive).then(|| Duration::from_micros(o.spin_us.max(1))));
    let c = ends.common(shmem::Source {
        device: None,
        resource: None,
        sysfs: PathBuf::from(pci::SYSFS_DEVICES),
        uio: Some(dev),
    })?;
    Ok((c, u))
}

fn run(cmd: Cmd) -> Result<String, Error> {
    match cmd {
        #[cfg(target_arch = "x86_64")]
        Cmd::CheckSyscallEntry { entry } => {
            let r = intervm_guest::syscall_entry::check(entry)?;
            Ok(format!(
                "syscall entry ok: forged flags {:#x} became {:#x} at rip {:#x}; a kernel return address got SIGSEGV",
                intervm_guest::syscall_entry::PRIVILEGED_FLAGS
                    | intervm_guest::syscall_entry::USER_FLAGS_KEPT,
                r.flags,
                r.rip
            ))
        }
        Cmd::Costs { count } => {
            let c = intervm_guest::costs::measure(count.max(1))?;
            Ok(format!(
                "costs count={} syscall_us={:.3} page_fault_us={:.3}",
                count.max(1),
                c.syscall.as_secs_f64() * 1e6,
                c.page_fault.as_secs_f64() * 1e6
            ))
        }
        Cmd::Poweroff { status } => Err(intervm_guest::power::poweroff(status)),
        Cmd::Doorbell(DoorbellCmd::Send { uio, args: a }) => {
            let (c, mut u) = uio_common(&uio, a.ends())?;
            let s = shmem::send(&c, &a.what.payload()?, size(&a.chunk)?, &mut u)?;
            Ok(format!("sent {s}"))
        }
        Cmd::Doorbell(DoorbellCmd::Recv { uio, args: a }) => {
            let (c, mut u) = uio_common(&uio, a.ends())?;
            receive(&c, &a, &mut u)
        }
        Cmd::Doorbell(DoorbellCmd::Pingpong {
            uio: o,
            peer,
            rounds,
            initiator,
            timeout,
        }) => {
            let dev = uio_dev(&o)?;
            let mut u = uio::Uio::open(std::path::Path::new(uio::SYSFS_UIO), &dev)?;
            let t = uio::ping_pong(&mut u, peer, rounds, initiator, secs("timeout", timeout)?)?;
            let total: Duration = t.iter().sum();
            let min = t.iter().min().copied().unwrap_or_default();
            Ok(format!(
                "ping-pong with peer {peer}: rounds={} mean_us={:.1} min_us={:.1}",
                t.len(),
                total.as_secs_f64() * 1e6 / t.len().max(1) as f64,
                min.as_secs_f64() * 1e6
            ))
        }
        Cmd::Portio(PortioCmd::Send {
            opts,
            to,
            what,
            message,
            timing,
        }) => {
            let payload = what.payload()?;
            let mut hw = portio::Hardware::open(opts.port)?;
            let s = portio::send(
                &mut hw,
                opts.port,
                to,
                &payload,
                size(&message)? as usize,
                mode(&opts),
                secs("join-timeout", timing.join_timeout)?,
            )?;
            Ok(format!("sent {s}"))
        }
        Cmd::Portio(PortioCmd::Recv {
            opts,
            from,
            size: sz,
            file,
            timing,
        }) => {
            let want = sz.as_deref().map(size).transpose()?;
            let mut hw = portio::Hardware::open(opts.port)?;
            let s = portio::recv(
                &mut hw,
                opts.port,
                from,
                want,
                file.as_ref(),
                mode(&opts),
                secs("timeout", timing.timeout)?,
                secs("join-timeout", timing.join_timeout)?,
            )?;
            Ok(format!("received {s}"))
        }
        Cmd::Shmem(ShmemCmd::Send { region, args: a }) => {
            let c = a.ends().common(source(region))?;
            let s = shmem::send(&c, &a.what.payload()?, size(&a.chunk)?, &mut shmem::Polling)?;
            Ok(format!("sent {s}"))
        }
        Cmd::Shmem(ShmemCmd::Recv { region, args: a }) => {
            let c = a.ends().common(source(region))?;
            receive(&c, &a, &mut shmem::Polling)
        }
        Cmd::Shmem(ShmemCmd::CheckProtection { region, me }) => {
            let p = shmem::check_protection(&source(region), me)?;
            if p.landed > 0 || !p.own_writable {
                return Err(Error::Unprotected(p.to_string()));
            }
            Ok(format!("region protection ok: {p}"))
        }
        Cmd::Shmem(ShmemCmd::Format {
            region,
            members,
            force,
        }) => {
            let g = shmem::format(&source(region), members, force)?;
            Ok(format!(
                "formatted for {} members, {} bytes per ring",
                g.members, g.ring_bytes
            ))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(line) => {
            println!("intervm-guest: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("intervm-guest: {e}");
            ExitCode::FAILURE
        }
    }
}
