//! QEMU's ivshmem-server protocol without any VM: an intervm server hands
//! out one shared region and an eventfd per peer and vector; two clients
//! (what a VMM does for each ivshmem-doorbell device) connect, see the same
//! memory, and one rings the other. In a VMM the ringing side's eventfd is
//! an `ioeventfd` on the Doorbell register and the rung side's is an
//! `irqfd`, so KVM delivers the interrupt without either VMM.
//!
//! ```text
//! cargo run -p interrupt-doorbell --example server_and_clients
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use interrupt_doorbell::{client, server::Server};
use shared_region::SharedRegion;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("intervm-doorbell-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("ivshmem.sock");
    let shm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("region"))?;
    shm.set_len(1 << 20)?;

    let server = Server::bind(&socket, shm, 1)?;
    let stop = Arc::new(AtomicBool::new(false));
    let serving = {
        let stop = stop.clone();
        std::thread::spawn(move || server.run(stop))
    };

    let a = client::connect(&socket, 1)?;
    let b = client::connect(&socket, 1)?;
    println!("server gave IDs {} and {}", a.id, b.id);

    // Both see the same memory (BAR2 of their devices).
    let ra = SharedRegion::from_file(a.shm.try_clone()?, "a")?;
    let rb = SharedRegion::from_file(b.shm.try_clone()?, "b")?;
    let text = b"written by a";
    // SAFETY: both regions map at least 1 MiB; nothing else uses them.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), ra.host_addr(), text.len());
        let seen = std::slice::from_raw_parts(rb.host_addr(), text.len());
        println!("b reads {:?}", String::from_utf8_lossy(seen));
    }

    // b rings a on vector 0: it writes a's eventfd, which b got at connect.
    let a_vectors = b.peers.get(&a.id).ok_or("b was not told about a")?;
    a_vectors[0].write(1)?;
    println!("a's vector 0 fired {} time(s)", a.own[0].read()?);

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop((a, b));
    serving.join().map_err(|_| "server thread panicked")??;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
