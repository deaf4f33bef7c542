//! A VM's event loop: one thread, asleep in `epoll`, that serves every
//! event source of the VM's devices outside the vCPUs (a device's INTx
//! eventfds, its connection to an ivshmem server, ...).
//!
//! It is rust-vmm's [`event_manager`]: a device hands the loop a
//! [`MutEventSubscriber`] ([`EventLoop::add`]) and the loop calls it when
//! one of its file descriptors is ready. Subscribers run on the loop's
//! thread, one at a time, so a subscriber never blocks for long: at most a
//! bounded read of a message that epoll said is there.
//!
//! ```
//! use std::sync::mpsc;
//! use event_manager::{EventOps, Events, MutEventSubscriber};
//! use vmm_core::events::EventLoop;
//! use vmm_sys_util::{epoll::EventSet, eventfd::EventFd};
//!
//! struct Counter(EventFd, mpsc::Sender<u64>);
//! impl MutEventSubscriber for Counter {
//!     fn init(&mut self, ops: &mut EventOps) {
//!         ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
//!     }
//!     fn process(&mut self, _: Events, _: &mut EventOps) {
//!         let _ = self.1.send(self.0.read().unwrap());
//!     }
//! }
//!
//! let events = EventLoop::start("example").unwrap();
//! let evt = EventFd::new(0).unwrap();
//! let (tx, rx) = mpsc::channel();
//! events.add(Box::new(Counter(evt.try_clone().unwrap(), tx))).unwrap();
//! evt.write(3).unwrap();
//! assert_eq!(rx.recv().unwrap(), 3);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use event_manager::{
    EventOps, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};

use crate::{Error, Result};

/// What the loop holds: any subscriber that may move to its thread.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// A handle to the loop that may be kept anywhere (a device, a
/// subscriber) and used from any thread, the loop's own included: it only
/// queues requests.
#[derive(Clone)]
pub struct LoopHandle(RemoteEndpoint<Subscriber>);

impl LoopHandle {
    /// Puts `s` into the loop as soon as the loop gets to it (from any
    /// thread, the loop's own included). Does nothing if the loop is gone.
    pub fn add_later(&self, s: Subscriber) {
        let _ = self.0.fire(move |ops| {
            ops.add_subscriber(s);
        });
    }

    /// Takes subscriber `id` out of the loop (its file descriptors with
    /// it) as soon as the loop gets to it. Does nothing if the loop is gone.
    pub fn remove_later(&self, id: SubscriberId) {
        let _ = self.0.fire(move |ops| {
            let _ = ops.remove_subscriber(id);
        });
    }
}

/// The loop's thread and the way to reach it. Dropping it stops the loop
/// and drops every subscriber still in it.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop on a thread named `NAME-events`.
    pub fn start(name: &str) -> Result<Self> {
        let mut manager = event_manager::EventManager::<Subscriber>::new()
            .map_err(|e| Error::Device(format!("creating the event loop of {name}: {e}")))?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-events"))
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        // epoll_wait only fails on a broken epoll fd: the
                        // loop cannot go on, and saying so beats spinning.
                        log::error!("{label}: the event loop stopped: {e}");
                        return;
                    }
                }
            })
            .map_err(Error::io("spawning the event-loop thread"))?;
        Ok(Self {
            endpoint,
            stop,
            thread: Some(thread),
        })
    }

    /// Puts `s` into the loop ([`MutEventSubscriber::init`] runs on the
    /// loop's thread and registers its file descriptors) and returns its
    /// ID. Blocks until the loop has taken it, so it must not be called
    /// from a subscriber (use [`LoopHandle`] there).
    pub fn add(&self, s: Subscriber) -> Result<SubscriberId> {
        self.endpoint
            .call_blocking(move |ops| -> std::result::Result<_, event_manager::Error> {
                Ok(ops.add_subscriber(s))
            })
            .map_err(|e| Error::Device(format!("adding to the event loop: {e}")))
    }

    /// A handle for later requests to the loop.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle(self.endpoint.clone())
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            // A subscriber that dropped the last reference to the VM would
            // run this on the loop's own thread: never join oneself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::{epoll::EventSet, eventfd::EventFd};

    /// Reports every read of its eventfd; drops out when it reads 99.
    struct Probe(EventFd, mpsc::Sender<u64>);

    impl MutEventSubscriber for Probe {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, ops: &mut EventOps) {
            let v = self.0.read().unwrap();
            if v == 99 {
                ops.remove(Events::new(&self.0, EventSet::IN)).unwrap();
            }
            let _ = self.1.send(v);
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self.1.send(0);
        }
    }

    const DEADLINE: Duration = Duration::from_secs(60);

    #[test]
    fn subscribers_are_served_removed_and_dropped_with_the_loop() {
        let events = EventLoop::start("t").unwrap();
        let (a, b) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let (tx, rx) = mpsc::channel();
        let ida = events
            .add(Box::new(Probe(a.try_clone().unwrap(), tx.clone())))
            .unwrap();
        events
            .add(Box::new(Probe(b.try_clone().unwrap(), tx)))
            .unwrap();
        a.write(5).unwrap();
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 5);
        b.write(7).unwrap();
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 7);
        // Removal from a handle drops the subscriber on the loop's thread.
        events.handle().remove_later(ida);
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 0);
        // A subscriber may drop its own descriptors; it is not called again.
        b.write(99).unwrap();
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 99);
        b.write(1).unwrap();
        a.write(1).unwrap();
        // Stopping the loop drops the one left; nothing else was sent.
        drop(events);
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 0);
        assert!(rx.recv_timeout(Duration::ZERO).is_err());
    }
}
