//! Messages of QEMU's ivshmem-server protocol (`docs/specs/ivshmem-spec.rst`
//! in QEMU): the server sends, the client only listens. Each message is one
//! little-endian `i64`, optionally with one file descriptor (`SCM_RIGHTS`).
//!
//! On connect: the protocol version (0); the client's ID; `-1` with the
//! shared-memory fd; for every other client, its ID once per vector with
//! the eventfd that rings it; the client's own ID once per vector with the
//! eventfd it is rung on. Later: a peer ID with an fd (connect, one per
//! vector) or without (disconnect).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{Error, Result};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: i64 = 0;

/// Sends `v`, with `fd` if given.
pub fn send(s: &UnixStream, v: i64, fd: Option<&impl AsRawFd>) -> Result<()> {
    let b = v.to_le_bytes();
    let n = match fd {
        Some(f) => s.send_with_fd(&b[..], f.as_raw_fd()),
        None => s.send_with_fds::<&[u8]>(&[&b[..]], &[]),
    }
    .map_err(|e| {
        Error::Io(
            "sending to an ivshmem peer".into(),
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    if n != 8 {
        return Err(Error::Protocol(format!("short send ({n} of 8 bytes)")));
    }
    Ok(())
}

/// Receives one message. `Ok(None)` at end of stream.
pub fn recv(s: &UnixStream) -> Result<Option<(i64, Option<File>)>> {
    let mut b = [0u8; 8];
    let (n, fd) = s.recv_with_fd(&mut b).map_err(|e| {
        Error::Io(
            "receiving from the ivshmem server".into(),
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    // Received descriptors are not close-on-exec (recvmsg without
    // MSG_CMSG_CLOEXEC): mark them, so no program this process starts
    // inherits a region or a doorbell.
    if let Some(f) = &fd {
        // SAFETY: F_SETFD on a descriptor we own; no memory involved.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(Error::Io(
                "marking a received fd close-on-exec".into(),
                std::io::Error::last_os_error(),
            ));
        }
    }
    if n == 0 {
        return Ok(None);
    }
    // A stream may split the 8 bytes; the fd comes with the first part.
    let mut got = n;
    let mut r = s;
    while got < 8 {
        match r.read(&mut b[got..]) {
            Ok(0) => return Err(Error::Protocol(format!("message cut short at {got} bytes"))),
            Ok(k) => got += k,
            Err(e) => return Err(Error::Io("receiving from the ivshmem server".into(), e)),
        }
    }
    Ok(Some((i64::from_le_bytes(b), fd)))
}
