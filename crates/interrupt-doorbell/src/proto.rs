//! Messages of QEMU ivshmem-server protocol.
