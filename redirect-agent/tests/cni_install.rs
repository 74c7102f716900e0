//! The CNI installer on the shapes of real node configurations (`tests/golden/cni/<shape>/in`:
//! containerd's bridge, Calico, Cilium beside a backed-up flannel, flannel, a single `.conf`):
//! what install writes (`installed.txt`, `UPDATE_GOLDEN=1` rewrites it), that installing again
//! changes nothing, and that uninstall gives back every input file byte for byte. Then the
//! attack surface: symlinks, half-written files, the primary CNI rewriting its file.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redirect_agent::cni_install::{self, InstallError, PluginSettings};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cni")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("redirect-cni-install-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("redirect-cni.src"), b"\x7fELF plugin bytes").unwrap();
    d
}

/// Every file of a directory: name -> content (symlinks shown as such).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type().unwrap();
        let v = if ft.is_symlink() {
            format!("-> {}", std::fs::read_link(e.path()).unwrap().display())
        } else if ft.is_fifo() {
            "(fifo)".into()
        } else {
            std::fs::read_to_string(e.path()).unwrap()
        };
        out.insert(name, v);
    }
    out
}

fn settings() -> PluginSettings {
    PluginSettings {
        agent_socket: "/var/run/redirect/agent.sock".into(),
        ..Default::default()
    }
}

fn copy_in(shape: &str, conf: &Path) {
    for e in std::fs::read_dir(golden_dir().join(shape).join("in"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), conf.join(e.file_name())).unwrap();
    }
}

#[test]
fn real_node_configurations() {
    for shape in ["bridge", "calico", "cilium", "flannel", "conf"] {
        let d = scratch(shape);
        let (conf, bin) = (d.join("net.d"), d.join("bin"));
        copy_in(shape, &conf);
        let before = snapshot(&conf);
        let done =
            cni_install::install(&d.join("redirect-cni.src"), &bin, &conf, &settings()).unwrap();
        assert!(
            done.conf_updated && done.binary_updated,
            "{shape}: {done:?}"
        );
        let after = snapshot(&conf);
        let mut got = format!(
            "# {shape}: install wrote {}{}\n",
            done.conf.file_name().unwrap().to_string_lossy(),
            match &done.converted_from {
                Some(f) => format!(" (from {})", f.file_name().unwrap().to_string_lossy()),
                None => String::new(),
            }
        );
        for (name, text) in &after {
            let mark = if before.get(name) == Some(text) {
                "unchanged"
            } else {
                "written"
            };
            got.push_str(&format!("=== {name} ({mark})\n{text}"));
            if !text.ends_with('\n') {
                got.push('\n');
            }
        }
        // Every file is still what libcni can read: valid JSON with our entry last.
        let list: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&done.conf).unwrap()).unwrap();
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins.last().unwrap()["type"], "redirect-cni", "{shape}");
        assert_eq!(
            plugins.last().unwrap()["capabilities"]["io.kubernetes.cri.pod-annotations"],
            true
        );
        let path = golden_dir().join(shape).join("installed.txt");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &got).unwrap();
        } else {
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
            assert_eq!(got, want, "{shape}: differs from {}", path.display());
        }
        assert_eq!(
            std::fs::read(bin.join("redirect-cni")).unwrap(),
            b"\x7fELF plugin bytes"
        );
        // Again: nothing written.
        let again =
            cni_install::install(&d.join("redirect-cni.src"), &bin, &conf, &settings()).unwrap();
        assert!(
            !again.conf_updated && !again.binary_updated,
            "{shape}: {again:?}"
        );
        assert_eq!(
            snapshot(&conf),
            after,
            "{shape}: a second install changed files"
        );
        // Other settings: the entry is replaced, still once.
        let mut other = settings();
        other.failure_policy = "ignore".into();
        let changed =
            cni_install::install(&d.join("redirect-cni.src"), &bin, &conf, &other).unwrap();
        assert!(changed.conf_updated);
        let text = std::fs::read_to_string(&changed.conf).unwrap();
        assert_eq!(text.matches("redirect-cni").count(), 1, "{shape}: {text}");
        assert!(text.contains("\"failurePolicy\":\"ignore\""));
        // Uninstall: exactly the input again, and no binary.
        let u = cni_install::uninstall(&bin, &conf).unwrap();
        assert!(u.binary.is_some());
        assert_eq!(
            snapshot(&conf),
            before,
            "{shape}: uninstall did not restore the input"
        );
        assert!(!bin.join("redirect-cni").exists());
        let none = cni_install::uninstall(&bin, &conf).unwrap();
        assert_eq!(
            none,
            Default::default(),
            "{shape}: a second uninstall did something"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn empty_conf_dir_is_refused() {
    let d = scratch("empty");
    let e = cni_install::install(
        &d.join("redirect-cni.src"),
        &d.join("bin"),
        &d.join("net.d"),
        &settings(),
    )
    .unwrap_err();
    assert!(matches!(e, InstallError::NoConf(_)), "{e}");
    assert!(
        e.to_string().contains("install the primary CNI first"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A symlinked primary: read through (to a regular file), replaced by a file of its own; the
/// link's target is never written. A link to a FIFO is refused at once (no hang), and one to
/// a directory is not a configuration.
#[test]
fn symlinks_in_the_conf_dir() {
    let d = scratch("symlink");
    let conf = d.join("net.d");
    let target = d.join("elsewhere.conflist");
    std::fs::copy(golden_dir().join("flannel/in/10-flannel.conflist"), &target).unwrap();
    let original = std::fs::read_to_string(&target).unwrap();
    std::os::unix::fs::symlink(&target, conf.join("10-flannel.conflist")).unwrap();
    let done = cni_install::install_conf(&conf, &settings()).unwrap();
    assert!(done.1);
    let link = std::fs::symlink_metadata(conf.join("10-flannel.conflist")).unwrap();
    assert!(
        link.file_type().is_file(),
        "the link is replaced by a regular file"
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        original,
        "the target is untouched"
    );

    let fifo = conf.join("00-fifo.conflist");
    nix::unistd::mkfifo(
        &d.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink(d.join("fifo"), &fifo).unwrap();
    let e = cni_install::install_conf(&conf, &settings()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();

    std::fs::create_dir(d.join("adir")).unwrap();
    std::os::unix::fs::symlink(d.join("adir"), conf.join("00-dir.conflist")).unwrap();
    let e = cni_install::install_conf(&conf, &settings()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The primary CNI writes its file in two steps (not atomically): install reads again until
/// the file is whole, and then inserts.
#[test]
fn half_written_file_is_read_again() {
    let d = scratch("partial");
    let conf = d.join("net.d");
    let full = std::fs::read_to_string(golden_dir().join("calico/in/10-calico.conflist")).unwrap();
    let path = conf.join("10-calico.conflist");
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let writer = {
        let (path, full) = (path.clone(), full.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&path, full).unwrap();
        })
    };
    let (p, updated, _) = cni_install::install_conf(&conf, &settings()).unwrap();
    writer.join().unwrap();
    assert!(updated);
    let text = std::fs::read_to_string(p).unwrap();
    assert!(
        text.starts_with(&full[..full.len() - 10]),
        "the whole file, then our entry"
    );
    assert!(text.contains("redirect-cni"));
    // A file that never becomes valid is an error naming it, not a hang.
    std::fs::write(&path, "{\"plugins\": [").unwrap();
    let e = cni_install::install_conf(&conf, &settings()).unwrap_err();
    assert!(e.to_string().contains("10-calico.conflist"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The primary CNI rewrites its configuration (dropping our entry) again and again, as Calico
/// or Cilium do at their start, while the watch runs: after each rewrite the entry comes back.
/// A new file sorting first becomes the primary and gets the entry too.
#[test]
fn watch_reinserts_after_the_primary_cni_rewrites() {
    let d = scratch("watch");
    let conf = d.join("net.d");
    let original =
        std::fs::read_to_string(golden_dir().join("cilium/in/05-cilium.conflist")).unwrap();
    let path = conf.join("05-cilium.conflist");
    std::fs::write(&path, &original).unwrap();
    {
        let conf = conf.clone();
        std::thread::spawn(move || cni_install::watch(&conf, &settings()));
    }
    let has_entry = |p: &Path| {
        std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"type\":\"redirect-cni\""))
    };
    let wait_for = |p: &Path| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !has_entry(p) {
            assert!(
                Instant::now() < deadline,
                "{} never got the entry back",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&path);
    for round in 0..5 {
        // Half the rounds in place (truncate and write), half atomically (write and rename).
        if round % 2 == 0 {
            std::fs::write(&path, &original).unwrap();
        } else {
            let tmp = conf.join(".cilium-tmp");
            std::fs::write(&tmp, &original).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        wait_for(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("redirect-cni").count(),
            1,
            "round {round}: {text}"
        );
    }
    let first = conf.join("00-multus.conflist");
    std::fs::write(
        &first,
        r#"{"cniVersion":"1.0.0","name":"multus","plugins":[{"type":"multus"}]}"#,
    )
    .unwrap();
    wait_for(&first);
    let _ = std::fs::remove_dir_all(&d);
}
