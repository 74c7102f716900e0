//! redirect's kernel programs, one module per hook. They share the maps in [`maps`] and the pod
//! lookups in [`pod`]; one loaded object serves every enrolled pod.
#![no_std]
#![no_main]
// BPF inline assembly, for context accesses the verifier accepts (see `ctx`).
#![feature(asm_experimental_arch)]

mod addr;
mod bind;
mod connect;
mod ctx;
mod dns;
mod maps;
mod orig_dst;
mod peername;
mod pod;
mod sk_lookup;
mod sock_ops;
mod sockopt;
mod storage;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
