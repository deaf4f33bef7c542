//! QEMU ivshmem-server protocol server.
