//! Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): a value kept by the kernel inside the
//! socket and freed with it, so per-connection state cannot outlive its connection whatever
//! happens to it (a connect() that fails before its SYN, a killed process, an unenrolled pod).
//!
//! aya-ebpf's own `SkStorage` only takes a `SockAddrContext` and cannot be pinned; this one
//! takes the `struct bpf_sock` pointer every hook here has, and is pinned by name like the
//! other maps, so that every loaded copy of the programs shares it.
//!
//! # Minimum kernel version
//! 5.3: the map type is 5.2; `bpf_sk_storage_get`/`_delete` reached cgroup sock_addr programs
//! (fb85c4a730af), sock_ops programs (1314ef561102) and cgroup sockopt programs (their
//! introduction, 0d01da6afc54) in 5.3. The map needs the object's BTF (key and value types).

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, BPF_F_NO_PREALLOC},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
};

/// `LIBBPF_PIN_BY_NAME`: pinned under the loader's map pin directory by the map's name.
const PIN_BY_NAME: usize = 1;
/// `BPF_SK_STORAGE_GET_F_CREATE`.
const F_CREATE: u64 = 1;

/// A BTF map definition of a socket storage map holding a `T` per socket.
///
/// The fields are never read: their types are the definition. The loader reads them from the
/// object's BTF (as libbpf does): `type`, `key` (`int`, as the kernel requires), `value`,
/// `max_entries` (0, required), `map_flags` (`BPF_F_NO_PREALLOC`, required) and `pinning`.
#[repr(C)]
pub struct SkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the struct holds only null placeholder pointers that the loader replaces by a map
// reference; nothing dereferences them, so sharing the static between programs is sound.
unsafe impl<T> Sync for SkStorage<T> {}

impl<T: Copy> SkStorage<T> {
    pub const fn new() -> Self {
        SkStorage {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// A copy of the socket's value, if it has one.
    ///
    /// # Safety
    /// `sk` must be a full socket pointer as the verifier typed it in this hook (the `sk` field
    /// of the context, checked for null where the verifier says it may be null).
    #[inline(always)]
    pub unsafe fn get(&self, sk: *mut bpf_sock) -> Option<T> {
        // SAFETY: the map is a socket storage map of `T` (its definition above) and the caller
        // vouches for `sk`; the kernel returns NULL or a pointer to the socket's `T`, valid
        // for this program run.
        let p = unsafe { bpf_sk_storage_get(self.as_ptr(), sk.cast(), ptr::null_mut(), 0) };
        // SAFETY: non-null pointers from the helper point to the socket's `T`.
        unsafe { p.cast::<T>().as_ref() }.copied()
    }

    /// Sets the socket's value to `value`, creating it if the socket has none. `false` when the
    /// kernel could not allocate it (socket option memory, `net.core.optmem_max`, is charged).
    ///
    /// # Safety
    /// As for [`SkStorage::get`].
    #[inline(always)]
    pub unsafe fn set(&self, sk: *mut bpf_sock, value: T) -> bool {
        let mut init = value;
        // SAFETY: as in `get`; with F_CREATE the kernel copies `value` into a new element when
        // the socket has none (and leaves an existing one alone, hence the store below).
        let p = unsafe {
            bpf_sk_storage_get(
                self.as_ptr(),
                sk.cast(),
                ptr::from_mut(&mut init).cast(),
                F_CREATE,
            )
        }
        .cast::<T>();
        // SAFETY: non-null pointers from the helper point to the socket's `T`.
        match unsafe { p.as_mut() } {
            Some(slot) => {
                *slot = value;
                true
            }
            None => false,
        }
    }

    /// Drops the socket's value, if any.
    ///
    /// # Safety
    /// As for [`SkStorage::get`].
    #[inline(always)]
    pub unsafe fn delete(&self, sk: *mut bpf_sock) {
        // SAFETY: as in `get`. A socket without a value returns -ENOENT, which is fine.
        let _ = unsafe { bpf_sk_storage_delete(self.as_ptr(), sk.cast()) };
    }
}
