//! The tool's doorbell-paced transfer logic (what `intervm-guest doorbell
//! send|recv` runs over the UIO driver) with eventfds standing in for the
//! doorbells: the receiver publishes its doorbell ID and sleeps until rung,
//! the sender rings after each frame (or, adaptive, only a side that said
//! it sleeps: the receiver on an empty ring, the sender on a full one).

use std::sync::Arc;
use std::time::Duration;

use intervm_guest::shmem::{self, Common, Notify, Payload, Source};
use vmm_sys_util::eventfd::EventFd;

struct Bell {
    me: u16,
    fds: Arc<Vec<EventFd>>,
    rings: u64,
    sleeps: u64,
    adaptive: Option<Duration>,
}

impl Notify for Bell {
    fn my_id(&mut self) -> Option<u16> {
        Some(self.me + 10)
    }
    fn ring(&mut self, id: u16) {
        self.rings += 1;
        self.fds[(id - 10) as usize].write(1).unwrap();
    }
    fn adaptive(&self) -> Option<Duration> {
        self.adaptive
    }
    fn wait(&mut self, timeout: Duration) {
        self.sleeps += 1;
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fds[self.me as usize]),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) } == 1 {
            let _ = self.fds[self.me as usize].read();
        }
    }
}

#[test]
fn a_doorbell_paced_transfer_arrives_whole() {
    let t = transfer("always", None, false);
    assert_eq!(t.tx_rings, t.frames, "one ring per frame");
    assert!(t.rx_sleeps > 0, "the receiver slept on the doorbell");
}

#[test]
fn adaptive_rings_only_a_sleeping_receiver() {
    let t = transfer("adaptive", Some(Duration::from_micros(50)), false);
    assert!(
        t.tx_rings < t.frames,
        "{} rings for {} frames",
        t.tx_rings,
        t.frames
    );
}

#[test]
fn adaptive_receiver_wakes_a_sender_asleep_on_a_full_ring() {
    // The receiver writes into a pipe drained slowly, so the ring fills
    // and the sender has to sleep until the receiver rings it.
    let t = transfer("full", Some(Duration::from_micros(50)), true);
    assert!(t.tx_sleeps > 0, "the sender never slept on a full ring");
    assert!(t.rx_rings > 0, "the receiver never woke the sender");
}

/// What a transfer did on each side.
struct Counts {
    frames: u64,
    tx_rings: u64,
    tx_sleeps: u64,
    rx_rings: u64,
    rx_sleeps: u64,
}

fn transfer(tag: &str, adaptive: Option<Duration>, slow_reader: bool) -> Counts {
    let path =
        std::env::temp_dir().join(format!("intervm-guest-bell-{tag}-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_intervm-guest"))
        .args([
            "shmem",
            "format",
            "--resource",
            path.to_str().unwrap(),
            "--members",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let fds = Arc::new(vec![
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ]);
    let common = |me, peer| Common {
        source: Source {
            device: None,
            resource: Some(path.clone()),
            sysfs: "/nonexistent".into(),
            uio: None,
        },
        me,
        peer,
        timeout: Duration::from_secs(5),
        join_timeout: Duration::from_secs(10),
    };
    let (rc, f2) = (common(1, 0), fds.clone());
    let sink = slow_reader.then(|| {
        let fifo = path.with_extension("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(reader_path).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
                std::thread::sleep(Duration::from_millis(2));
                match f.read(&mut buf).unwrap() {
                    0 => break total,
                    n => total += n as u64,
                }
            }
        });
        (fifo, reader)
    });
    let out = sink.as_ref().map(|(p, _)| p.clone());
    let rx = std::thread::spawn(move || {
        let mut b = Bell {
            me: 1,
            fds: f2,
            rings: 0,
            sleeps: 0,
            adaptive,
        };
        let s = shmem::recv(&rc, Some(8 << 20), out.as_ref(), Some(3), &mut b).unwrap();
        (s, b.rings, b.sleeps)
    });
    let mut tb = Bell {
        me: 0,
        fds,
        rings: 0,
        sleeps: 0,
        adaptive,
    };
    let sent = shmem::send(
        &common(0, 1),
        &Payload::Pattern {
            seed: 3,
            size: 8 << 20,
        },
        64 << 10,
        &mut tb,
    )
    .unwrap();
    let (got, rx_rings, rx_sleeps) = rx.join().unwrap();
    assert_eq!((got.bytes, got.stream), (sent.bytes, sent.stream));
    if let Some((fifo, reader)) = sink {
        assert_eq!(reader.join().unwrap(), 8 << 20);
        std::fs::remove_file(fifo).unwrap();
    }
    std::fs::remove_file(path).unwrap();
    Counts {
        frames: sent.frames,
        tx_rings: tb.rings,
        tx_sleeps: tb.sleeps,
        rx_rings,
        rx_sleeps,
    }
}
