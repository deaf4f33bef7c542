//! One module per channel: functions that boot probe VMs on /dev/kvm,
//! move data and return what the guests measured.

pub mod doorbell;
pub mod linux;
pub mod linux_user;
pub mod portio;
pub mod shmem;
