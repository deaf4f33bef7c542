//! `intervm-guest shmem` run on the host against a `/dev/shm` region that
//! probe guests on real /dev/kvm share through ivshmem-plain devices: the
//! tool's protocol code, start line, heartbeats and file streaming are the
//! same ones it runs inside a Linux guest (only the sysfs lookup differs,
//! which unit tests cover).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use intervm_protocol::ring::{MemberState, Region};
use intervm_testkit::{
    finish, probe_vm_with, require_kvm, wait_until, wait_within, PEER_TIMEOUT_MS, RUN_TIMEOUT,
};
use probe_image::shmem::{expected_stream, peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, IvshmemPlain, SharedRegion, Transport};
use vmm_core::VmExit;

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;

struct Shm(String);

impl Shm {
    fn new(tag: &str) -> Self {
        Shm(format!("intervm-guest-{tag}-{}", std::process::id()))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/dev/shm").join(&self.0)
    }
    /// A 1 MiB region nobody manages, formatted by the tool for two
    /// members.
    fn unmanaged(tag: &str) -> Self {
        let shm = Shm::new(tag);
        std::fs::File::create(shm.path())
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let res = shm.path();
        let o = tool(&[
            "shmem",
            "format",
            "--resource",
            res.to_str().unwrap(),
            "--members",
            "2",
        ])
        .output()
        .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        shm
    }
    fn transport(&self) -> Transport {
        let r = SharedRegion::open(&Backing::Shm(self.0.clone()), 1 << 20).expect("region");
        Transport::attach(Arc::new(r), 2).expect("attach")
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
}

fn tool(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_intervm-guest"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// [`tool`] for a transfer: its peer counts as gone only after a hang, not
/// after a moment without CPU on a loaded host.
fn transfer_tool(args: &[&str]) -> Command {
    let mut c = tool(args);
    c.args(["--timeout", &(PEER_TIMEOUT_MS / 1000).to_string()]);
    c
}

/// `shmem recv` of `size` bytes from member 0, as member 1 of the region
/// at `res`, checking every byte against the pattern of `seed`.
fn checked_recv(res: &std::path::Path, size: u64, seed: u64) -> Command {
    transfer_tool(&[
        "shmem",
        "recv",
        "--resource",
        res.to_str().unwrap(),
        "--me",
        "1",
        "--from",
        "0",
        "--size",
        &size.to_string(),
        "--verify-seed",
        &seed.to_string(),
    ])
}

/// A fresh directory for a test's files.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("intervm-guest-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh directory holding `in.bin`, `len` bytes of the pattern of
/// `seed`; returns it, the input's and an output's path, and the bytes.
fn pattern_file(tag: &str, len: usize, seed: u64) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let dir = scratch_dir(tag);
    let (input, output) = (dir.join("in.bin"), dir.join("out.bin"));
    let mut data = vec![0u8; len];
    intervm_protocol::ring::fill_pattern(seed, 0, &mut data);
    std::fs::write(&input, &data).unwrap();
    (dir, input, output, data)
}

/// Runs `cmd` to its end, failing (not hanging) the test if it hangs.
fn run(mut cmd: Command, what: &str) -> Output {
    wait_within(cmd.spawn().unwrap(), what, HANG)
}

/// Longer than any tool run here takes on a loaded host; only a hang
/// reaches it.
const HANG: std::time::Duration = std::time::Duration::from_secs(300);

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn checksum_in(o: &Output) -> u64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let hex = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("stream_checksum=0x"))
        .unwrap_or_else(|| panic!("no checksum in {out}"));
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn the_tool_sends_to_a_probe_guest() {
    require_kvm!();
    let shm = Shm::new("to-probe");
    let t = shm.transport();
    let mut task = ShmemTask::new(1, Role::Recv { from: 0b01 }, SIZE);
    task.chunk = CHUNK;
    task.timeout_ms = PEER_TIMEOUT_MS;
    let (vm, console) = probe_vm_with("rx", &task.boot_info(), 1, 64 << 20);
    vm.add_pci_device(Arc::new(Mutex::new(IvshmemPlain::new(t.region().clone()))))
        .unwrap();
    let _m = t.join(1).unwrap();
    let vm = vm.start().unwrap();
    let res = shm.path();
    let sender = transfer_tool(&[
        "shmem",
        "send",
        "--resource",
        res.to_str().unwrap(),
        "--me",
        "0",
        "--to",
        "1",
        "--size",
        "8M",
        "--seed",
        "77",
        "--chunk",
        "64K",
    ])
    .output()
    .unwrap();
    let (exit, info) = finish(vm, &console, RUN_TIMEOUT);
    assert!(sender.status.success(), "{}", text(&sender));
    assert_eq!(exit, VmExit::Guest(0), "{}", console.contents());
    let got = peer_record(&info, 0);
    assert_eq!(got.bytes, SIZE);
    assert_eq!(got.stream, expected_stream(77, SIZE, CHUNK));
    assert_eq!(checksum_in(&sender), got.stream);
}

/// A probe guest, member 0 of `t`'s region, sends `size` bytes of the
/// pattern of `seed` to the tool `receiver` (member 1): both must succeed
/// and the tool must have received exactly that stream. Returns the
/// probe's boot info and the tool's output.
fn probe_sends_to(
    t: &Transport,
    receiver: std::process::Child,
    size: u64,
    seed: u64,
) -> (intervm_protocol::probe::BootInfo, Output) {
    let mut task = ShmemTask::new(0, Role::Send { to: 1 }, size);
    task.chunk = CHUNK;
    task.seed = seed;
    task.timeout_ms = PEER_TIMEOUT_MS;
    let (vm, console) = probe_vm_with("tx", &task.boot_info(), 1, 64 << 20);
    vm.add_pci_device(Arc::new(Mutex::new(IvshmemPlain::new(t.region().clone()))))
        .unwrap();
    let m = t.join(0).unwrap();
    let (exit, info) = finish(vm.start().unwrap(), &console, RUN_TIMEOUT);
    drop(m);
    let out = wait_within(receiver, "the receiving tool", HANG);
    assert_eq!(exit, VmExit::Guest(0), "{}", console.contents());
    assert!(ShmemResult::from_info(&info).error.is_none());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(checksum_in(&out), expected_stream(seed, size, CHUNK));
    (info, out)
}

#[test]
fn a_receiver_on_a_region_larger_than_its_memory_keeps_to_its_frames() {
    use std::os::unix::process::CommandExt;
    require_kvm!();
    // 8 GiB, sparse: two rings of more than 1 GiB each. A Linux guest with
    // 256 MiB of RAM once failed here, sizing its receive buffers (two,
    // with --verify-seed) to the whole ring.
    const REGION: u64 = 8 << 30;
    let shm = Shm::new("big");
    let r = SharedRegion::open(&Backing::Shm(shm.0.clone()), REGION).expect("region");
    let t = Transport::attach(Arc::new(r), 2).expect("attach");
    assert!(t.geometry().max_payload() > 1 << 30);
    const SIZE: u64 = (16 << 20) + 1000;
    let mut cmd = checked_recv(&shm.path(), SIZE, 7);
    // Address space for the region's mapping and 1 GiB more.
    let limit = REGION + (1 << 30);
    // SAFETY: between fork and exec the closure makes one
    // async-signal-safe call on a value it owns.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    probe_sends_to(&t, cmd.spawn().unwrap(), SIZE, 7);
}

#[test]
fn small_rings_at_the_end_of_an_eight_gib_region_carry_checked_data_to_the_tool() {
    require_kvm!();
    // The tool maps the header page and the rings' window only (a Linux
    // guest would otherwise fill page tables for all 8 GiB); a window
    // misplaced would fault or miss every frame.
    const REGION: u64 = 8 << 30;
    let shm = Shm::new("far-end");
    let r = SharedRegion::open(&Backing::Shm(shm.0.clone()), REGION).expect("region");
    let t = Transport::attach_rings(Arc::new(r), 2, Some(1 << 20)).expect("attach");
    let geo = t.geometry();
    assert_eq!(
        geo.region_bytes(),
        REGION,
        "the rings end at the region's end"
    );
    assert!(geo.ring_base > 4 << 30);
    const SIZE: u64 = (4 << 20) + 1000;
    let receiver = checked_recv(&shm.path(), SIZE, 11).spawn().unwrap();
    probe_sends_to(&t, receiver, SIZE, 11);
}

#[test]
fn a_probe_guest_sends_to_the_tool() {
    require_kvm!();
    let shm = Shm::new("from-probe");
    let t = shm.transport();
    let res = shm.path();
    // More than the probe's 16 MiB source buffer, which it streams
    // repeatedly, and a short last frame: the tool checks every byte.
    const SIZE: u64 = (40 << 20) + 1000;
    let receiver = checked_recv(&res, SIZE, 5).spawn().unwrap();
    let (info, out) = probe_sends_to(&t, receiver, SIZE, 5);
    assert_eq!(checksum_in(&out), peer_record(&info, 1).stream);
}

/// Runs a receiving and a sending tool on the region at `res` (member 1
/// from member 0) to their ends, and checks that both succeeded and saw
/// the same stream.
fn tool_pair(res: &str, recv: &[&str], send: &[&str]) -> (Output, Output) {
    let side = |verb: &str, me: &str, flag: &str, peer: &str, extra: &[&str]| {
        let mut a = vec!["shmem", verb, "--resource", res, "--me", me, flag, peer];
        a.extend_from_slice(extra);
        transfer_tool(&a)
    };
    let rx = side("recv", "1", "--from", "0", recv).spawn().unwrap();
    let tx = run(side("send", "0", "--to", "1", send), "the sending tool");
    let rx = wait_within(rx, "the receiving tool", HANG);
    assert!(tx.status.success(), "sender: {}", text(&tx));
    assert!(rx.status.success(), "receiver: {}", text(&rx));
    assert_eq!(checksum_in(&tx), checksum_in(&rx), "stream checksums");
    (rx, tx)
}

#[test]
fn files_and_patterns_cross_in_place_and_mixed_with_copying_ends() {
    let shm = Shm::unmanaged("in-place");
    let res = shm.path();
    let res = res.to_str().unwrap();
    // Frames of 100,000 bytes wrap past the rings' ends; the file's last
    // frame is short.
    let (dir, input, output, mut data) = pattern_file("in-place", 3_000_001, 5);
    let (inp, out) = (input.to_str().unwrap(), output.to_str().unwrap());
    let chunk = ["--chunk", "100000"];
    // A file read straight into frames and written straight from them.
    tool_pair(
        res,
        &["--zero-copy", "--file", out],
        &["--zero-copy", "--file", inp, chunk[0], chunk[1]],
    );
    assert!(std::fs::read(&output).unwrap() == data, "the file differs");
    // The pattern written in place, checked by a copying receiver, and
    // the other way round.
    let size = (8u64 << 20).to_string();
    let checked = ["--size", &size, "--verify-seed", "9"];
    let pattern = ["--size", &size, "--seed", "9", chunk[0], chunk[1]];
    let (rx, _) = tool_pair(res, &checked, &[&pattern[..], &["--zero-copy"]].concat());
    assert!(
        text(&rx).contains("received bytes=8388608 "),
        "{}",
        text(&rx)
    );
    let (rx, _) = tool_pair(res, &[&checked[..], &["--zero-copy"]].concat(), &pattern);
    assert!(
        text(&rx).contains("received bytes=8388608 "),
        "{}",
        text(&rx)
    );
    // A receiver in place that checks the pattern finds the first
    // difference, in a later frame, at its offset in the stream (offsets
    // within a frame and block: the unit test of `deliver`).
    data[2_500_000] ^= 1;
    std::fs::write(&input, &data).unwrap();
    let recv = ["--verify-seed", "5", "--zero-copy"];
    let rx = transfer_tool(
        &[
            &[
                "shmem",
                "recv",
                "--resource",
                res,
                "--me",
                "1",
                "--from",
                "0",
            ][..],
            &recv,
        ]
        .concat(),
    )
    .spawn()
    .unwrap();
    let send = ["--file", inp, "--zero-copy", chunk[0], chunk[1]];
    let mut tx = transfer_tool(
        &[
            &["shmem", "send", "--resource", res, "--me", "0", "--to", "1"][..],
            &send,
        ]
        .concat(),
    )
    .spawn()
    .unwrap();
    let rx = wait_within(rx, "the receiving tool", HANG);
    // The sender may wait for room the receiver never makes.
    let _ = tx.kill();
    let _ = tx.wait();
    assert!(!rx.status.success(), "{}", text(&rx));
    assert!(
        text(&rx).contains("differs from the pattern with seed 5 at byte 2500000"),
        "{}",
        text(&rx)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_streams_between_two_tools_with_end_of_stream() {
    let shm = Shm::unmanaged("file");
    let res = shm.path();
    let res = res.to_str().unwrap();
    // Not a multiple of the frame size, so the last frame is short.
    let (dir, input, output, data) = pattern_file("file", 1_500_001, 3);
    let rx = transfer_tool(&[
        "shmem",
        "recv",
        "--resource",
        res,
        "--me",
        "1",
        "--from",
        "0",
        "--file",
        output.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let tx = transfer_tool(&[
        "shmem",
        "send",
        "--resource",
        res,
        "--me",
        "0",
        "--to",
        "1",
        "--file",
        input.to_str().unwrap(),
        "--chunk",
        "16K",
    ])
    .output()
    .unwrap();
    let rx = wait_within(rx, "the receiving tool", HANG);
    assert!(tx.status.success(), "{}", text(&tx));
    assert!(rx.status.success(), "{}", text(&rx));
    assert_eq!(std::fs::read(&output).unwrap(), data);
    assert_eq!(checksum_in(&tx), checksum_in(&rx));
    // Both tools left, so a re-format is allowed; a live member blocks it.
    let o = tool(&["shmem", "format", "--resource", res, "--members", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut waiting = tool(&[
        "shmem",
        "recv",
        "--resource",
        res,
        "--me",
        "1",
        "--from",
        "0",
    ])
    .spawn()
    .unwrap();
    // Format only once it has joined.
    let map = SharedRegion::open(&Backing::File(shm.path()), 1 << 20).unwrap();
    // SAFETY: `map` stays mapped while `region` is used (to the end of the
    // test).
    let region = unsafe { Region::new(map.host_addr(), map.size()) };
    wait_until("the waiting receiver to join", || {
        region
            .geometry()
            .is_ok_and(|g| region.member_state(&g, 1) == Ok(MemberState::Alive))
    });
    let o = tool(&["shmem", "format", "--resource", res, "--members", "3"])
        .output()
        .unwrap();
    let _ = waiting.kill();
    let _ = waiting.wait();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 member(s) are alive"), "{}", text(&o));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_peer_that_never_comes_is_an_error_not_a_hang() {
    let shm = Shm::new("nobody");
    std::fs::File::create(shm.path())
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let res = shm.path();
    let res = res.to_str().unwrap();
    // An unformatted region is waited for, up to the join timeout.
    let o = tool(&[
        "shmem",
        "recv",
        "--resource",
        res,
        "--me",
        "1",
        "--from",
        "0",
        "--join-timeout",
        "0.5",
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("region not formatted"), "{}", text(&o));
    tool(&["shmem", "format", "--resource", res, "--members", "2"])
        .output()
        .unwrap();
    let o = tool(&[
        "shmem",
        "recv",
        "--resource",
        res,
        "--me",
        "1",
        "--from",
        "0",
        "--join-timeout",
        "0.3",
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("peer 0 is gone"), "{}", text(&o));
    let o = tool(&[
        "shmem",
        "recv",
        "--resource",
        res,
        "--me",
        "5",
        "--from",
        "0",
    ])
    .output()
    .unwrap();
    assert!(text(&o).contains("no member 5"), "{}", text(&o));
}

#[test]
fn a_probe_sends_twice_in_a_row_to_two_tool_runs() {
    // Each transfer is larger than the ring, so the probe waits on its
    // receiver. A "go" left up by the first receiver used to start the
    // probe's second transfer at once, against a tool that was leaving:
    // "peer gone" (found by a Linux guest under intervm).
    require_kvm!();
    let shm = Shm::new("twice");
    let t = shm.transport();
    let res = shm.path();
    let sizes = [2u64 << 20, 3 << 20];
    let tasks: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mut task = ShmemTask::new(0, Role::Send { to: 1 }, size);
            task.chunk = CHUNK;
            task.seed = 10 + i as u64;
            task.timeout_ms = PEER_TIMEOUT_MS;
            task.boot_info()
        })
        .collect();
    let (vm, console) = probe_vm_with("tx", &tasks[0], 1, 64 << 20);
    vmm_core::boot::probe::load_tasks(&vm, probe_image::PROBE_ELF, &tasks).unwrap();
    vm.add_pci_device(Arc::new(Mutex::new(IvshmemPlain::new(t.region().clone()))))
        .unwrap();
    let m = t.join(0).unwrap();
    let running = vm.start().unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let seed = 10 + i as u64;
        let out = run(checked_recv(&res, size, seed), &format!("tool run {i}"));
        assert!(out.status.success(), "transfer {i}: {}", text(&out));
        assert_eq!(checksum_in(&out), expected_stream(seed, size, CHUNK));
    }
    let (exit, _) = finish(running, &console, RUN_TIMEOUT);
    drop(m);
    assert_eq!(exit, VmExit::Guest(0), "{}", console.contents());
}

#[test]
fn a_receiver_serving_transfers_outlives_a_sender_killed_and_restarted_ten_times() {
    // Both ends are the tool, as processes on the host (no KVM needed):
    // the sender is SIGKILLed mid-transfer (its heartbeat simply stops, as
    // when a guest or its VMM dies) and started again at once, ten times,
    // while one receiver serves; every transfer it counts complete is
    // checked byte for byte, none that was cut counts, and nothing a cut
    // one left in the ring reaches the next.
    const KILLS: u64 = 10;
    const COMPLETE: u64 = 3;
    const SIZE: u64 = 64 << 20;
    // The tools are debug builds: a sender fills 16 MiB of pattern before
    // it prepares, and the receiver checks every byte. In a CI run, beside
    // the other tests of this file and a CPU hog, the first sender once
    // took over a minute to send. Waits end long before these deadlines
    // unless something hangs.
    const SLOW: std::time::Duration = std::time::Duration::from_secs(600);
    let shm = Shm::new("serve");
    let t = shm.transport();
    let (region, geo) = (t.ring_region(), t.geometry());
    let res = shm.path();
    let res = res.to_str().unwrap();
    let mut serve = checked_recv(&shm.path(), SIZE, 9);
    serve.args([
        "--transfers",
        &COMPLETE.to_string(),
        "--join-timeout",
        &SLOW.as_secs().to_string(),
    ]);
    let receiver = serve.spawn().unwrap();
    let size = SIZE.to_string();
    let sender = || {
        transfer_tool(&[
            "shmem",
            "send",
            "--resource",
            res,
            "--me",
            "0",
            "--to",
            "1",
            "--size",
            &size,
            "--seed",
            "9",
            "--join-timeout",
            &SLOW.as_secs().to_string(),
        ])
        .spawn()
        .unwrap()
    };
    let frame = intervm_protocol::probe::shmem_frame_bytes(CHUNK, SIZE, geo.max_payload());
    let whole = SIZE.div_ceil(frame) * intervm_protocol::ring::frame_bytes(frame);
    let plan = intervm_testkit::KillPlan {
        kills: KILLS,
        complete: COMPLETE,
        whole,
        patience: SLOW,
    };
    let (interrupted, mut completed) =
        intervm_testkit::kill_mid_transfer(plan, (&region, 0, 1), sender, |a| {
            let o = wait_within(a, "a sender", HANG);
            assert!(o.status.success(), "{}", text(&o));
        });
    while completed < COMPLETE {
        let o = wait_within(sender(), "a sender", HANG);
        assert!(o.status.success(), "{}", text(&o));
        completed += 1;
    }
    let o = wait_within(receiver, "the serving receiver", HANG);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    let want = format!(
        "received {COMPLETE} of {COMPLETE} complete transfers, {interrupted} interrupted by \
         the sender leaving"
    );
    assert!(all.contains(&want), "expected {want:?} in\n{all}");
    assert_eq!(checksum_in(&o), expected_stream(9, SIZE, CHUNK), "{all}");
    // Each cut transfer was seen as one: reported, and not counted.
    assert_eq!(
        all.matches("sender gone after").count() as u64,
        interrupted,
        "{all}"
    );
    eprintln!("{interrupted} kills, {completed} complete transfers\n{all}");
}
