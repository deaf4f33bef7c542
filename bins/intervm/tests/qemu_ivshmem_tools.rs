//! QEMU's own ivshmem-server and ivshmem-client (built from Debian's qemu
//! source by `scripts/qemu-ivshmem-tools`) against intervm, both ways:
//! intervm's doorbell members as clients of QEMU's server, moving
//! checksummed data; QEMU's client against `intervm ivshmem-server`,
//! seeing peers join and leave and exchanging notifications.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{intervm, temp_config, text};
use intervm_testkit::{kvm_available, qemu_ivshmem_tools, wait_until};

/// A child process, killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path) {
    wait_until(&format!("{} to appear", p.display()), || p.exists());
}

/// QEMU's ivshmem-client on `socket`, line-buffered (it only flushes its
/// stdout after a command otherwise), its output gathered as it comes.
struct QemuClient {
    proc: Proc,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
}

impl QemuClient {
    fn start(client: &Path, socket: &Path) -> Self {
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(client)
            .args(["-v", "-S"])
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting QEMU's ivshmem-client");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut g = o.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Self {
            proc: Proc(child),
            stdin,
            out,
        }
    }

    fn says(&self, what: &str) -> bool {
        self.out.lock().unwrap().contains(what)
    }

    fn wait_for(&self, who: &str, what: &str) {
        wait_until(&format!("{who} to print {what:?}"), || self.says(what));
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
    }
}

fn names(tag: &str) -> (PathBuf, String) {
    let id = std::process::id();
    (
        std::env::temp_dir().join(format!("intervm-qtools-{tag}-{id}.sock")),
        format!("intervm-qtools-{tag}-{id}"),
    )
}

#[test]
fn intervm_members_join_qemus_own_ivshmem_server() {
    if !kvm_available() {
        return;
    }
    let Some((server, _)) = qemu_ivshmem_tools() else {
        return;
    };
    let (sock, shm) = names("srv");
    let _ = std::fs::remove_file(&sock);
    let _server = Proc(
        Command::new(&server)
            .args(["-F", "-S"])
            .arg(&sock)
            .args(["-M", &shm, "-l", "4M", "-n", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting QEMU's ivshmem-server"),
    );
    wait_for_socket(&sock);
    // No size: the region is the server's (4 MiB).
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = [\n  {{ task = \"send\", channel = \"c\", to = \"b\", size = \"64M\" }},\n  \
         {{ task = \"recv\", channel = \"c\", size = \"16M\" }},\n  \
         {{ task = \"ping\", channel = \"c\", to = \"b\", rounds = 200 }},\n]\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\n\
         probe = [\n  {{ task = \"recv\", channel = \"c\", size = \"64M\" }},\n  \
         {{ task = \"send\", channel = \"c\", to = \"a\", size = \"16M\" }},\n  \
         {{ task = \"pong\", channel = \"c\", to = \"a\", rounds = 200 }},\n]\n\
         [[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\nvectors = 2\n\
         backing = {{ server = \"{}\" }}\n",
        sock.display()
    );
    let cfg = temp_config("qemu-server.toml", &body);
    let o = intervm(&["run", cfg.to_str().unwrap(), "--timeout", "300"]);
    let _ = std::fs::remove_file(Path::new("/dev/shm").join(&shm));
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("received 64 MiB of 64 MiB from a over c")
            && out.contains("received 16 MiB of 16 MiB from b over c"),
        "{out}"
    );
    assert_eq!(out.matches("checksum ok").count(), 2, "{out}");
    // Doorbells by the IDs QEMU's server gave, published in the region.
    assert!(
        out.contains("a: 200 of 200 round trips with b over c") && !out.contains("LOST INTERRUPTS"),
        "{out}"
    );
}

#[test]
fn qemus_own_ivshmem_client_works_with_our_server() {
    let Some((_, client)) = qemu_ivshmem_tools() else {
        return;
    };
    let (sock, shm) = names("cli");
    let _ = std::fs::remove_file(&sock);
    let _server = Proc(
        common::intervm_cmd(&[
            "ivshmem-server",
            "--socket",
            sock.to_str().unwrap(),
            "--shm",
            &shm,
            "--size",
            "1M",
            "--vectors",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting intervm ivshmem-server"),
    );
    wait_for_socket(&sock);
    // One client at a time, so their IDs are known: 0, then 1.
    let mut a = QemuClient::start(&client, &sock);
    a.wait_for("client a", "our_id=0");
    let mut b = QemuClient::start(&client, &sock);
    b.wait_for("client b", "our_id=1");
    a.wait_for("client a", "new peer id = 1");
    // Both vectors of the other arrived.
    a.wait_for("client a", "new vector 1");
    b.wait_for("client b", "new vector 1");
    // Notifications both ways, on the vector named.
    a.command("int 1 1");
    b.wait_for("client b", "receive notification from peer_id=1 vector=1");
    b.command("int 0 0");
    a.wait_for("client a", "receive notification from peer_id=0 vector=0");
    // A client that goes is announced to the other.
    drop(a.proc);
    b.wait_for("client b", "delete peer id = 0");
    let _ = std::fs::remove_file(Path::new("/dev/shm").join(&shm));
}
