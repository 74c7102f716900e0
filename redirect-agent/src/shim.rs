//! TEMPORARY: bridges to the datapath and netns APIs being rewritten in parallel; removed when
//! they land.
#![allow(dead_code)]

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::{
    datapath::{Datapath, DatapathError},
    netns::{self, NetnsError},
};

pub trait OpenExisting: Sized {
    fn open_existing(root: &Path) -> Result<Option<Self>, DatapathError>;
}

impl OpenExisting for Datapath {
    fn open_existing(root: &Path) -> Result<Option<Self>, DatapathError> {
        if !root.join("progs").exists() || !root.join("maps").exists() {
            return Ok(None);
        }
        Datapath::open(root).map(Some)
    }
}

pub struct NetnsHandle {
    file: File,
    path: PathBuf,
}

impl NetnsHandle {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| NetnsError::Open {
                path: path.to_owned(),
                source,
            })?;
        netns::run_in(&file, path, || ())?;
        Ok(NetnsHandle {
            file,
            path: path.to_owned(),
        })
    }
    pub fn inode(&self) -> u64 {
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }
    pub fn assigned_addrs(&self) -> Result<Vec<IpAddr>, NetnsError> {
        netns::run_in(&self.file, &self.path, || {
            nix::ifaddrs::getifaddrs()
                .map(|addrs| {
                    addrs
                        .filter_map(|a| a.address)
                        .filter_map(|a| {
                            a.as_sockaddr_in()
                                .map(|s| IpAddr::V4(s.ip()))
                                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
    }
    pub fn has_addr(&self, ip: IpAddr) -> Result<bool, NetnsError> {
        Ok(self.assigned_addrs()?.contains(&ip))
    }
    pub fn add_lo_addr6(&self, a: Ipv6Addr) -> Result<bool, NetnsError> {
        let out = netns::run_in(&self.file, &self.path, || {
            let r = std::process::Command::new("ip")
                .args(["-6", "addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"])
                .output();
            let _ = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            r
        })?;
        let out = out.map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("File exists") {
            Ok(out.status.success())
        } else {
            Err(NetnsError::Enter {
                path: self.path.clone(),
                source: io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            })
        }
    }
    pub fn remove_lo_addr6(&self, a: Ipv6Addr) -> Result<(), NetnsError> {
        netns::run_in(&self.file, &self.path, || {
            std::process::Command::new("ip")
                .args(["-6", "addr", "del", &format!("{a}/128"), "dev", "lo"])
                .status()
        })?
        .map(drop)
        .map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })
    }
}
