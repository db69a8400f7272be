//! Helpers of the pre-copy VM test (`tests/precopy_vm.rs`): an initramfs writer, a kernel
//! module dependency resolver, and the result lines the guest prints on the serial console.
//! The guest side is `src/bin/vm-guest.rs`.

pub mod cpio;
pub mod kmod;
pub mod report;
