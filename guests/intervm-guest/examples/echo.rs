//! A guest program on `intervm_guest::channel`: member 1 of the channel
//! of this guest's ivshmem device answers every message from member 0 with
//! the same bytes, until an empty message.
//!
//! ```sh
//! # static, as scripts/build-guest-tools builds the tool:
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
//!     --example echo -p intervm-guest --target x86_64-unknown-linux-gnu
//! # then, in the guest (target/x86_64-unknown-linux-gnu/release/examples/echo):
//! echo [PCI-ADDRESS]      # member 0 talks to it
//! ```
//!
//! On the host, `--resource /dev/shm/NAME` style access works as well:
//! `echo --file /dev/shm/NAME` maps that file instead of a PCI BAR.

use std::path::PathBuf;
use std::time::Duration;

use intervm_guest::channel::Channel;
use intervm_guest::shmem::Source;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = match args.as_slice() {
        [flag, path] if flag == "--file" => Source {
            device: None,
            resource: Some(PathBuf::from(path)),
            sysfs: PathBuf::from("/sys/bus/pci/devices"),
            uio: None,
        },
        [dev] => Source {
            device: Some(dev.clone()),
            resource: None,
            sysfs: PathBuf::from("/sys/bus/pci/devices"),
            uio: None,
        },
        _ => Source {
            device: None,
            resource: None,
            sysfs: PathBuf::from("/sys/bus/pci/devices"),
            uio: None,
        },
    };
    let ch = Channel::open(&source, 1, Duration::from_secs(30))?;
    let mut from = ch.receiver(0)?;
    let mut to = ch.sender(0)?;
    let mut buf = vec![0u8; ch.max_message()];
    let mut echoed = 0u64;
    loop {
        let n = from.recv(&mut buf, Duration::from_secs(60))?;
        to.send(&buf[..n], Duration::from_secs(60))?;
        if n == 0 {
            break;
        }
        echoed += 1;
    }
    println!("echoed {echoed} messages");
    Ok(())
}
