//! The TOML configuration: parsing and validation only.
//!
//! Every error names the file, the key (`vm[NAME].key` or
//! `channel[NAME].key`) and the problem.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSerial {
    Named(String),
    File { file: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    name: String,
    kind: String,
    members: Vec<String>,
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
}

/// Channel kinds intervm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Port-I/O channel.
    Portio,
    /// Shared memory, polled.
    Shmem,
    /// Shared memory with doorbell interrupts.
    Doorbell,
}

impl ChannelKind {
    /// The TOML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Portio => "portio",
            ChannelKind::Shmem => "shmem",
            ChannelKind::Doorbell => "doorbell",
        }
    }
}

/// A validated `[[channel]]`.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// Unique name.
    pub name: String,
    /// Kind.
    pub kind: ChannelKind,
    /// Member VM names (at least two, distinct, all defined).
    pub members: Vec<String>,
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

fn parse_size(s: &RawSize) -> Result<u64, String> {
    match s {
        RawSize::Bytes(b) => Ok(*b),
        RawSize::Text(t) => {
            let t = t.trim();
            let (num, mult) = match t.char_indices().last() {
                Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
                Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
                Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
                _ => (t, 1),
            };
            num.trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| {
                    format!("{t:?} is not a size (use bytes or a number with K, M or G)")
                })
        }
    }
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
            let key = |k: &str| {
                format!(
                    "vm[{}].{k}",
                    if v.name.is_empty() {
                        i.to_string()
                    } else {
                        v.name.clone()
                    }
                )
            };
            if v.name.is_empty()
                || !v
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(format!(
                    "{}: {:?} must be non-empty letters, digits, '-' or '_'",
                    key("name"),
                    v.name
                )));
            }
            if !names.insert(v.name.clone()) {
                return Err(err(format!(
                    "{}: duplicate VM name {:?}",
                    key("name"),
                    v.name
                )));
            }
            let memory = match &v.memory {
                Some(m) => parse_size(m).map_err(|e| err(format!("{}: {e}", key("memory"))))?,
                None => DEFAULT_MEMORY,
            };
            if memory == 0 || memory % 4096 != 0 {
                return Err(err(format!(
                    "{}: {memory} is not a non-zero multiple of 4 KiB",
                    key("memory")
                )));
            }
            if memory > vmm_core::layout::MAX_RAM {
                return Err(err(format!(
                    "{}: {memory} exceeds the maximum {}",
                    key("memory"),
                    vmm_core::layout::MAX_RAM
                )));
            }
            let vcpus = v.vcpus.unwrap_or(1);
            if !(1..=255).contains(&vcpus) {
                return Err(err(format!(
                    "{}: {vcpus} is not between 1 and 255",
                    key("vcpus")
                )));
            }
            let kernel = match v.kernel.as_deref() {
                None | Some("probe") => {
                    for (k, set) in [
                        ("cmdline", v.cmdline.is_some()),
                        ("initrd", v.initrd.is_some()),
                    ] {
                        if set {
                            return Err(err(format!(
                                "{}: only meaningful with a Linux kernel, not the probe",
                                key(k)
                            )));
                        }
                    }
                    if memory < 4 << 20 {
                        return Err(err(format!(
                            "{}: the probe guest needs at least 4M",
                            key("memory")
                        )));
                    }
                    Kernel::Probe
                }
                Some(p) => {
                    let path = resolve(p);
                    if !path.is_file() {
                        return Err(err(format!(
                            "{}: kernel file {} does not exist",
                            key("kernel"),
                            path.display()
                        )));
                    }
                    let initrd = match &v.initrd {
                        Some(i) => {
                            let ip = resolve(i);
                            if !ip.is_file() {
                                return Err(err(format!(
                                    "{}: initrd file {} does not exist",
                                    key("initrd"),
                                    ip.display()
                                )));
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
                Some(RawSerial::Named(s)) if s == "stdout" => Serial::Stdout,
                Some(RawSerial::Named(s)) if s == "none" => Serial::None,
                Some(RawSerial::Named(s)) => {
                    return Err(err(format!(
                        "{}: {s:?} is not \"stdout\", \"none\" or {{ file = \"path\" }}",
                        key("serial")
                    )))
                }
                Some(RawSerial::File { file }) => Serial::File(resolve(file)),
            };
            vms.push(VmSpec {
                name: v.name.clone(),
                memory,
                vcpus: vcpus as u8,
                kernel,
                serial,
            });
        }

        let mut chan_names = HashSet::new();
        let mut channels = Vec::new();
        for (i, c) in raw.channel.iter().enumerate() {
            let key = |k: &str| {
                format!(
                    "channel[{}].{k}",
                    if c.name.is_empty() {
                        i.to_string()
                    } else {
                        c.name.clone()
                    }
                )
            };
            if c.name.is_empty() {
                return Err(err(format!("{}: must not be empty", key("name"))));
            }
            if !chan_names.insert(c.name.clone()) {
                return Err(err(format!(
                    "{}: duplicate channel name {:?}",
                    key("name"),
                    c.name
                )));
            }
            let kind = match c.kind.as_str() {
                "portio" => ChannelKind::Portio,
                "shmem" => ChannelKind::Shmem,
                "doorbell" => ChannelKind::Doorbell,
                other => {
                    return Err(err(format!(
                        "{}: unknown channel kind {other:?} (expected \"portio\", \"shmem\" or \"doorbell\")",
                        key("kind")
                    )))
                }
            };
            if c.members.len() < 2 {
                return Err(err(format!(
                    "{}: a channel needs at least two members",
                    key("members")
                )));
            }
            let mut seen = HashSet::new();
            for m in &c.members {
                if !names.contains(m) {
                    return Err(err(format!("{}: no [[vm]] is named {m:?}", key("members"))));
                }
                if !seen.insert(m) {
                    return Err(err(format!("{}: {m:?} is listed twice", key("members"))));
                }
            }
            channels.push(ChannelSpec {
                name: c.name.clone(),
                kind,
                members: c.members.clone(),
            });
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
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"a\"\n", "vm[a].name", "duplicate VM name"),
            ("[[vm]]\nname = \"a\"\nmemory = 10000\n", "vm[a].memory", "not a non-zero multiple of 4 KiB"),
            ("[[vm]]\nname = \"a\"\nmemory = \"12Q\"\n", "vm[a].memory", "is not a size"),
            ("[[vm]]\nname = \"a\"\nkernel = \"/nonexistent/bzImage\"\n", "vm[a].kernel", "does not exist"),
            ("[[vm]]\nname = \"a\"\nvcpus = 0\n", "vm[a].vcpus", "between 1 and 255"),
            ("[[vm]]\nname = \"a\"\nserial = \"tty\"\n", "vm[a].serial", "is not \"stdout\""),
            ("[[vm]]\nname = \"a\"\ncmdline = \"x\"\n", "vm[a].cmdline", "not the probe"),
            ("[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"carrier-pigeon\"\nmembers = [\"a\", \"b\"]\n", "channel[c].kind", "unknown channel kind"),
            ("[[vm]]\nname = \"a\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"z\"]\n", "channel[c].members", "no [[vm]] is named \"z\""),
            ("[[vm]]\nname = \"a\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\"]\n", "channel[c].members", "at least two"),
            ("", "t.toml", "no [[vm]] defined"),
        ];
        for (text, key, problem) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.starts_with("t.toml: "), "{e}");
            assert!(
                e.contains(key) && e.contains(problem),
                "expected {key:?} and {problem:?} in: {e}"
            );
        }
    }
}
