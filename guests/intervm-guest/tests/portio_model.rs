//! `intervm-guest portio` logic against the real port-I/O device model: the
//! tool's register sequences drive a `PortioDevice` through a `Ports`
//! implementation that calls the device directly (a Linux guest would trap
//! into the VMM instead), on the same queues a probe guest uses. One test
//! puts a probe guest on real /dev/kvm at the other end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use intervm_guest::portio::{self, DmaBuf, Mode, Payload, Ports};
use intervm_protocol::portio::{DEFAULT_BASE, PORT_COUNT};
use intervm_testkit::{finish, probe_vm_with, require_kvm, PEER_TIMEOUT_MS, RUN_TIMEOUT};
use portio_channel::{PortioDevice, RingLink};
use probe_image::portio::{PortioTask, Role};
use probe_image::shmem::{expected_stream, peer_record};
use shmem_device::{Backing, SharedRegion, Transport};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_core::VmExit;

type Dev = PortioDevice<RingLink, GuestMemoryMmap>;

/// A "guest" for the tool: its ports reach `dev`, its memory is `mem`.
struct Model {
    dev: Arc<Mutex<Dev>>,
    mem: GuestMemoryMmap,
    next_dma: u64,
    /// The largest contiguous buffer `dma_buffer` hands out (a Linux guest
    /// without huge pages gets one 4 KiB page).
    dma_max: usize,
}

impl Model {
    fn new(t: &Transport, me: u32) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let link = link(t, me);
        Self {
            dev: Arc::new(Mutex::new(PortioDevice::new(link, mem.clone()))),
            mem,
            next_dma: 1 << 20,
            dma_max: usize::MAX,
        }
    }
}

impl Ports for Model {
    fn input(&mut self, port: u16, width: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.lock().unwrap().pio_read(
            PioAddress(DEFAULT_BASE),
            port - DEFAULT_BASE,
            &mut b[..width],
        );
        u32::from_le_bytes(b)
    }
    fn output(&mut self, port: u16, width: usize, v: u32) {
        self.dev.lock().unwrap().pio_write(
            PioAddress(DEFAULT_BASE),
            port - DEFAULT_BASE,
            &v.to_le_bytes()[..width],
        );
    }
    fn rep_out(&mut self, port: u16, src: &[u8], width: usize) {
        for c in src.chunks_exact(width) {
            self.dev
                .lock()
                .unwrap()
                .pio_write(PioAddress(DEFAULT_BASE), port - DEFAULT_BASE, c);
        }
    }
    fn rep_in(&mut self, port: u16, dst: &mut [u8], width: usize) {
        for c in dst.chunks_exact_mut(width) {
            self.dev
                .lock()
                .unwrap()
                .pio_read(PioAddress(DEFAULT_BASE), port - DEFAULT_BASE, c);
        }
    }
    fn dma_buffer(&mut self, len: usize) -> Result<DmaBuf, intervm_guest::Error> {
        let len = len.min(self.dma_max);
        let phys = self.next_dma;
        self.next_dma += (len as u64).next_multiple_of(4096);
        let ptr = self.mem.get_host_address(GuestAddress(phys)).unwrap();
        Ok(DmaBuf { ptr, len, phys })
    }
}

// SAFETY: the model's memory is only touched from the thread that owns it.
unsafe impl Send for Model {}

/// A link whose peers count as gone only after a hang, not after a moment
/// without CPU on a loaded host.
fn link(t: &Transport, me: u32) -> RingLink {
    let mut l = RingLink::join(t, me).unwrap();
    l.set_stale_after_ms(PEER_TIMEOUT_MS);
    l
}

fn transport(members: u32) -> Transport {
    let r = SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap();
    Transport::attach(Arc::new(r), members).unwrap()
}

const T: Duration = Duration::from_secs(30);

fn exchange(
    payload: Payload,
    size: Option<u64>,
    message: usize,
    mode: Mode,
    out: Option<PathBuf>,
) -> (intervm_guest::shmem::Summary, intervm_guest::shmem::Summary) {
    let t = transport(2);
    let mut a = Model::new(&t, 0);
    let mut b = Model::new(&t, 1);
    let rx = std::thread::spawn(move || {
        portio::recv(&mut b, DEFAULT_BASE, 0, size, out.as_ref(), mode, T, T).unwrap()
    });
    let sent = portio::send(&mut a, DEFAULT_BASE, 1, &payload, message, mode, T).unwrap();
    (sent, rx.join().unwrap())
}

#[test]
fn every_port_form_carries_the_pattern() {
    for (width, rep) in [(1, false), (2, true), (4, false), (4, true)] {
        let mode = Mode {
            descriptor: false,
            width,
            rep,
        };
        let size = 50_000;
        let (s, r) = exchange(
            Payload::Pattern { seed: 4, size },
            Some(size),
            1000 + width,
            mode,
            None,
        );
        assert_eq!((s.bytes, r.bytes), (size, size), "width {width} rep {rep}");
        assert_eq!(s.stream, r.stream);
        assert_eq!(r.stream, expected_stream(4, size, 1000 + width as u64));
    }
}

#[test]
fn a_file_streams_by_descriptor_and_ends_with_an_empty_message() {
    let dir = std::env::temp_dir().join(format!("intervm-guest-pio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in"), dir.join("out"));
    let mut data = vec![0u8; 300_001];
    intervm_protocol::ring::fill_pattern(8, 0, &mut data);
    std::fs::write(&input, &data).unwrap();
    let mode = Mode {
        descriptor: true,
        width: 4,
        rep: false,
    };
    let (s, r) = exchange(
        Payload::File(input),
        None,
        64 << 10,
        mode,
        Some(output.clone()),
    );
    assert_eq!(std::fs::read(&output).unwrap(), data);
    assert_eq!((s.bytes, r.bytes, s.stream), (300_001, 300_001, r.stream));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_peer_that_never_comes_is_an_error() {
    let t = transport(2);
    let mut a = Model::new(&t, 0);
    let mode = Mode {
        descriptor: false,
        width: 4,
        rep: false,
    };
    let e = portio::recv(
        &mut a,
        DEFAULT_BASE,
        1,
        Some(10),
        None,
        mode,
        T,
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(e.to_string().contains("peer gone"), "{e}");
}

#[test]
fn the_tool_sends_to_a_probe_guest() {
    require_kvm!();
    let t = transport(2);
    let size = 64 << 10;
    let mut task = PortioTask::new(Role::Recv { from: 0b01 }, size);
    task.width = 2;
    let (vm, console) = probe_vm_with("rx", &task.boot_info(), 1, 64 << 20);
    let dev = Arc::new(Mutex::new(PortioDevice::new(
        link(&t, 1),
        vm.memory().clone(),
    )));
    vm.add_pio_device(DEFAULT_BASE, PORT_COUNT, dev).unwrap();
    let vm = vm.start().unwrap();
    let mut tool = Model::new(&t, 0);
    let mode = Mode {
        descriptor: false,
        width: 4,
        rep: true,
    };
    let s = portio::send(
        &mut tool,
        DEFAULT_BASE,
        1,
        &Payload::Pattern { seed: 12, size },
        4096,
        mode,
        T,
    )
    .unwrap();
    let (exit, info) = finish(vm, &console, RUN_TIMEOUT);
    assert_eq!(exit, VmExit::Guest(0), "{}", console.contents());
    let got = peer_record(&info, 0);
    assert_eq!((got.bytes, got.stream), (size, s.stream));
    assert_eq!(got.stream, expected_stream(12, size, 4096));
}

#[test]
fn descriptor_messages_are_never_split_to_fit_a_small_buffer() {
    // The sender used to shrink its messages to the buffer it got, so the
    // receiver saw other message boundaries than were asked for.
    let t = transport(2);
    let mut a = Model::new(&t, 0);
    a.dma_max = 4096;
    let mode = Mode {
        descriptor: true,
        width: 4,
        rep: false,
    };
    let payload = Payload::Pattern {
        seed: 1,
        size: 1 << 20,
    };
    let e = portio::send(&mut a, DEFAULT_BASE, 1, &payload, 64 << 10, mode, T).unwrap_err();
    assert!(
        matches!(
            e,
            intervm_guest::Error::NoContiguousBuffer {
                want: 65536,
                got: 4096
            }
        ),
        "{e}"
    );
}
