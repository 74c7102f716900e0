//! `redirect-pause`: the pod sandbox's process for the runtime test bed's images, as
//! Kubernetes' `pause`: it holds the pod's namespaces, reaps orphans (it is PID 1 when the pod
//! shares a PID namespace) and exits 0 on SIGTERM or SIGINT. Only the standard library and
//! libc, so the static binary is small.

fn main() {
    // SAFETY: a sigset_t is plain data; sigemptyset/sigaddset initialise it before use, and
    // sigprocmask/sigwait/waitpid are called with valid pointers to it and to `status`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        // Blocked, then taken synchronously: no handler runs in an async-signal context.
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                continue;
            }
            match sig {
                libc::SIGCHLD => {
                    let mut status = 0;
                    while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
                }
                _ => std::process::exit(0),
            }
        }
    }
}
