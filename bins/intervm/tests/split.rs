//! Doorbell channels whose members run in separate `intervm` processes
//! (`intervm run FILE --vm NAME`): they meet at a socket named after the
//! backing, served by a server the first member starts on demand
//! (`interrupt_doorbell::rendezvous`); and the errors when they cannot.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};

use common::{intervm_cmd, spawn_vm_with, temp_config, text, watch_shm};
use intervm_protocol::ring::{self, MemberState};
use intervm_testkit::{kvm_available, wait_until};

/// A private rendezvous directory (`INTERVM_RUNTIME_DIR`) and a unique shm
/// name for one test; both removed on drop.
struct Place {
    dir: PathBuf,
    shm: String,
}

impl Place {
    fn new(tag: &str) -> Self {
        let id = format!("intervm-split-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&id).join("run");
        let _ = std::fs::remove_dir_all(&dir);
        Self { dir, shm: id }
    }

    /// Starts `--vm vm` of `cfg` with this place's rendezvous directory.
    fn spawn(&self, cfg: &Path, vm: &str) -> Child {
        spawn_vm_with(
            cfg.to_str().unwrap(),
            vm,
            &[("INTERVM_RUNTIME_DIR", &self.dir)],
        )
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(format!("shm-{}.sock", self.shm))
    }

    /// Waits until the on-demand server has left (it exits once its last
    /// member has gone, removing its socket).
    fn wait_server_gone(&self) {
        let sock = self.socket();
        wait_until("the on-demand server to exit", || !sock.exists());
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/dev/shm/{}", self.shm));
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn vm(name: &str, tasks: &[String]) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory = \"64M\"\nprobe = [\n{}\n]\n",
        tasks.join(",\n")
    )
}

fn channel(members: &[&str], shm: &str) -> String {
    channel_of("doorbell", members, shm)
}

fn channel_of(kind: &str, members: &[&str], shm: &str) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[[channel]]\nname = \"c\"\nkind = \"{kind}\"\nmembers = [{}]\nsize = \"4M\"\n\
         backing = {{ shm = \"{shm}\" }}\n",
        list.join(", ")
    )
}

fn send(to: &str, size: &str) -> String {
    format!("{{ task = \"send\", channel = \"c\", to = \"{to}\", size = \"{size}\" }}")
}

fn recv(from: &str, size: &str) -> String {
    format!("{{ task = \"recv\", channel = \"c\", from = [\"{from}\"], size = \"{size}\" }}")
}

fn finished(c: Child) -> (Output, String) {
    let o = c.wait_with_output().unwrap();
    let (out, err) = text(&o);
    let all = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(o.status.success(), "{all}");
    (o, all)
}

/// Waits for both, then asserts that both succeeded, showing both outputs.
fn both_finished(a: Child, b: Child) -> (String, String) {
    let oa = a.wait_with_output().unwrap();
    let ob = b.wait_with_output().unwrap();
    let show = |o: &Output| {
        let (out, err) = text(o);
        format!("stdout:\n{out}\nstderr:\n{err}")
    };
    let (sa, sb) = (show(&oa), show(&ob));
    assert!(
        oa.status.success() && ob.status.success(),
        "a:\n{sa}\nb:\n{sb}"
    );
    (sa, sb)
}

#[test]
fn two_processes_transfer_both_ways_and_ping_pong() {
    if !kvm_available() {
        return;
    }
    let p = Place::new("two");
    let body = format!(
        "{}{}{}",
        vm(
            "a",
            &[
                // Ping-pong first: it counts interrupts exactly, and a
                // transfer's last doorbell could land in its count.
                "{ task = \"ping\", channel = \"c\", to = \"b\", rounds = 1000 }".into(),
                send("b", "256M"),
                recv("b", "64M"),
            ]
        ),
        vm(
            "b",
            &[
                "{ task = \"pong\", channel = \"c\", to = \"a\", rounds = 1000 }".into(),
                recv("a", "256M"),
                send("a", "64M"),
            ]
        ),
        channel(&["a", "b"], &p.shm)
    );
    let cfg = temp_config("split-two.toml", &body);
    // The command lines: `--vm b`, then `--vm a`, no server by hand.
    // b joins the region only after the server gave it its ID; waiting for
    // that makes b ID 0 and a ID 1, the reverse of their member indices,
    // so a side that rang a member index instead of the peer's published
    // ID would ring itself (as the probe's ping-pong once did).
    let (_map, region) = watch_shm(&p.shm, 4 << 20);
    let b = p.spawn(&cfg, "b");
    wait_until("b to join", || {
        region
            .geometry()
            .is_ok_and(|g| region.member_state(&g, 1) == Ok(MemberState::Alive))
    });
    let a = p.spawn(&cfg, "a");
    let (a, b) = both_finished(a, b);
    for want in [
        "b: received 256 MiB of 256 MiB from a over c",
        "a: received 64 MiB of 64 MiB from b over c",
        "a: 1000 of 1000 round trips with b over c, 1000 interrupts",
    ] {
        assert!(a.contains(want) || b.contains(want), "{want:?}:\n{a}\n{b}");
    }
    assert_eq!(
        a.matches("checksum ok").count() + b.matches("checksum ok").count(),
        2
    );
    // Adaptive notification: doorbells were rung, and only a few.
    assert!(
        a.contains("doorbells rung") && b.contains("doorbells rung"),
        "{a}\n{b}"
    );
    p.wait_server_gone();
}

#[test]
fn three_processes_in_a_ring() {
    if !kvm_available() {
        return;
    }
    let p = Place::new("three");
    let body = format!(
        "{}{}{}{}",
        vm("a", &[send("b", "64M"), recv("c", "64M")]),
        vm("b", &[recv("a", "64M"), send("c", "64M")]),
        vm("c", &[send("a", "64M"), recv("b", "64M")]),
        channel(&["a", "b", "c"], &p.shm)
    );
    let cfg = temp_config("split-three.toml", &body);
    let kids: Vec<Child> = ["c", "a", "b"].iter().map(|v| p.spawn(&cfg, v)).collect();
    let mut all = String::new();
    for k in kids {
        all += &finished(k).1;
    }
    for want in [
        "b: received 64 MiB of 64 MiB from a over c",
        "c: received 64 MiB of 64 MiB from b over c",
        "a: received 64 MiB of 64 MiB from c over c",
    ] {
        assert!(all.contains(want), "{want:?}:\n{all}");
    }
    assert_eq!(all.matches("checksum ok").count(), 3, "{all}");
    p.wait_server_gone();
}

#[test]
fn an_on_demand_server_that_dies_is_started_again_and_rejoined() {
    if !kvm_available() {
        return;
    }
    let p = Place::new("server-dies");
    let body = format!(
        "{}{}{}",
        vm("a", &[send("b", "64M")]),
        vm("b", &[recv("a", "64M")]),
        channel(&["a", "b"], &p.shm)
    );
    let cfg = temp_config("split-server-dies.toml", &body);
    let log = p.dir.join(format!("shm-{}.log", p.shm));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // The servers that started, by pid, from their first log line.
    let servers = || -> Vec<i32> {
        read_log()
            .lines()
            .filter_map(|l| l.split("ivshmem server (pid ").nth(1))
            .filter_map(|r| r.split(')').next()?.parse().ok())
            .collect()
    };
    let (_map, region) = watch_shm(&p.shm, 4 << 20);
    let mut b = p.spawn(&cfg, "b");
    // b is in once it joined the ring protocol, which it does after its
    // handshake with the server (the server logs the join before that).
    wait_until("b to join the server it started", || {
        servers().len() == 1
            && read_log().matches(" joined").count() == 1
            && region
                .geometry()
                .is_ok_and(|g| region.member_state(&g, 1) == Ok(MemberState::Alive))
    });
    let first = servers()[0];
    // SAFETY: signals the server process b started (its pid from its log).
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0);
    // b notices the hang-up, starts a server again and joins it.
    let t0 = std::time::Instant::now();
    while !(servers().len() == 2 && read_log().matches(" joined").count() == 2) {
        if t0.elapsed() > intervm_testkit::RUN_TIMEOUT {
            let _ = b.kill();
            let o = b.wait_with_output().unwrap();
            let (out, err) = text(&o);
            panic!(
                "timed out waiting for a second server, joined by b\nserver log:\n{}\n\
                 b stdout:\n{out}\nb stderr:\n{err}",
                read_log()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_ne!(servers()[1], first);
    let a = p.spawn(&cfg, "a");
    let (_, b) = both_finished(a, b);
    assert!(
        b.contains("b: received 64 MiB of 64 MiB from a over c") && b.contains("checksum ok"),
        "{b}\nserver log:\n{}",
        read_log()
    );
    assert!(b.contains("the server hung up; joining it again"), "{b}");
    p.wait_server_gone();
}

#[test]
fn a_killed_member_is_reported_and_a_restart_carries_on() {
    if !kvm_available() {
        return;
    }
    let p = Place::new("kill");
    let endless = format!(
        "{}{}{}",
        vm("a", &[send("b", "1024G")]),
        vm("b", &[recv("a", "1024G")]),
        channel(&["a", "b"], &p.shm)
    );
    let finite = format!(
        "{}{}{}",
        vm("a", &[send("b", "64M")]),
        vm("b", &[recv("a", "64M")]),
        channel(&["a", "b"], &p.shm)
    );
    let endless = temp_config("split-kill.toml", &endless);
    let finite = temp_config("split-restart.toml", &finite);
    let (_map, region) = watch_shm(&p.shm, 4 << 20);
    for round in 0..3 {
        // The sender starts first, so its process started the server;
        // killing it must not take the doorbells of the others with it.
        let mut a = p.spawn(&endless, "a");
        let b = p.spawn(&endless, "b");
        // Both alive means this round's processes formatted the region
        // (the last round left it with both gone), so a tail past 0 is
        // this round's transfer under way.
        wait_until("the transfer to start", || {
            region.geometry().is_ok_and(|g| {
                (0..2).all(|m| region.member_state(&g, m) == Ok(MemberState::Alive))
                    && region.ring_state(&g, 0, 1).is_ok_and(|s| s.tail > 0)
            })
        });
        a.kill().unwrap();
        let _ = a.wait();
        let o = b.wait_with_output().unwrap();
        let (out, err) = text(&o);
        assert!(
            !o.status.success() && out.contains("b: receive over c stopped: peer gone"),
            "round {round}:\n{out}\n{err}"
        );
        // Restarted, the two meet again and move checked data.
        let b = p.spawn(&finite, "b");
        let a = p.spawn(&finite, "a");
        finished(a);
        let (_, b) = finished(b);
        assert!(
            b.contains("b: received 64 MiB of 64 MiB from a over c") && b.contains("checksum ok"),
            "round {round}:\n{b}"
        );
    }
    p.wait_server_gone();
}

#[test]
fn a_sender_killed_and_restarted_ten_times_rejoins_a_receiver_that_stays_up() {
    if !kvm_available() {
        return;
    }
    for kind in ["shmem", "doorbell"] {
        killed_and_restarted(kind, "1G", "");
    }
}

#[test]
fn a_portio_sender_killed_and_restarted_ten_times_rejoins_a_receiver_that_stays_up() {
    // The port-I/O channel's rings are the VMMs' own: each restart is a
    // new incarnation whose rings start again where the receiver's VMM
    // agrees, and the receiving guest accepts it (C_ACCEPT_PEER).
    if !kvm_available() {
        return;
    }
    killed_and_restarted("portio", "64M", ", mode = \"descriptor\"");
}

/// Receiver `b` stays up for `COMPLETE` checked transfers of `size` while
/// sender `a` is killed mid-transfer and restarted at once, `KILLS` times:
/// each killed transfer is reported as interrupted, none counts as
/// received, and what it left in the ring never reaches the next one.
/// `opts` go into both tasks.
fn killed_and_restarted(kind: &str, size: &str, opts: &str) {
    const KILLS: u64 = 10;
    const COMPLETE: u64 = 3;
    const FRAME: u64 = 64 << 10;
    let bytes = intervm_protocol::units::parse_size(size).unwrap();
    let p = Place::new(&format!("rejoin-{kind}"));
    let body = format!(
        "{}{}{}",
        vm(
            "a",
            &[format!(
                "{{ task = \"send\", channel = \"c\", to = \"b\", size = \"{size}\"{opts} }}"
            )]
        ),
        vm(
            "b",
            &[format!(
                "{{ task = \"recv\", channel = \"c\", from = [\"a\"], size = \"{size}\", \
                 transfers = {COMPLETE}{opts} }}"
            )]
        ),
        channel_of(kind, &["a", "b"], &p.shm)
    );
    let cfg = temp_config(&format!("split-rejoin-{kind}.toml"), &body);
    let (_map, region) = watch_shm(&p.shm, 4 << 20);
    // What a whole transfer publishes: its frames, each with a header.
    let whole = bytes / FRAME * ring::frame_bytes(FRAME);
    let b = p.spawn(&cfg, "b");
    let plan = intervm_testkit::KillPlan {
        kills: KILLS,
        complete: COMPLETE,
        whole,
        // A deadline that only catches a hang, however busy the host.
        patience: std::time::Duration::from_secs(600),
    };
    let (interrupted, mut completed) = intervm_testkit::kill_mid_transfer(
        plan,
        (&region, 0, 1),
        || p.spawn(&cfg, "a"),
        |a| {
            finished(a);
        },
    );
    let human = if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    };
    while completed < COMPLETE {
        let (_, a) = finished(p.spawn(&cfg, "a"));
        let sent = format!("a: sent {human} of {human} to b over c");
        assert!(a.contains(&sent), "{a}");
        completed += 1;
    }
    let (_, b) = finished(b);
    let want = format!(
        "b: received {COMPLETE} of {COMPLETE} complete transfers of {human} from a over c: \
         every one checksum ok; {interrupted} interrupted by a leaving"
    );
    assert!(b.contains(&want), "{kind}: expected {want:?} in\n{b}");
    eprintln!("{kind}: {interrupted} kills, {completed} complete transfers\n{b}");
    if kind == "doorbell" {
        p.wait_server_gone();
    }
}

#[test]
fn a_member_that_never_comes_is_named_and_given_up_on() {
    if !kvm_available() {
        return;
    }
    let p = Place::new("never");
    // Long enough that the process looks (every few ms) between its first
    // notice, after 2 s, and the guest giving up, even on a busy host.
    let body = format!(
        "{}{}{}join_timeout = \"10s\"\n",
        vm("a", &[send("b", "4M")]),
        vm("b", &[recv("a", "4M")]),
        channel(&["a", "b"], &p.shm)
    );
    let cfg = temp_config("split-never.toml", &body);
    let o = p.spawn(&cfg, "b").wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("channel c: waiting") && err.contains("for a (it runs in another process"),
        "{err}"
    );
    assert!(
        err.contains("channel c: a did not join within join_timeout = 10 s"),
        "{err}"
    );
    assert!(out.contains("b: channel c: a never joined"), "{out}");
    p.wait_server_gone();
}

/// An unworkable split is refused before any VM boots.
fn refused(body: &str, tag: &str, env_dir: &Path, want: &[&str]) {
    let cfg = temp_config(&format!("split-{tag}.toml"), body);
    let o = intervm_cmd(&["run", cfg.to_str().unwrap(), "--vm", "b", "--timeout", "60"])
        .env("INTERVM_RUNTIME_DIR", env_dir)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{tag}: {out}\n{err}");
    for w in want {
        assert!(err.contains(w), "{tag}: {w:?} in {err}");
    }
    assert!(!err.contains("stopped after"), "{tag}: a VM ran: {err}");
}

#[test]
fn unworkable_splits_are_refused_at_start() {
    let p = Place::new("refuse");
    let two = format!(
        "{}{}",
        vm("a", &[send("b", "4M")]),
        vm("b", &[recv("a", "4M")])
    );
    // A directory that cannot be created.
    let body = format!("{two}{}", channel(&["a", "b"], &p.shm));
    refused(
        &body,
        "nodir",
        Path::new("/proc/intervm-no-such-dir/run"),
        &[
            "channel[c]: the doorbells of the members in other processes (a) meet at",
            "INTERVM_RUNTIME_DIR",
        ],
    );
    // A directory other users may write: they could plant a server.
    let open = std::env::temp_dir().join(format!("intervm-split-open-{}", std::process::id()));
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    refused(&body, "opendir", &open, &["writable only by it"]);
    std::fs::remove_dir_all(&open).unwrap();
    // An anonymous memfd has no name another process could find.
    let memfd =
        format!("{two}[[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\n");
    refused(
        &memfd,
        "memfd",
        &p.dir,
        &["channel[c]: backing: an anonymous memfd cannot be shared"],
    );
}
