//! `intervm_guest::channel` between two host threads on one region file,
//! as two guest programs would use it: messages of every size echoed back
//! intact, and a peer that leaves reported as gone.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use intervm_guest::channel::Channel;
use intervm_guest::shmem::Source;
use intervm_guest::Error;
use intervm_protocol::ring::RingError;

/// Far longer than anything here takes: reaching it means a hang.
const HANG: Duration = Duration::from_secs(60);

fn region(tag: &str) -> (Source, PathBuf) {
    let (source, path, _) = common::region(&format!("channel-{tag}"), 2);
    (source, path)
}

#[test]
fn messages_of_every_size_come_back_intact() {
    let (source, path) = region("echo");
    let s1 = source.clone();
    let echo = std::thread::spawn(move || {
        let ch = Channel::open(&s1, 1, HANG).unwrap();
        let (mut from, mut to) = (ch.receiver(0).unwrap(), ch.sender(0).unwrap());
        let mut buf = vec![0u8; ch.max_message()];
        loop {
            let n = from.recv(&mut buf, HANG).unwrap();
            to.send(&buf[..n], HANG).unwrap();
            if n == 0 {
                break;
            }
        }
    });
    let ch = Channel::open(&source, 0, HANG).unwrap();
    let (mut to, mut from) = (ch.sender(1).unwrap(), ch.receiver(1).unwrap());
    let mut back = vec![0u8; ch.max_message()];
    for len in (1..2000).chain([ch.max_message()]) {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        to.send(&msg, HANG).unwrap();
        let n = from.recv(&mut back, HANG).unwrap();
        assert_eq!(&back[..n], &msg[..], "message of {len} bytes");
    }
    to.send(&[], HANG).unwrap();
    assert_eq!(from.recv(&mut back, HANG).unwrap(), 0);
    echo.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_peer_that_leaves_is_reported_gone_not_waited_for() {
    let (source, path) = region("gone");
    let peer = Channel::open(&source, 1, HANG).unwrap();
    let ch = Channel::open(&source, 0, HANG).unwrap();
    assert!(ch.is_alive(1));
    // The peer sends one message and leaves: the message still arrives,
    // then its leaving is an error, long before the timeout.
    peer.sender(0).unwrap().send(b"last words", HANG).unwrap();
    drop(peer);
    let mut from = ch.receiver(1).unwrap();
    let mut buf = vec![0u8; 64];
    let n = from.recv(&mut buf, HANG).unwrap();
    assert_eq!(&buf[..n], b"last words");
    match from.recv(&mut buf, HANG) {
        Err(Error::Ring(RingError::PeerGone(1))) => {}
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_file(path);
}
