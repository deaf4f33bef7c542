//! The ivshmem client against a hostile server: any sequence of messages
//! (any value, with no descriptor, a memfd, an eventfd, a pipe or a
//! read-only file attached), cut off anywhere. The join must end with a
//! session or an error, quickly, without a panic or a leaked wait; a
//! session, once made, is followed and dropped.

#![no_main]

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use interrupt_doorbell::{client, proto};
use libfuzzer_sys::fuzz_target;
use vmm_core::memory::memfd;

fn socket() -> &'static (PathBuf, UnixListener) {
    static S: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    S.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("intervm-fuzz-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).expect("binding the fuzz socket");
        (p, l)
    })
}

fn send(s: &UnixStream, v: i64, kind: u8) {
    let none: Option<&std::fs::File> = None;
    let _ = match kind % 5 {
        0 => proto::send(s, v, none),
        1 => {
            let f = memfd("fuzz", 0).expect("memfd");
            let _ = f.set_len(64 << 10);
            proto::send(s, v, Some(&f))
        }
        2 => {
            let e = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            proto::send(s, v, Some(&e))
        }
        3 => {
            let (r, _w) = std::io::pipe().expect("pipe");
            proto::send(s, v, Some(&r))
        }
        _ => {
            let f = std::fs::File::open("/proc/self/exe").expect("open");
            proto::send(s, v, Some(&f))
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let (path, listener) = socket();
    let script = data.to_vec();
    let server = std::thread::spawn(move || {
        let Ok((s, _)) = listener.accept() else {
            return;
        };
        // Messages of 9 bytes: a kind byte and the value; a trailing part
        // shorter than 9 bytes goes out raw (a message cut short).
        let mut chunks = script.chunks(9);
        for c in chunks.by_ref() {
            if c.len() < 9 {
                let _ = std::io::Write::write_all(&mut &s, &c[1..]);
                break;
            }
            let v = i64::from_le_bytes(c[1..9].try_into().unwrap());
            // Small values are the interesting ones (IDs, -1, the version).
            let v = if c[0] & 0x80 != 0 { v } else { (v % 70) - 2 };
            send(&s, v, c[0]);
        }
        // Hangs up: the client must not wait past its bound.
    });
    let vectors = 1 + data.first().copied().unwrap_or(0) as usize % 3;
    if let Ok(session) = client::connect_within(path, vectors, Duration::from_millis(200)) {
        drop(session);
    }
    let _ = server.join();
});
