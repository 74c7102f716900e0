//! Loads and stores of context fields at fixed offsets.
//!
//! The verifier only accepts context accesses of the form `*(u32 *)(ctx + CONST)`. When a
//! program reads several words of an array field (an IPv6 address), LLVM likes to compute
//! `ctx + 28` once and load at offsets 0, 4, 8, 12 from it, which the verifier rejects
//! ("dereference of modified ctx ptr"). Clang avoids this with `preserve_static_offset`; Rust
//! has no such attribute, so these accesses are written in BPF assembly.

use core::ffi::c_void;

/// Reads the `u32` at byte offset `OFF` of a context (or socket) pointer.
#[inline(always)]
pub unsafe fn load_u32<const OFF: usize>(base: *const c_void) -> u32 {
    let v: u64;
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({b} + {off})",
            v = out(reg) v,
            b = in(reg) base,
            off = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v as u32
}

/// Writes the `u32` at byte offset `OFF` of a context pointer.
#[inline(always)]
pub unsafe fn store_u32<const OFF: usize>(base: *mut c_void, value: u32) {
    unsafe {
        core::arch::asm!(
            "*(u32 *)({b} + {off}) = {v}",
            v = in(reg) value as u64,
            b = in(reg) base,
            off = const OFF,
            options(nostack, preserves_flags),
        );
    }
}

/// Reads an IPv6 address field (four `u32` words) of a context struct:
/// `load_ip6!(ptr, bpf_sock_ops, local_ip6)`.
#[macro_export]
macro_rules! load_ip6 {
    ($ptr:expr, $ty:ty, $field:ident) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field);
        let p = $ptr as *const core::ffi::c_void;
        #[allow(unused_unsafe)]
        unsafe {
            [
                $crate::ctx::load_u32::<OFF>(p),
                $crate::ctx::load_u32::<{ OFF + 4 }>(p),
                $crate::ctx::load_u32::<{ OFF + 8 }>(p),
                $crate::ctx::load_u32::<{ OFF + 12 }>(p),
            ]
        }
    }};
}

/// Writes an IPv6 address field of a context struct, one word per store.
#[macro_export]
macro_rules! store_ip6 {
    ($ptr:expr, $ty:ty, $field:ident, $value:expr) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field);
        let p = $ptr as *mut core::ffi::c_void;
        let v: [u32; 4] = $value;
        #[allow(unused_unsafe)]
        unsafe {
            $crate::ctx::store_u32::<OFF>(p, v[0]);
            $crate::ctx::store_u32::<{ OFF + 4 }>(p, v[1]);
            $crate::ctx::store_u32::<{ OFF + 8 }>(p, v[2]);
            $crate::ctx::store_u32::<{ OFF + 12 }>(p, v[3]);
        }
    }};
}
