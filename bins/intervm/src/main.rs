//! `intervm`: boot KVM VMs from a TOML file and wire channels between them.
//!
//! ```text
//! intervm run FILE.toml [--vm NAME] [--timeout SECS]
//! intervm check FILE.toml
//! intervm ivshmem-server --socket PATH (--shm NAME [--size 4M] | --file PATH) [--vectors 1]
//! ```
//!
//! `run` forwards its standard input to the COM1 of the VM with
//! `serial = "console"` (at most one per file), if it boots that VM.

mod config;
mod lost;
mod serve;
mod tasks;
mod waiting;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "intervm",
    version,
    about = "Launch KVM VMs and inter-VM channels from a TOML file"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot every `[[vm]]` of FILE (or only --vm NAME) and wait until all
    /// stop. Standard input goes to the VM with serial = "console", if any.
    Run {
        /// Configuration file.
        file: PathBuf,
        /// Boot only this VM (run the others in other processes).
        #[arg(long)]
        vm: Option<String>,
        /// Stop VMs still running after this many seconds.
        #[arg(long, allow_negative_numbers = true)]
        timeout: Option<f64>,
    },
    /// Serve shared memory and doorbells to ivshmem clients (QEMU's
    /// `ivshmem-doorbell` devices or intervm `doorbell` channels with
    /// `backing = { server = PATH }`) until SIGINT/SIGTERM.
    IvshmemServer {
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// POSIX shared-memory object name (/dev/shm/NAME), created if
        /// missing.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        shm: Option<String>,
        /// An existing file to share instead (on tmpfs, disk or hugetlbfs).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Region size (a power of two; K, M, G suffixes).
        #[arg(long, default_value = "4M")]
        size: String,
        /// Interrupt vectors per peer.
        #[arg(long, default_value_t = 1)]
        vectors: usize,
        /// Started by a member process as the rendezvous of a doorbell
        /// channel: serve only if no other server holds the socket's lock,
        /// and exit when the last peer leaves.
        #[arg(long, hide = true)]
        on_demand: bool,
    },
    /// Validate FILE without booting anything.
    Check {
        /// Configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server's log is its report: a line per peer that joins or leaves.
    let level = match cli.cmd {
        Cmd::IvshmemServer { .. } => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match cli.cmd {
        Cmd::IvshmemServer {
            socket,
            shm,
            file,
            size,
            vectors,
            on_demand,
        } => {
            let size = match config::parse_size_str(&size) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("intervm: --size: {e}");
                    return ExitCode::from(2);
                }
            };
            let src = match (shm, file) {
                (Some(name), _) => serve::Source::Shm(name, size),
                (None, Some(p)) => serve::Source::File(p),
                (None, None) => {
                    eprintln!("intervm: ivshmem-server: give --shm NAME or --file PATH");
                    return ExitCode::from(2);
                }
            };
            match serve::serve(&socket, &src, vectors, on_demand) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("intervm: ivshmem-server: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Check { file } => {
            // `intervm check FILE | head` ends quietly, as a filter should,
            // instead of panicking on a closed pipe. Only here: `run` and
            // the server write to sockets and must see EPIPE, not die.
            // SAFETY: restores the default action of one signal before any
            // thread that could rely on it exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            check(&file)
        }
        Cmd::Run { file, vm, timeout } => {
            let cfg = match config::Config::load(&file) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("intervm: {e}");
                    return ExitCode::from(2);
                }
            };
            let timeout = match timeout {
                Some(t) if !(t.is_finite() && t > 0.0) => {
                    eprintln!("intervm: --timeout {t}: must be a positive number of seconds");
                    return ExitCode::from(2);
                }
                t => t.map(Duration::from_secs_f64),
            };
            match wire::run(&cfg, vm.as_deref(), timeout) {
                Ok(outcomes) => {
                    let mut status = 0;
                    for o in &outcomes {
                        eprintln!(
                            "intervm: {} stopped after {:.3} s: {:?}",
                            o.name,
                            o.elapsed.as_secs_f64(),
                            o.exit
                        );
                        if status == 0 {
                            status = o.exit.status();
                        }
                        if let Some(r) = &o.report {
                            for l in &r.lines {
                                println!("intervm: {l}");
                            }
                            if !r.ok && status == 0 {
                                status = 3;
                            }
                        }
                    }
                    ExitCode::from(status.clamp(0, 255) as u8)
                }
                Err(e) => {
                    eprintln!("intervm: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// `intervm check FILE`: validates and describes the file.
fn check(file: &std::path::Path) -> ExitCode {
    match config::Config::load(file) {
        Ok(c) => {
            let count = |n: usize, what: &str| match n {
                1 => format!("1 {what}"),
                n => format!("{n} {what}s"),
            };
            println!(
                "{}: ok ({}, {})",
                file.display(),
                count(c.vms.len(), "VM"),
                count(c.channels.len(), "channel")
            );
            for ch in &c.channels {
                println!(
                    "  channel {}: {} between {}",
                    ch.name,
                    ch.kind.as_str(),
                    ch.members.join(", ")
                );
                if ch.kind.doorbell().is_some() {
                    if let Some((rv, _)) = wire::rendezvous_of(ch) {
                        println!(
                            "    run with --vm, its members (and QEMU VMs) meet at {}",
                            rv.socket.display()
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("intervm: {e}");
            ExitCode::from(2)
        }
    }
}
