//! Loads and stores of context fields at fixed offsets.
//!
//! The verifier only accepts context accesses of the form `*(u32 *)(ctx + CONST)`. When a
//! program reads several words of an array field (an IPv6 address), LLVM likes to compute
//! `ctx + 28` once and load at offsets 0, 4, 8, 12 from it, which the verifier rejects
//! ("dereference of modified ctx ptr"). Clang avoids this with `preserve_static_offset`; Rust
//! has no such attribute, so these accesses are written in BPF assembly.

use core::ffi::c_void;

/// Reads the `u32` at byte offset `OFF` of a context (or socket) pointer.
///
/// # Safety
/// `base` must be a context or socket pointer of the running program whose field at `OFF` is a
/// readable 4-byte field for this program type (the verifier rejects the program otherwise).
#[inline(always)]
pub unsafe fn load_u32<const OFF: usize>(base: *const c_void) -> u32 {
    let v: u64;
    // SAFETY: the caller vouches for `base` and `OFF`; the load touches nothing else.
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

/// Reads the pointer field at byte offset `OFF` of a context (the `sk` of `bpf_sock_addr`,
/// `bpf_sock_ops`, `bpf_sockopt`), which the verifier types from the field it is loaded from.
///
/// # Safety
/// `base` must be the running program's context pointer and its field at `OFF` a readable
/// pointer field for this program type (the verifier rejects the program otherwise).
#[inline(always)]
pub unsafe fn load_ptr<const OFF: usize, T>(base: *const c_void) -> *mut T {
    let v: u64;
    // SAFETY: the caller vouches for `base` and `OFF`; the load touches nothing else.
    unsafe {
        core::arch::asm!(
            "{v} = *(u64 *)({b} + {off})",
            v = out(reg) v,
            b = in(reg) base,
            off = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v as *mut T
}

/// Writes the `u32` at byte offset `OFF` of a context pointer.
///
/// # Safety
/// `base` must be the running program's context pointer and its field at `OFF` a writable
/// 4-byte field for this program type (the verifier rejects the program otherwise).
#[inline(always)]
pub unsafe fn store_u32<const OFF: usize>(base: *mut c_void, value: u32) {
    // SAFETY: the caller vouches for `base` and `OFF`; the store touches nothing else.
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
        // SAFETY: `$ptr` is a context or socket pointer of type `$ty` and `$field` one of its
        // readable address fields: four readable words from its offset.
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
        // SAFETY: `$ptr` is the context, of type `$ty`, and `$field` one of its writable
        // address fields: four writable words from its offset.
        unsafe {
            $crate::ctx::store_u32::<OFF>(p, v[0]);
            $crate::ctx::store_u32::<{ OFF + 4 }>(p, v[1]);
            $crate::ctx::store_u32::<{ OFF + 8 }>(p, v[2]);
            $crate::ctx::store_u32::<{ OFF + 12 }>(p, v[3]);
        }
    }};
}
