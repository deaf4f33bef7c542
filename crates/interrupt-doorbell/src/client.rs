//! QEMU ivshmem-server protocol client (see `server`).
