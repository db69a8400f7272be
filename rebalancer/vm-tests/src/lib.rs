//! Helpers of the qemu tests (`tests/precopy_vm.rs`: pre-copy in one guest;
//! `tests/two_guests.rs`: a migration between two guests): an initramfs writer, a kernel
//! module dependency resolver, the host-side harness (kernel, image, qemu), the TCP client
//! that checks every reply, and the result lines the guest prints on the serial console.
//! The guest side is `src/bin/vm-guest.rs`.

pub mod cpio;
pub mod guest;
pub mod kmod;
pub mod pair;
pub mod probe;
pub mod report;
