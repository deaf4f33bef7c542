//! The tool's doorbell-paced transfer logic (what `intervm-guest doorbell
//! send|recv` runs over the UIO driver) with eventfds standing in for the
//! doorbells: the receiver publishes its doorbell ID and sleeps until rung,
//! the sender rings after each frame (or, adaptive, only a side that said
//! it sleeps: the receiver on an empty ring, the sender on a full one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use intervm_guest::shmem::{self, Common, Notifier, Payload, Source};
use vmm_sys_util::eventfd::EventFd;

/// Far longer than anything here takes: reaching it means a hang.
const HANG: Duration = Duration::from_secs(60);

/// Waits until `n` is non-zero; panics naming `what` after [`HANG`].
fn wait_nonzero(n: &AtomicU64, what: &str) {
    let t0 = Instant::now();
    while n.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < HANG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Doorbells between the two sides of a transfer, with eventfds.
struct Bell {
    me: u16,
    fds: Arc<Vec<EventFd>>,
    rings: u64,
    /// Times this side waited (shared, so that a test can wait for it).
    sleeps: Arc<AtomicU64>,
    adaptive: Option<Duration>,
    /// Hold the first ring until this counter (the peer's sleeps) is
    /// non-zero: the peer then certainly sleeps once.
    first_ring_after: Option<Arc<AtomicU64>>,
    /// Each wait lasts until this side is rung (up to [`HANG`]) instead of
    /// the caller's timeout, so that a peer that makes room can be counted
    /// on to find this side still declared asleep.
    until_rung: bool,
}

impl Bell {
    fn new(me: u16, fds: &Arc<Vec<EventFd>>, adaptive: Option<Duration>) -> Self {
        Bell {
            me,
            fds: fds.clone(),
            rings: 0,
            sleeps: Arc::new(AtomicU64::new(0)),
            adaptive,
            first_ring_after: None,
            until_rung: false,
        }
    }
}

impl Notifier for Bell {
    fn my_id(&mut self) -> Option<u16> {
        Some(self.me + 10)
    }
    fn ring(&mut self, id: u16) {
        if self.rings == 0 {
            if let Some(n) = &self.first_ring_after {
                wait_nonzero(n, "the peer to sleep");
            }
        }
        self.rings += 1;
        self.fds[(id - 10) as usize].write(1).unwrap();
    }
    fn adaptive(&self) -> Option<Duration> {
        self.adaptive
    }
    fn wait(&mut self, timeout: Duration) {
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        let timeout = if self.until_rung { HANG } else { timeout };
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fds[self.me as usize]),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) } {
            1 => {
                let _ = self.fds[self.me as usize].read();
            }
            _ => assert!(!self.until_rung, "side {} was never rung", self.me),
        }
    }
}

#[test]
fn a_doorbell_paced_transfer_arrives_whole() {
    // The sender holds its first doorbell until the receiver slept, so the
    // receiver sleeps on the doorbell whatever the scheduling.
    let t = transfer("always", None, Setup::ReceiverSleepsFirst);
    assert_eq!(t.tx_rings, t.frames, "one ring per frame");
    assert!(t.rx_sleeps > 0, "the receiver slept on the doorbell");
}

#[test]
fn adaptive_rings_only_a_sleeping_receiver() {
    // A receiver that never declares a sleep (its polling budget outlasts
    // the test) is never rung, though the sender rings a sleeping peer.
    let t = transfer(
        "adaptive",
        Some(Duration::from_micros(50)),
        Setup::ReceiverNeverSleeps,
    );
    assert_eq!(t.rx_sleeps, 0);
    assert_eq!(
        t.tx_rings, 0,
        "{} rings for {} frames to a receiver that never slept",
        t.tx_rings, t.frames
    );
}

#[test]
fn adaptive_receiver_wakes_a_sender_asleep_on_a_full_ring() {
    // The receiver writes into a pipe nobody reads until the sender slept
    // on the full ring; the sender then sleeps until the receiver, having
    // made room, rings it.
    let t = transfer("full", Some(Duration::from_micros(50)), Setup::SlowReader);
    assert!(t.tx_sleeps > 0, "the sender never slept on a full ring");
    assert!(t.rx_rings > 0, "the receiver never woke the sender");
}

/// How a transfer is arranged so that what a test expects of it is certain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The sender's first ring waits until the receiver slept.
    ReceiverSleepsFirst,
    /// The receiver polls for longer than the test lasts.
    ReceiverNeverSleeps,
    /// The receiver's output is read only once the sender slept, and the
    /// sender's sleeps last until it is rung.
    SlowReader,
}

/// What a transfer did on each side.
struct Counts {
    frames: u64,
    tx_rings: u64,
    tx_sleeps: u64,
    rx_rings: u64,
    rx_sleeps: u64,
}

fn transfer(tag: &str, adaptive: Option<Duration>, setup: Setup) -> Counts {
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
        // Only a hang reaches these.
        timeout: HANG,
        join_timeout: HANG,
        zero_copy: false,
    };
    let mut rb = Bell::new(1, &fds, adaptive);
    let mut tb = Bell::new(0, &fds, adaptive);
    match setup {
        Setup::ReceiverSleepsFirst => tb.first_ring_after = Some(rb.sleeps.clone()),
        Setup::ReceiverNeverSleeps => rb.adaptive = Some(HANG),
        Setup::SlowReader => tb.until_rung = true,
    }
    let (rx_sleeps, tx_sleeps) = (rb.sleeps.clone(), tb.sleeps.clone());
    let rc = common(1, 0);
    let sink = (setup == Setup::SlowReader).then(|| {
        let fifo = path.with_extension("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader_path = fifo.clone();
        let sender_slept = tx_sleeps.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            // Opening lets the receiver open its end; reading starts only
            // once the sender slept, so until then the receiver blocks and
            // the ring fills.
            let mut f = std::fs::File::open(reader_path).unwrap();
            wait_nonzero(&sender_slept, "the sender to sleep on a full ring");
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            loop {
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
        let s = shmem::recv(&rc, Some(8 << 20), out.as_ref(), Some(3), &mut rb).unwrap();
        (s, rb.rings)
    });
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
    let (got, rx_rings) = rx.join().unwrap();
    assert_eq!((got.bytes, got.stream), (sent.bytes, sent.stream));
    if let Some((fifo, reader)) = sink {
        assert_eq!(reader.join().unwrap(), 8 << 20);
        std::fs::remove_file(fifo).unwrap();
    }
    std::fs::remove_file(path).unwrap();
    Counts {
        frames: sent.frames,
        tx_rings: tb.rings,
        tx_sleeps: tx_sleeps.load(Ordering::SeqCst),
        rx_rings,
        rx_sleeps: rx_sleeps.load(Ordering::SeqCst),
    }
}
