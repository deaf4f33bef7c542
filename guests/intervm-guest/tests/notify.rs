//! The tool's doorbell-paced transfer logic (what `intervm-guest doorbell
//! send|recv` runs over the UIO driver) with eventfds standing in for the
//! doorbells: the receiver publishes its doorbell ID and sleeps until rung,
//! the sender rings after each frame.

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
    let (rings, frames, sleeps) = transfer("always", None);
    assert_eq!(rings, frames, "one ring per frame");
    assert!(sleeps > 0, "the receiver slept on the doorbell");
}

#[test]
fn adaptive_rings_only_a_sleeping_receiver() {
    let (rings, frames, _) = transfer("adaptive", Some(Duration::from_micros(50)));
    assert!(rings < frames, "{rings} rings for {frames} frames");
}

fn transfer(tag: &str, adaptive: Option<Duration>) -> (u64, u64, u64) {
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
    let rx = std::thread::spawn(move || {
        let mut b = Bell {
            me: 1,
            fds: f2,
            rings: 0,
            sleeps: 0,
            adaptive,
        };
        let s = shmem::recv(&rc, Some(8 << 20), None, None, &mut b).unwrap();
        (s, b.sleeps)
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
    let (got, sleeps) = rx.join().unwrap();
    assert_eq!((got.bytes, got.stream), (sent.bytes, sent.stream));
    std::fs::remove_file(path).unwrap();
    (tb.rings, sent.frames, sleeps)
}
